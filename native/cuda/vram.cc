#include "vram.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <tuple>

#include "driver.h"
#include "kernels/copy_runs_ptx.h"

namespace kvwire {
namespace cuda {

namespace {

// `device`'s context current on this thread for the scope's life; the context that was current
// before (the application's own, e.g. PyTorch's) is restored after.
class OnDevice {
 public:
  explicit OnDevice(int device) {
    auto d = driver();
    if (!d.isOk()) {
      status_ = d.status();
      return;
    }
    d_ = d.value();
    if (d_->ctxGetCurrent(&previous_) != kSuccess) previous_ = nullptr;
    status_ = useDevice(device);
    restore_ = true;
  }
  ~OnDevice() {
    if (restore_) d_->ctxSetCurrent(previous_);
  }
  OnDevice(const OnDevice&) = delete;
  OnDevice& operator=(const OnDevice&) = delete;
  bool isOk() const { return status_.isOk(); }
  const Status& status() const { return status_; }
  const Driver* value() const { return d_; }

 private:
  const Driver* d_ = nullptr;
  Status status_;
  CUcontext previous_ = nullptr;
  bool restore_ = false;
};

class VramMemory : public BackendMemory {
 public:
  VramMemory(int device, CUdeviceptr address, uint64_t bytes, bool owned) : device_(device), owned_(owned) {
    ptr = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(address));
    length = bytes;
    allocated = owned;
  }
  ~VramMemory() override {
    if (!owned_) return;
    OnDevice d(device_);
    if (d.isOk()) d.value()->memFree(reinterpret_cast<uintptr_t>(ptr));
  }

 private:
  int device_;
  bool owned_;
};

// What the driver says about `address`: device memory of `device`, and the allocation around it.
struct PointerFacts {
  unsigned memoryType = 0;
  int device = -1;
  CUdeviceptr rangeStart = 0;
  size_t rangeSize = 0;
};
Result<PointerFacts> pointerFacts(const Driver& d, uint64_t address) {
  PointerFacts f;
  int attributes[] = {kPointerAttributeMemoryType, kPointerAttributeDeviceOrdinal, kPointerAttributeRangeStartAddr,
                      kPointerAttributeRangeSize};
  void* data[] = {&f.memoryType, &f.device, &f.rangeStart, &f.rangeSize};
  if (CUresult r = d.pointerGetAttributes(4, attributes, data, address); r != kSuccess)
    return d.fail("cuPointerGetAttributes", r);
  return f;
}

}  // namespace

Result<std::unique_ptr<BackendMemory>> allocateVram(int device, uint64_t length) {
  OnDevice d(device);
  if (!d.isOk()) return d.status();
  // Whole 2 MiB granules: the driver may sub-allocate smaller ones from a shared block, and an IPC
  // handle opens that whole block (CUDA Programming Guide, "Interprocess Communication").
  const uint64_t rounded = (length + kIpcGranule - 1) / kIpcGranule * kIpcGranule;
  CUdeviceptr p = 0;
  if (CUresult r = d.value()->memAlloc(&p, rounded); r != kSuccess)
    return Status(r == kErrorOutOfMemory ? Code::Unavailable : Code::Backend,
                  "allocate: " + std::to_string(length) + " bytes on CUDA device " + std::to_string(device) + ": " +
                      d.value()->describe(r));
  std::unique_ptr<BackendMemory> memory(new VramMemory(device, p, rounded, true));
  // Zeroed, as host allocations are: peers must not read what this process's GPU held before. The
  // memset may run after the call returns: waited for, so a peer's first READ (on its own stream, in
  // another process) cannot overtake it.
  if (CUresult r = d.value()->memsetD8(p, 0, memory->length); r != kSuccess) return d.value()->fail("cuMemsetD8", r);
  if (CUresult r = d.value()->streamSynchronize(nullptr); r != kSuccess) return d.value()->fail("cuStreamSynchronize", r);
  return memory;
}

const std::array<uint8_t, kHostIdBytes>& hostId() {
  static const std::array<uint8_t, kHostIdBytes> id = [] {
    std::array<uint8_t, kHostIdBytes> out{};
    FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "r");  // a UUID, new at every boot
    if (f == nullptr) return out;
    char text[64] = {};
    const size_t n = std::fread(text, 1, sizeof text - 1, f);
    std::fclose(f);
    size_t k = 0;
    int high = -1;
    for (size_t i = 0; i < n && k < out.size(); ++i) {
      const char c = text[i];
      const int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
      if (v < 0) continue;
      if (high < 0) {
        high = v;
      } else {
        out[k++] = static_cast<uint8_t>(high << 4 | v);
        high = -1;
      }
    }
    if (k != out.size()) out.fill(0);
    return out;
  }();
  return id;
}

