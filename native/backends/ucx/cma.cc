#include "cma.h"

#include <poll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <sys/uio.h>

#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace kvwire::ucx {
namespace {

constexpr size_t kMaxIov = 1024;  // IOV_MAX on Linux

Status failure(int err, bool write, const CmaSpan& at) {
  const std::string where = std::to_string(at.length) + " bytes at 0x" + [&] {
    char hex[32];
    std::snprintf(hex, sizeof hex, "%llx", static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(at.remote)));
    return std::string(hex);
  }() + " in the peer process";
  const std::string what = std::string(write ? "writing " : "reading ") + where;
  switch (err) {
    case ESRCH: return {Code::RemoteDisconnect, what + ": the peer's process is gone"};
    case EPERM: return {Code::NotAllowed, what + ": the kernel does not let this process reach it (ptrace rules)"};
    case EFAULT: return {Code::Backend, what + ": that memory is not mapped there (was its region deregistered?)"};
    default: return {Code::Backend, what + ": " + std::strerror(err)};
  }
}

}  // namespace

Status cmaCopy(pid_t pid, bool write, const CmaSpan* spans, size_t count, const std::atomic<bool>* stop) {
  std::vector<iovec> local, remote;
  size_t next = 0;      // first span not fully copied
  uint64_t partial = 0; // bytes of spans[next] already copied
  while (next < count) {
    if (stop != nullptr && stop->load(std::memory_order_acquire))
      return {Code::NotFound, "the peer deregistered the region while this transfer was being copied into or out of it"};
    local.clear();
    remote.clear();
    uint64_t want = 0;
    for (size_t i = next; i < count && local.size() < kMaxIov; ++i) {
      const uint64_t skip = i == next ? partial : 0;
      local.push_back({spans[i].local + skip, spans[i].length - skip});
      remote.push_back({spans[i].remote + skip, spans[i].length - skip});
      want += spans[i].length - skip;
    }
    const ssize_t got = write ? process_vm_writev(pid, local.data(), local.size(), remote.data(), remote.size(), 0)
                              : process_vm_readv(pid, local.data(), local.size(), remote.data(), remote.size(), 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      return failure(errno, write, spans[next]);
    }
    if (got == 0 && want != 0) return failure(EFAULT, write, spans[next]);
    // Advance past what was copied; a short count stops before an element that faults, and the
    // next call reports why.
    uint64_t left = static_cast<uint64_t>(got);
    while (next < count && left >= spans[next].length - partial) {
      left -= spans[next].length - partial;
      partial = 0;
      ++next;
    }
    if (next < count) partial += left;
  }
  return Status::ok();
}

bool cmaRead(pid_t pid, uint64_t remote, void* out, size_t length) {
  iovec l{out, length};
  iovec r{reinterpret_cast<void*>(remote), length};
  return process_vm_readv(pid, &l, 1, &r, 1, 0) == static_cast<ssize_t>(length);
}

CmaTable::~CmaTable() {
  if (!entries_) return;
  withdrawAll();
  for (uint32_t i = 0; i < kCmaGrants; ++i) std::memset(grants_[i].nonce, 0, sizeof grants_[i].nonce);
  // Kept reserved, without memory or access: a late reader gets EFAULT.
  madvise(header_, kCmaTableBytes, MADV_DONTNEED);
  mprotect(header_, kCmaTableBytes, PROT_NONE);
}

bool CmaTable::init() {
  const int fd = memfd_create(kCmaTableName, MFD_CLOEXEC);
  if (fd < 0) return false;
  void* p = ftruncate(fd, kCmaTableBytes) == 0
                ? mmap(nullptr, kCmaTableBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0)
                : MAP_FAILED;
  close(fd);
  if (p == MAP_FAILED) return false;
  header_ = static_cast<CmaHeader*>(p);
  header_->epoch = 1;
  entries_ = reinterpret_cast<CmaEntry*>(header_ + 1);
  grants_ = reinterpret_cast<CmaGrant*>(entries_ + kCmaSlots);
  free_.reserve(kCmaGrants);
  for (int i = kCmaGrants - 1; i >= 0; --i) free_.push_back(i);
  return true;
}

