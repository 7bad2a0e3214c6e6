#include "cma.h"

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

}  // namespace kvwire::ucx