bool ipcSectionFromThisHost(const std::vector<uint8_t>& section) {
  if (section.size() != kIpcSectionBytes) return true;  // refused with the reason when opened
  const uint8_t* theirs = section.data() + kIpcHandleBytes + 8;
  const auto& mine = hostId();
  const auto zero = [](const uint8_t* p) { return std::all_of(p, p + kHostIdBytes, [](uint8_t b) { return b == 0; }); };
  return zero(theirs) || zero(mine.data()) || std::equal(mine.begin(), mine.end(), theirs);
}

Result<std::unique_ptr<BackendMemory>> adoptVram(int device, uint64_t address, uint64_t length) {
  OnDevice d(device);
  if (!d.isOk()) return d.status();
  auto facts = pointerFacts(*d.value(), address);
  if (!facts.isOk()) return facts.status();
  const PointerFacts& f = facts.value();
  const std::string at = "register: address 0x" + [&] {
    char hex[32];
    std::snprintf(hex, sizeof hex, "%llx", static_cast<unsigned long long>(address));
    return std::string(hex);
  }();
  if (f.memoryType != kMemoryTypeDevice)
    return Status(Code::InvalidParam, at + " is not CUDA device memory" +
                                          (f.memoryType == kMemoryTypeHost ? " (it is host memory registered with CUDA)" : ""));
  if (f.device != device)
    return Status(Code::InvalidParam, at + " is memory of CUDA device " + std::to_string(f.device) + ", not device " +
                                          std::to_string(device));
  if (address < f.rangeStart || length > f.rangeSize - (address - f.rangeStart))
    return Status(Code::InvalidParam, at + " + " + std::to_string(length) + " bytes runs past its allocation (" +
                                          std::to_string(f.rangeSize - (address - f.rangeStart)) + " bytes left from there)");
  return std::unique_ptr<BackendMemory>(new VramMemory(device, address, length, false));
}

Status copyToDevice(int device, uint64_t dst, const uint8_t* src, uint64_t length) {
  OnDevice d(device);
  if (!d.isOk()) return d.status();
  if (length == 0) return Status::ok();
  if (CUresult r = d.value()->memcpyHtoD(dst, src, length); r != kSuccess) return d.value()->fail("cuMemcpyHtoD", r);
  // From pageable memory the call may return before the DMA has landed: wait for it, so a transfer
  // posted next (on another stream) reads what was written.
  if (CUresult r = d.value()->streamSynchronize(nullptr); r != kSuccess) return d.value()->fail("cuStreamSynchronize", r);
  return Status::ok();
}

Status copyFromDevice(int device, uint8_t* dst, uint64_t src, uint64_t length) {
  OnDevice d(device);
  if (!d.isOk()) return d.status();
  if (length == 0) return Status::ok();
  if (CUresult r = d.value()->memcpyDtoH(dst, src, length); r != kSuccess) return d.value()->fail("cuMemcpyDtoH", r);
  return Status::ok();
}

