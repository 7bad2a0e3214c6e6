// A transfer as the core and the backends see it: one validated, coalesced batch.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "metadata.h"
#include "status.h"

namespace kvwire {

enum class Op : uint8_t { Read = 0, Write = 1 };

// How a backend moves a transfer's bytes. Auto lets the backend choose per peer and region.
// Direct: the peer's memory is mapped here (memcpy); Cma: same host, copied with process_vm_readv/
// writev (the peer proved its pid on the connection); ActiveMessage: rendezvous, the target serves it;
// CudaIpc: VRAM on either side, same host, copied by this process on its own CUDA stream.
enum class Path : uint8_t { Auto = 0, Direct = 1, ActiveMessage = 2, Rma = 3, Cma = 4, CudaIpc = 5 };
const char* pathName(Path path);

// One coalesced run: `length` bytes at `local` (a pointer in this process) and at `remoteOffset`
// inside the remote region. `firstIndex` is the first caller descriptor it came from.
struct Segment {
  uint8_t* local = nullptr;
  uint64_t remoteOffset = 0;
  uint64_t length = 0;
  uint32_t firstIndex = 0;
};

// A registered or allocated range of this process's memory. Shared by every transfer using it,
// so memory stays mapped (and a JS buffer stays referenced) until the last user lets go.
struct BackendMemory {
  virtual ~BackendMemory() = default;
  uint8_t* ptr = nullptr;
  uint64_t length = 0;
  bool allocated = false;
  std::vector<uint8_t> rkey;
};

struct LocalRegion {
  RegionInfo info;
  std::unique_ptr<BackendMemory> memory;
  std::shared_ptr<void> keeper;  // holds the caller's buffer alive (set by the binding)
  // Host memory page-locked with the CUDA driver for cuda_ipc copies (set on first use); declared
  // after `memory` and `keeper`, so it is unregistered before either goes.
  std::shared_ptr<void> pinned;
  bool pinTried = false;
  bool live = true;              // false once deregistered; memory is released with the last ref
  uint8_t* ptr() const { return memory->ptr; }
};
using LocalRegionRef = std::shared_ptr<LocalRegion>;

struct TransferStats {
  uint64_t bytes = 0;
  uint32_t descriptors = 0;
  uint32_t segments = 0;
  Path path = Path::Auto;
  uint64_t postNs = 0;      // validate + plan + post, on the caller's thread
  uint64_t transferNs = 0;  // post to settle
};

struct TransferState {
  uint64_t id = 0;
  // What the wire calls this transfer: random per transfer, so a third party cannot guess it, and
  // replies naming it are accepted only from the connection it was posted on.
  uint64_t wireId = 0;
  Op op = Op::Write;
  Path path = Path::Auto;
  uint64_t peerKey = 0;
  uint32_t remoteRegionId = 0;
  bool pathChosen = false;  // 'auto' chose `path`: the backend may take another where it cannot be used
  std::vector<Segment> segments;
  LocalRegionRef local;
  std::string notify;
  bool hasNotify = false;
  bool settled = false;
  TransferStats stats;
  uint64_t startNs = 0;
  // Backend bookkeeping: data segments landed.
  size_t landed = 0;
  bool remoteDone = false;  // READ: target said it sent everything; WRITE: target acknowledged
  // Ended early (cancel, deadline, peer failure) while bytes were still landing in local memory (a
  // rendezvous receive, a background copy): it settles with `endStatus` once they have landed, so
  // after a transfer settles no byte of it moves any more.
  bool ending = false;
  Status endStatus;
  size_t landingReceives = 0;
  std::shared_ptr<void> backendHold;  // e.g. the rkey used by an RMA transfer
};
using TransferRef = std::shared_ptr<TransferState>;

uint64_t monotonicNs();

}  // namespace kvwire