void CmaTable::write(CmaEntry& e, uint32_t id, uint32_t access, uint64_t base, uint64_t length) {
  const uint64_t seq = __atomic_load_n(&e.seq, __ATOMIC_RELAXED);
  __atomic_store_n(&e.seq, seq + 1, __ATOMIC_RELAXED);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  __atomic_store_n(&e.id, id, __ATOMIC_RELAXED);
  __atomic_store_n(&e.access, access, __ATOMIC_RELAXED);
  __atomic_store_n(&e.base, base, __ATOMIC_RELAXED);
  __atomic_store_n(&e.length, length, __ATOMIC_RELAXED);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  __atomic_store_n(&e.seq, seq + 2, __ATOMIC_RELAXED);
}

void CmaTable::publish(uint32_t id, uint32_t access, uint64_t base, uint64_t length) {
  if (!entries_ || access == 0) return;
  CmaEntry& e = entries_[id % kCmaSlots];
  if (e.access != 0 && e.id != id) return;
  write(e, id, access, base, length);
}

uint64_t CmaTable::withdraw(uint32_t id) {
  if (!entries_) return 0;
  CmaEntry& e = entries_[id % kCmaSlots];
  if (e.id == id && e.access != 0) write(e, id, 0, 0, 0);
  // After the entry: a grantee that reads this epoch (or a later one) before an entry finds it gone.
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  const uint64_t epoch = __atomic_add_fetch(&header_->epoch, 1, __ATOMIC_SEQ_CST);
  return epoch;
}

void CmaTable::withdrawAll() {
  if (!entries_) return;
  for (uint32_t i = 0; i < kCmaSlots; ++i)
    if (entries_[i].access != 0) write(entries_[i], entries_[i].id, 0, 0, 0);
}

int CmaTable::grant(const uint8_t* nonce, uint64_t nowNs) {
  if (!entries_) return -1;
  for (auto it = cooling_.begin(); it != cooling_.end();)
    if (it->first <= nowNs) {
      free_.push_back(it->second);
      it = cooling_.erase(it);
    } else {
      ++it;
    }
  if (free_.empty()) return -1;
  const int slot = free_.back();
  free_.pop_back();
  CmaGrant& g = grants_[slot];
  g.entries = reinterpret_cast<uint64_t>(entries_);
  g.slots = kCmaSlots;
  // No copy of the new grantee runs yet: it is safe from the current epoch on.
  const uint64_t now = __atomic_load_n(&header_->epoch, __ATOMIC_SEQ_CST);
  __atomic_store_n(&g.safeEpoch[0], now, __ATOMIC_RELAXED);
  __atomic_store_n(&g.safeEpoch[1], now, __ATOMIC_RELAXED);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  std::memcpy(g.nonce, nonce, sizeof g.nonce);
  return slot;
}

void CmaTable::endGrant(int slot, uint64_t nowNs, uint64_t coolNs) {
  if (!entries_ || slot < 0 || slot >= static_cast<int>(kCmaGrants)) return;
  std::memset(grants_[slot].nonce, 0, sizeof grants_[slot].nonce);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  cooling_.emplace_back(nowNs + coolNs, slot);
}

uint64_t CmaTable::safeEpoch(int slot) const {
  if (!entries_ || slot < 0 || slot >= static_cast<int>(kCmaGrants)) return 0;
  const uint64_t a = __atomic_load_n(&grants_[slot].safeEpoch[0], __ATOMIC_SEQ_CST);
  const uint64_t b = __atomic_load_n(&grants_[slot].safeEpoch[1], __ATOMIC_SEQ_CST);
  return a == b ? a : 0;
}