Result<std::vector<uint8_t>> exportIpc(int device, uint64_t address, uint64_t length, bool ownAllocation) {
  OnDevice d(device);
  if (!d.isOk()) return d.status();
  auto facts = pointerFacts(*d.value(), address);
  if (!facts.isOk()) return facts.status();
  const PointerFacts& f = facts.value();
  // The handle opens the whole allocation, read-write (and the whole 2 MiB block the driver carved it
  // from): a region narrower than its allocation, or an allocation that is not whole 2 MiB granules,
  // would hand peers memory outside it. (kvwire's own allocations are rounded up to granules: the
  // tail past the region is kvwire's, zeroed.)
  if (address != f.rangeStart || length > f.rangeSize || (!ownAllocation && length != f.rangeSize) ||
      f.rangeSize % kIpcGranule != 0)
    return Status(Code::Unavailable, "the region is " + std::to_string(length) + " bytes at offset " +
                                         std::to_string(address - f.rangeStart) + " of a " + std::to_string(f.rangeSize) +
                                         "-byte CUDA allocation; CUDA IPC would open all of it (only whole allocations "
                                         "of whole 2 MiB granules are exported)");
  CUipcMemHandle handle{};
  if (CUresult r = d.value()->ipcGetMemHandle(&handle, f.rangeStart); r != kSuccess)
    return d.value()->fail("cuIpcGetMemHandle", r);
  std::vector<uint8_t> section(handle.reserved, handle.reserved + kIpcHandleBytes);
  const uint64_t offset = address - f.rangeStart;
  for (int i = 0; i < 8; ++i) section.push_back(static_cast<uint8_t>(offset >> (8 * i)));
  section.insert(section.end(), hostId().begin(), hostId().end());
  return section;
}

Result<std::shared_ptr<IpcMapping>> IpcMapping::open(int device, const std::vector<uint8_t>& section, uint64_t length) {
  if (section.size() != kIpcSectionBytes)
    return Status(Code::InvalidParam, "its cuda-ipc section is " + std::to_string(section.size()) + " bytes, not " +
                                          std::to_string(kIpcSectionBytes));
  if (!ipcSectionFromThisHost(section))
    return Status(Code::Unavailable, "its CUDA IPC handle was published on another host (boot ids differ): VRAM there "
                                     "moves by path 'am'");
  OnDevice d(device);
  if (!d.isOk()) return d.status();
  const Driver& drv = *d.value();
  CUipcMemHandle handle{};
  std::memcpy(handle.reserved, section.data(), kIpcHandleBytes);
  uint64_t offset = 0;
  for (int i = 0; i < 8; ++i) offset |= static_cast<uint64_t>(section[kIpcHandleBytes + i]) << (8 * i);
  std::shared_ptr<IpcMapping> m(new IpcMapping());
  m->device_ = device;
  if (CUresult r = drv.ipcOpenMemHandle(&m->base_, handle, kIpcMemLazyEnablePeerAccess); r != kSuccess) {
    m->base_ = 0;
    return Status(Code::Unavailable, "its CUDA IPC handle does not open here (cuIpcOpenMemHandle: " + drv.describe(r) +
                                         "; a peer on another host or in this same process cannot be reached this way, nor a region its owner has "
                                         "freed since this metadata was published)");
  }
  CUdeviceptr base = 0;
  size_t mapped = 0;
  if (CUresult r = drv.memGetAddressRange(&base, &mapped, m->base_); r != kSuccess) return drv.fail("cuMemGetAddressRange", r);
  if (base != m->base_ || offset > mapped || length > mapped - offset)
    return Status(Code::InvalidParam, "it claims " + std::to_string(length) + " bytes at offset " + std::to_string(offset) +
                                          " of an allocation of which " + std::to_string(mapped) + " bytes were mapped here");
  m->offset_ = offset;
  return m;
}

IpcMapping::~IpcMapping() {
  if (base_ == 0) return;
  OnDevice d(device_);
  if (d.isOk()) d.value()->ipcCloseMemHandle(base_);
}

Result<std::unique_ptr<CopyQueue>> CopyQueue::create(int device) {
  OnDevice d(device);
  if (!d.isOk()) return d.status();
  std::unique_ptr<CopyQueue> q(new CopyQueue());
  q->device_ = device;
  // A blocking stream: its copies start after work the application queued before on the legacy
  // default stream (e.g. the kernels that wrote the KV blocks). Work on the application's own
  // non-blocking streams must be synchronised by the application before it posts a transfer.
  if (CUresult r = d.value()->streamCreate(&q->stream_, 0); r != kSuccess) {
    q->stream_ = nullptr;
    return d.value()->fail("cuStreamCreate", r);
  }
  return q;
}

