// Cross-memory attach: copies between this process and another on the same host with
// process_vm_readv/writev (path 'cma', wire.h). Safe to call from the copy pool's threads.
#pragma once
#include <sys/types.h>

#include <cstddef>
#include <cstdint>

#include "../../core/status.h"

namespace kvwire::ucx {

struct CmaSpan {
  uint8_t* local;   // in this process
  uint8_t* remote;  // an address in the peer process
  uint64_t length;
};

// Copies every span (write: local -> remote; read: remote -> local) in as few system calls as the
// kernel's iovec limit allows. Names the first span that failed and why.
Status cmaCopy(pid_t pid, bool write, const CmaSpan* spans, size_t count);

// Reads `length` bytes at `remote` in process `pid` into `out`; true if all of them were read.
bool cmaRead(pid_t pid, uint64_t remote, void* out, size_t length);

}  // namespace kvwire::ucx
