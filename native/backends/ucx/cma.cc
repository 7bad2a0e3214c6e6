#include "cma.h"

#include <sys/mman.h>
#include <sys/uio.h>

#include <cerrno>
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

Status cmaCopy(pid_t pid, bool write, const CmaSpan* spans, size_t count) {
  std::vector<iovec> local, remote;
  size_t next = 0;      // first span not fully copied
  uint64_t partial = 0; // bytes of spans[next] already copied
  while (next < count) {
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
  for (uint32_t i = 0; i < kGrants; ++i) std::memset(grants_[i].nonce, 0, sizeof grants_[i].nonce);
  // Reserved for good, without memory or access: a late reader gets EFAULT.
  madvise(entries_, bytes_, MADV_DONTNEED);
  mprotect(entries_, bytes_, PROT_NONE);
}

bool CmaTable::init() {
  bytes_ = sizeof(CmaEntry) * kSlots + sizeof(CmaGrant) * kGrants;
  void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  entries_ = static_cast<CmaEntry*>(p);
  grants_ = reinterpret_cast<CmaGrant*>(entries_ + kSlots);
  free_.reserve(kGrants);
  for (int i = kGrants - 1; i >= 0; --i) free_.push_back(i);
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
  CmaEntry& e = entries_[id % kSlots];
  if (e.access != 0 && e.id != id) return;
  write(e, id, access, base, length);
}

void CmaTable::withdraw(uint32_t id) {
  if (!entries_) return;
  CmaEntry& e = entries_[id % kSlots];
  if (e.id == id && e.access != 0) write(e, id, 0, 0, 0);
}

void CmaTable::withdrawAll() {
  if (!entries_) return;
  for (uint32_t i = 0; i < kSlots; ++i)
    if (entries_[i].access != 0) write(entries_[i], entries_[i].id, 0, 0, 0);
}

int CmaTable::grant(const uint8_t* nonce) {
  if (!entries_ || free_.empty()) return -1;
  const int slot = free_.back();
  free_.pop_back();
  CmaGrant& g = grants_[slot];
  g.entries = reinterpret_cast<uint64_t>(entries_);
  g.slots = kSlots;
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  std::memcpy(g.nonce, nonce, sizeof g.nonce);
  return slot;
}

void CmaTable::endGrant(int slot) {
  if (!entries_ || slot < 0 || slot >= static_cast<int>(kGrants)) return;
  std::memset(grants_[slot].nonce, 0, sizeof grants_[slot].nonce);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  free_.push_back(slot);
}

CmaLookup cmaLookup(pid_t pid, uint64_t grant, const uint8_t* nonce, uint32_t id, CmaEntry* out) {
  // Three reads, each ordered after the one before (a fence between system calls): the grant's
  // nonce, then the entry's sequence number; the entry; its sequence number again. A consistent
  // entry had the same even number before and after.
  CmaGrant g{};
  if (!cmaRead(pid, grant, &g, sizeof g) || std::memcmp(g.nonce, nonce, sizeof g.nonce) != 0 || g.slots == 0)
    return CmaLookup::GrantGone;
  const uint64_t at = g.entries + static_cast<uint64_t>(id % g.slots) * sizeof(CmaEntry);
  uint64_t before = 0, after = 0;
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (!cmaRead(pid, at, &before, sizeof before)) return CmaLookup::GrantGone;
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (!cmaRead(pid, at, out, sizeof *out)) return CmaLookup::GrantGone;
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (!cmaRead(pid, at, &after, sizeof after)) return CmaLookup::GrantGone;
  if (before != after || (before & 1) != 0 || out->id != id || out->access == 0) return CmaLookup::NotPublished;
  return CmaLookup::Ok;
}

}  // namespace kvwire::ucx