CopyQueue::~CopyQueue() {
  OnDevice d(device_);
  if (!d.isOk()) return;
  const Driver& drv = *d.value();
  if (stream_ != nullptr) {
    drv.streamSynchronize(stream_);
    drv.streamDestroy(stream_);
  }
  if (stagingStream_ != nullptr) drv.streamDestroy(stagingStream_);  // (stageNow waits for its copies)
  if (bounce_ != 0) drv.memFree(bounce_);
  for (Job& j : jobs_) {
    drv.eventDestroy(j.event);
    if (j.table != 0) drv.memFree(j.table);
  }
  for (CUevent e : spareEvents_) drv.eventDestroy(e);
  for (auto& [table, bytes] : spareTables_) drv.memFree(table);
}

CUevent CopyQueue::takeEvent() {
  if (!spareEvents_.empty()) {
    CUevent e = spareEvents_.back();
    spareEvents_.pop_back();
    return e;
  }
  CUevent e = nullptr;
  auto d = driver();
  if (d.isOk() && d.value()->eventCreate(&e, kEventDisableTiming) != kSuccess) e = nullptr;
  return e;
}

Status CopyQueue::stageNow(const std::vector<CopyRun>& runs, bool toHost) {
  if (runs.empty()) return Status::ok();
  OnDevice d(device_);
  if (!d.isOk()) return d.status();
  const Driver& drv = *d.value();
  if (stagingStream_ == nullptr && drv.streamCreate(&stagingStream_, 0) != kSuccess) {
    stagingStream_ = nullptr;
    return {Code::Backend, "cuStreamCreate failed (staging stream)"};
  }
  // Groups of up to kBounceMax bytes; a group of many runs goes through the bounce buffer.
  constexpr uint64_t kBounceMax = 64u << 20;
  size_t begin = 0;
  uint64_t bytes = 0;
  for (size_t i = 0; i < runs.size(); ++i) {
    if (i > begin && bytes + runs[i].bytes > kBounceMax) {
      if (Status st = stageGroup(runs, begin, i, toHost); !st) return st;
      begin = i;
      bytes = 0;
    }
    bytes += runs[i].bytes;
  }
  return stageGroup(runs, begin, runs.size(), toHost);
}

Status CopyQueue::stageGroup(const std::vector<CopyRun>& runs, size_t begin, size_t end, bool toHost) {
  constexpr size_t kKernelRuns = 16;  // fewer runs: a driver call each costs less than the detour
  const Driver& drv = *driver().value();
  Status st;
  // The host side, as one span: contiguous for a gather (a span copy would overwrite gaps), ascending
  // for a scatter (gaps are read, never written).
  const auto hostOf = [&](const CopyRun& r) { return toHost ? r.dst : r.src; };
  const uint64_t hostBase = hostOf(runs[begin]);
  uint64_t span = 0;
  bool spanOk = true;
  for (size_t i = begin; i < end && spanOk; ++i) {
    const uint64_t at = hostOf(runs[i]) - hostBase;
    spanOk = hostOf(runs[i]) >= hostBase && at >= span && (!toHost || at == span);
    span = at + runs[i].bytes;
  }
  bool bounced = false;
  if (end - begin >= kKernelRuns && spanOk && span <= (64u << 20) && loadKernel()) {
    if (bounceBytes_ < span) {
      if (bounce_ != 0) drv.memFree(bounce_);
      bounce_ = 0;
      bounceBytes_ = 0;
      size_t want = 1u << 20;
      while (want < span) want *= 2;
      if (drv.memAlloc(&bounce_, want) == kSuccess) bounceBytes_ = want;
      else bounce_ = 0;
    }
    if (bounce_ != 0) {
      std::vector<CopyRun> kernelRuns;
      kernelRuns.reserve(end - begin);
      for (size_t i = begin; i < end; ++i) {
        const CUdeviceptr mirror = bounce_ + (hostOf(runs[i]) - hostBase);
        kernelRuns.push_back(toHost ? CopyRun{mirror, runs[i].src, runs[i].bytes} : CopyRun{runs[i].dst, mirror, runs[i].bytes});
      }
      Job job{0, nullptr, Status::ok()};
      CUresult r = kSuccess;
      if (!toHost) r = drv.memcpyAsync(bounce_, hostBase, span, stagingStream_);
      if (r != kSuccess) {
        st = drv.fail("cuMemcpyAsync", r);
        bounced = true;
      } else if (launch(kernelRuns, &job, stagingStream_) && job.error.isOk()) {
        bounced = true;
        if (toHost && (r = drv.memcpyAsync(hostBase, bounce_, span, stagingStream_)) != kSuccess) st = drv.fail("cuMemcpyAsync", r);
      }  // else the kernel did not start: one copy per run below
      if (CUresult w = drv.streamSynchronize(stagingStream_); w != kSuccess && st.isOk()) st = drv.fail("cuStreamSynchronize", w);
      if (job.table != 0) spareTables_.emplace_back(job.table, job.tableBytes);
      if (bounced) return st;
    }
  }
  for (size_t i = begin; i < end; ++i)
    if (CUresult r = drv.memcpyAsync(runs[i].dst, runs[i].src, runs[i].bytes, stagingStream_); r != kSuccess) {
      st = drv.fail("cuMemcpyAsync", r);
      break;
    }
  // Waited for even after an error: copies enqueued before it still use the host buffers.
  if (CUresult w = drv.streamSynchronize(stagingStream_); w != kSuccess && st.isOk()) st = drv.fail("cuStreamSynchronize", w);
  return st;
}