std::string cmaVerifyGrant(pid_t pid, uint64_t grant, const uint8_t* nonce, uint64_t* table) {
  // The mapping that holds `grant` in that process must be a kvwire table: a memfd of that name,
  // the table's size, from its start; the grant at a grant slot of it.
  const std::string path = "/proc/" + std::to_string(pid) + "/maps";
  FILE* maps = std::fopen(path.c_str(), "r");
  if (!maps) return "cannot read " + path + ": " + std::strerror(errno);
  const std::string want = std::string("/memfd:") + kCmaTableName;
  const uint64_t pageBytes = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t mapped = (kCmaTableBytes + pageBytes - 1) / pageBytes * pageBytes;
  char line[4096];
  std::string why = "its address is not in any mapping of that process";
  while (std::fgets(line, sizeof line, maps)) {
    unsigned long long start = 0, end = 0, off = 0;
    char perms[8] = {};
    int name = 0;
    if (std::sscanf(line, "%llx-%llx %7s %llx %*s %*s %n", &start, &end, perms, &off, &name) < 4) continue;
    if (grant < start || grant >= end) continue;
    std::string file = name > 0 ? std::string(line + name) : std::string();
    while (!file.empty() && (file.back() == '\n' || file.back() == ' ')) file.pop_back();
    const uint64_t slots = start + sizeof(CmaHeader) + sizeof(CmaEntry) * kCmaSlots;
    // Exactly the name kvwire gives it (a memfd's file is always unlinked), private and writable.
    if (file != want + " (deleted)" || std::string(perms) != "rw-p") {
      why = "it is not in a kvwire table mapping";
    } else if (off != 0 || end - start != mapped) {
      why = "its mapping is not a whole kvwire table";
    } else if (grant < slots || (grant - slots) % sizeof(CmaGrant) != 0 || (grant - slots) / sizeof(CmaGrant) >= kCmaGrants) {
      why = "it is not at a grant slot";
    } else {
      why.clear();
      *table = start;
    }
    break;
  }
  std::fclose(maps);
  if (!why.empty()) return why;
  CmaGrant g{};
  if (!cmaRead(pid, grant, &g, sizeof g)) return "its grant cannot be read";
  if (std::memcmp(g.nonce, nonce, sizeof g.nonce) != 0) return "its grant does not hold our nonce";
  if (g.entries != *table + sizeof(CmaHeader) || g.slots != kCmaSlots) return "its grant names another table";
  return {};
}

CmaLookup cmaLookup(pid_t pid, uint64_t grant, uint64_t table, const uint8_t* nonce, uint32_t id, CmaEntry* out,
                    uint64_t* epoch) {
  // Ordered reads (a fence between system calls): the grant's nonce (still ours) and the entry's
  // sequence number; the entry; the sequence number again. The writer makes it odd before it
  // touches the entry and even again after, and it only grows: the same even number before and
  // after means no write overlapped the read in between.
  uint8_t held[sizeof(CmaGrant::nonce)] = {};
  const uint64_t at = table + sizeof(CmaHeader) + static_cast<uint64_t>(id % kCmaSlots) * sizeof(CmaEntry);
  uint64_t before = 0, after = 0;
  if (!cmaRead(pid, grant, held, sizeof held) || std::memcmp(held, nonce, sizeof held) != 0) return CmaLookup::GrantGone;
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  // The epoch first: a withdrawal raises it after the entry, so an entry read after an epoch at or
  // past the withdrawal's shows the region gone.
  if (!cmaRead(pid, table, epoch, sizeof *epoch)) return CmaLookup::GrantGone;
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (!cmaRead(pid, at, &before, sizeof before)) return CmaLookup::GrantGone;
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (!cmaRead(pid, at, out, sizeof *out)) return CmaLookup::GrantGone;
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (!cmaRead(pid, at, &after, sizeof after)) return CmaLookup::GrantGone;
  if (before != after || (before & 1) != 0 || out->id != id || out->access == 0) return CmaLookup::NotPublished;
  return CmaLookup::Ok;
}

uint64_t cmaEpoch(pid_t pid, uint64_t table) {
  uint64_t epoch = 0;
  return cmaRead(pid, table, &epoch, sizeof epoch) ? epoch : 0;
}

bool cmaWriteSafeEpoch(pid_t pid, uint64_t grant, uint64_t epoch) {
  const uint64_t both[2] = {epoch, epoch};
  iovec l{const_cast<uint64_t*>(both), sizeof both};
  iovec r{reinterpret_cast<void*>(grant + offsetof(CmaGrant, safeEpoch)), sizeof both};
  return process_vm_writev(pid, &l, 1, &r, 1, 0) == static_cast<ssize_t>(sizeof both);
}

int cmaWatch(pid_t pid) {
  return static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
}

bool cmaGone(int pidfd) {
  if (pidfd < 0) return false;
  pollfd p{pidfd, POLLIN, 0};
  return poll(&p, 1, 0) != 0;  // readable (exited) or an error: either way, not the process we proved
}

}  // namespace kvwire::ucx
