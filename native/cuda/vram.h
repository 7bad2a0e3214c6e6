// GPU memory (VRAM) as kvwire regions, CUDA IPC between processes on one host, and a stream of
// copies whose completion the progress loop polls. Every call makes the device's primary context
// current on the calling thread first.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../core/status.h"
#include "../core/transfer.h"
#include "cuda_api.h"

namespace kvwire {
namespace cuda {

// VRAM a region owns (allocate) or borrows (register: memory another library in the process owns).
// `ptr` holds the device address: never dereference it on the host.
Result<std::unique_ptr<BackendMemory>> allocateVram(int device, uint64_t length);
Result<std::unique_ptr<BackendMemory>> adoptVram(int device, uint64_t address, uint64_t length);

// Host <-> device copies for Region.write/read: synchronous, inside [address, address + length).
Status copyToDevice(int device, uint64_t dst, const uint8_t* src, uint64_t length);
Status copyFromDevice(int device, uint8_t* dst, uint64_t src, uint64_t length);

// The metadata section ("cuda-ipc") through which a same-host peer opens a VRAM region: the IPC
// handle of the allocation holding it, the region's offset inside that allocation, and the id of
// the host (its kernel's boot id) on which the handle opens.
constexpr const char* kIpcSection = "cuda-ipc";
constexpr size_t kHostIdBytes = 16;
constexpr size_t kIpcSectionBytes = kIpcHandleBytes + 8 + kHostIdBytes;
// This host's id (all zero where the kernel does not tell it).
const std::array<uint8_t, kHostIdBytes>& hostId();
// Whether a peer's cuda-ipc section was published on this host: false only where both ids are known
// and differ (a peer on another host reaches this VRAM, and this process its, through UCX).
bool ipcSectionFromThisHost(const std::vector<uint8_t>& section);
// Only a region that is a whole allocation of whole 2 MiB granules is exported (the handle opens all
// of it, writable); `ownAllocation`: kvwire allocated it, so a tail past the region is kvwire's own.
constexpr uint64_t kIpcGranule = 2u << 20;
Result<std::vector<uint8_t>> exportIpc(int device, uint64_t address, uint64_t length, bool ownAllocation);

// Page-locks host memory for the driver (cuMemHostRegister), so copies between it and VRAM run at
// PCIe rate without blocking the calling thread; unregistered when the last reference goes.
Result<std::shared_ptr<void>> pinHost(int device, void* pointer, uint64_t length);

// Why CUDA IPC export does not work on `device` (a trial allocation), or "" when it does.
std::string probeIpc(int device);

// A peer's VRAM region opened in this process. Bounds come from what the driver mapped here: the
// region (offset + length) must lie inside the opened allocation, whatever the metadata claims.
class IpcMapping {
 public:
  static Result<std::shared_ptr<IpcMapping>> open(int device, const std::vector<uint8_t>& section, uint64_t length);
  ~IpcMapping();
  IpcMapping(const IpcMapping&) = delete;
  IpcMapping& operator=(const IpcMapping&) = delete;
  uint64_t address() const { return base_ + offset_; }  // the region's first byte, a device address here
  int device() const { return device_; }

 private:
  IpcMapping() = default;
  int device_ = 0;
  CUdeviceptr base_ = 0;
  uint64_t offset_ = 0;
};

// One copy: `bytes` from `src` to `dst`, each a device address or a host pointer (unified addressing).
struct CopyRun {
  uint64_t dst = 0;
  uint64_t src = 0;
  uint64_t bytes = 0;
};

// A stream on one device: jobs of copies, each finished by an event that poll() checks — no thread
// waits on the GPU, and an idle queue costs nothing.
class CopyQueue {
 public:
  static Result<std::unique_ptr<CopyQueue>> create(int device);
  ~CopyQueue();  // waits for the copies in flight: memory they touch may be released right after
  CopyQueue(const CopyQueue&) = delete;
  CopyQueue& operator=(const CopyQueue&) = delete;

  // Enqueues the copies and the event that ends job `id`. An error before any copy was enqueued is
  // returned; one after is reported by poll() once the enqueued copies have finished. With
  // `deviceToDevice` (every run between device memory reachable from this device), the whole batch
  // is one launch of the copy kernel (kernels/copy_runs.cu) over a table of runs in device memory;
  // otherwise (or where the kernel cannot load) one cuMemcpyAsync per run (host memory: the DMA
  // engines do it best).
  Status submit(uint64_t id, const std::vector<CopyRun>& runs, bool deviceToDevice);
  uint64_t kernelLaunches() const { return kernelLaunches_; }
  // Appends the jobs that finished (in order), each with its status.
  void poll(std::vector<std::pair<uint64_t, Status>>& done);
  // Waits until every copy queued so far has finished (poll() still reports them).
  void drain();
  // Staging for a transport that moves host memory only (path 'am'), synchronous: `toHost`, runs
  // from VRAM into host memory, whose destinations follow one another in order (one buffer);
  // otherwise runs from host memory at ascending addresses into VRAM. On a stream of its own
  // (ordered after the legacy default stream, as this queue's is, but not behind this queue's jobs).
  // Many small runs go through a device bounce buffer: one bulk copy and one launch of the copy
  // kernel instead of a driver call per run.
  Status stageNow(const std::vector<CopyRun>& runs, bool toHost);
  size_t pending() const { return jobs_.size(); }
  int device() const { return device_; }

 private:
  struct Job {
    uint64_t id;
    CUevent event;
    Status error;
    CUdeviceptr table = 0;  // the kernel's run table, reused once the job finished
    size_t tableBytes = 0;
  };
  CopyQueue() = default;
  CUevent takeEvent();
  bool loadKernel();
  // Enqueues `runs` on `stream` as one kernel launch; false (nothing enqueued) where that cannot be done.
  bool launch(const std::vector<CopyRun>& runs, Job* job, CUstream stream);
  Status stageGroup(const std::vector<CopyRun>& runs, size_t begin, size_t end, bool toHost);
  int device_ = 0;
  CUstream stream_ = nullptr;
  std::vector<Job> jobs_;          // in submission order
  std::vector<CUevent> spareEvents_;
  CUmodule module_ = nullptr;
  CUfunction kernel_ = nullptr;
  bool kernelTried_ = false;
  uint64_t kernelLaunches_ = 0;
  std::vector<std::pair<CUdeviceptr, size_t>> spareTables_;
  CUstream stagingStream_ = nullptr;
  CUdeviceptr bounce_ = 0;  // stageNow's device buffer
  size_t bounceBytes_ = 0;
};

}  // namespace cuda
}  // namespace kvwire