void CopyQueue::drain() {
  OnDevice d(device_);
  if (d.isOk() && stream_ != nullptr) d.value()->streamSynchronize(stream_);
}

// The kernel is JIT-compiled by the driver from the PTX kvwire ships, once per device. A driver too old
// for that PTX (CUDA_ERROR_UNSUPPORTED_PTX_VERSION) keeps the per-run copies.
bool CopyQueue::loadKernel() {
  if (kernelTried_) return kernel_ != nullptr;
  kernelTried_ = true;
  auto d = driver();
  if (!d.isOk()) return false;
  if (d.value()->moduleLoadData(&module_, kCopyRunsPtx) != kSuccess) {
    module_ = nullptr;
    return false;
  }
  if (d.value()->moduleGetFunction(&kernel_, module_, kCopyRunsKernel) != kSuccess) kernel_ = nullptr;
  return kernel_ != nullptr;
}

bool CopyQueue::launch(const std::vector<CopyRun>& runs, Job* job, CUstream stream) {
  const Driver& drv = *driver().value();
  // Large runs are cut into chunks, one thread block each, so a batch of a few large blocks still
  // spreads over the whole GPU.
  constexpr uint64_t kChunk = 64u << 10;
  std::vector<uint64_t> table;
  table.reserve(runs.size() * 3);
  for (const CopyRun& run : runs)
    for (uint64_t at = 0; at < run.bytes; at += kChunk) {
      table.push_back(run.dst + at);
      table.push_back(run.src + at);
      table.push_back(std::min(kChunk, run.bytes - at));
    }
  const uint64_t count = table.size() / 3;
  if (count == 0 || count > UINT32_MAX) return false;
  const size_t bytes = table.size() * sizeof(uint64_t);
  CUdeviceptr buffer = 0;
  size_t capacity = 0;
  for (size_t i = 0; i < spareTables_.size(); ++i)
    if (spareTables_[i].second >= bytes) {
      std::tie(buffer, capacity) = spareTables_[i];
      spareTables_.erase(spareTables_.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
  if (buffer == 0) {
    capacity = 64u << 10;
    while (capacity < bytes) capacity *= 2;
    if (drv.memAlloc(&buffer, capacity) != kSuccess) return false;
  }
  // From pageable memory: the driver takes the bytes before the call returns.
  if (drv.memcpyHtoDAsync(buffer, table.data(), bytes, stream) != kSuccess) {
    spareTables_.emplace_back(buffer, capacity);
    return false;
  }
  job->table = buffer;
  job->tableBytes = capacity;
  unsigned runCount = static_cast<unsigned>(count);
  void* params[] = {&buffer, &runCount};
  const unsigned grid = static_cast<unsigned>(std::min<uint64_t>(count, 65535));
  if (CUresult r = drv.launchKernel(kernel_, grid, 1, 1, 256, 1, 1, 0, stream, params, nullptr); r != kSuccess) {
    job->error = drv.fail("cuLaunchKernel (kvwire_copy_runs)", r);
    return true;  // the table upload is queued: the job ends with this error once it has run
  }
  if (stream == stream_) ++kernelLaunches_;  // (cuda_ipc batches; staging launches are not counted)
  return true;
}

Status CopyQueue::submit(uint64_t id, const std::vector<CopyRun>& runs, bool deviceToDevice) {
  OnDevice d(device_);
  if (!d.isOk()) return d.status();
  const Driver& drv = *d.value();
  CUevent event = takeEvent();
  if (event == nullptr) return {Code::Backend, "cuEventCreate failed"};
  Job job{id, event, Status::ok()};
  if (deviceToDevice && runs.size() > 1 && loadKernel() && launch(runs, &job, stream_)) {
    if (CUresult r = drv.eventRecord(event, stream_); r != kSuccess) {
      drv.streamSynchronize(stream_);
      spareEvents_.push_back(event);
      if (job.table != 0) spareTables_.emplace_back(job.table, job.tableBytes);
      return job.error.isOk() ? drv.fail("cuEventRecord", r) : job.error;
    }
    jobs_.push_back(std::move(job));
    return Status::ok();
  }
  Status error;
  size_t enqueued = 0;
  for (const CopyRun& run : runs) {
    if (CUresult r = drv.memcpyAsync(run.dst, run.src, run.bytes, stream_); r != kSuccess) {
      error = drv.fail("cuMemcpyAsync", r);
      break;
    }
    ++enqueued;
  }
  if (enqueued == 0 && !error.isOk()) {
    spareEvents_.push_back(event);
    return error;
  }
  if (CUresult r = drv.eventRecord(event, stream_); r != kSuccess) {
    // No event to wait on: wait for the stream here, so no copy is still running once this returns.
    drv.streamSynchronize(stream_);
    spareEvents_.push_back(event);
    return error.isOk() ? drv.fail("cuEventRecord", r) : error;
  }
  jobs_.push_back({id, event, std::move(error), 0, 0});
  return Status::ok();
}

void CopyQueue::poll(std::vector<std::pair<uint64_t, Status>>& done) {
  if (jobs_.empty()) return;
  OnDevice d(device_);
  if (!d.isOk()) return;
  const Driver& drv = *d.value();
  size_t finished = 0;
  for (; finished < jobs_.size(); ++finished) {
    Job& j = jobs_[finished];
    CUresult r = drv.eventQuery(j.event);
    if (r == kErrorNotReady) break;  // one stream: later jobs are not done either
    Status st = std::move(j.error);
    if (r != kSuccess && st.isOk()) st = drv.fail("copy on CUDA device " + std::to_string(device_), r);
    done.emplace_back(j.id, std::move(st));
    spareEvents_.push_back(j.event);
    if (j.table != 0) spareTables_.emplace_back(j.table, j.tableBytes);
  }
  jobs_.erase(jobs_.begin(), jobs_.begin() + static_cast<std::ptrdiff_t>(finished));
}

Result<std::shared_ptr<void>> pinHost(int device, void* pointer, uint64_t length) {
  OnDevice d(device);
  if (!d.isOk()) return d.status();
  if (CUresult r = d.value()->memHostRegister(pointer, length, kMemHostRegisterPortable); r != kSuccess)
    return d.value()->fail("cuMemHostRegister", r);
  const Driver* drv = d.value();
  return std::shared_ptr<void>(pointer, [drv, device](void* p) {
    OnDevice scope(device);
    drv->memHostUnregister(p);
  });
}

std::string probeIpc(int device) {
  auto memory = allocateVram(device, 2u << 20);
  if (!memory.isOk()) return memory.status().message();
  auto section = exportIpc(device, reinterpret_cast<uint64_t>(memory.value()->ptr), 2u << 20, true);
  return section.isOk() ? std::string() : section.status().message();
}

}  // namespace cuda
}  // namespace kvwire
