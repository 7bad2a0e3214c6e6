// A test double of the CUDA driver API (libcuda.so.1) for the entry points kvwire uses
// (native/cuda/cuda_api.h), built as libkvwire-cuda-double.so and loaded in place of the driver with
// KVWIRE_CUDA_DRIVER. It lets a machine with no GPU run kvwire's VRAM paths, across processes, and it
// refuses what a real driver refuses wherever kvwire could otherwise get away with a bug:
//
// - device memory is a memfd (named kvwire-cuda-double) mapped twice: a PROT_NONE mapping whose address
//   is the CUdeviceptr, so a host-side dereference of a device pointer faults as it would on a GPU, and
//   a read-write alias that only the double uses to move bytes;
// - every memory, stream, event and IPC call needs a retained context current on the calling thread;
// - a copy must lie wholly inside one allocation (bytes past the size asked for are not device memory);
// - cuMemcpyAsync returns before the copy is made (a stream is a worker thread and a FIFO queue), so the
//   host buffer must stay put until an event or cuStreamSynchronize says the copy is done;
// - an IPC handle names the exporter's memfd by pid and fd number and carries a random tag kept in a
//   page past the allocation; the opener maps it only if the fd is such a memfd, of the right size,
//   with the right tag;
// - releasing a primary context's last reference destroys it: its allocations, IPC mappings, host
//   registrations, streams and events go with it; a process forked after cuInit cannot use the driver.
//
// Test-only knobs, read at the first successful cuInit: KVWIRE_CUDA_DOUBLE_DEVICES (device count,
// default 2), KVWIRE_CUDA_DOUBLE_COPY_DELAY_US (each async copy sleeps this long first) and
// KVWIRE_CUDA_DOUBLE_FAIL_COPIES=1 (every async copy fails with CUDA_ERROR_ILLEGAL_ADDRESS, sticky on
// its stream). The double prints nothing.
#include "../../native/cuda/cuda_api.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iterator>
#include <functional>
#include <map>
#include <set>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

using namespace kvwire::cuda;

#define KVWIRE_DOUBLE_EXPORT extern "C" __attribute__((visibility("default")))

// kvwire looks this symbol up to label the driver it loaded as a test double.
KVWIRE_DOUBLE_EXPORT const char kvwire_cuda_test_double[] = "kvwire CUDA driver test double (host memory, no GPU)";

// The entry points, declared from the same list kvwire loads them by: a definition below whose
// signature differed from the list would not compile (two C-linkage functions of one name).
#define KVWIRE_DOUBLE_DECLARE(symbol, member, params) KVWIRE_DOUBLE_EXPORT CUresult symbol params;
KVWIRE_CUDA_ENTRY_POINTS(KVWIRE_DOUBLE_DECLARE)
#undef KVWIRE_DOUBLE_DECLARE

namespace kvwire {
namespace cuda {
struct CUctx_st {  // a device's primary context; one per device, never freed, so its handle is stable
  int device = 0;
};
}  // namespace cuda
}  // namespace kvwire

namespace {

// CUresult values the double returns beyond those in cuda_api.h (cuda.h's values).
constexpr CUresult kErrorInvalidHandle = 400;
constexpr CUresult kErrorIllegalAddress = 700;
constexpr CUresult kErrorHostMemoryAlreadyRegistered = 712;
constexpr CUresult kErrorHostMemoryNotRegistered = 713;
constexpr CUresult kErrorUnknown = 999;

constexpr int kDriverVersion = 13000;
constexpr size_t kDeviceBytes = size_t{4} << 30;  // each device's memory, and its allocation budget
constexpr int kDefaultDevices = 2;
constexpr unsigned long long kMaxDevices = 64;
constexpr char kMemfdName[] = "kvwire-cuda-double";
constexpr char kMemfdLink[] = "/memfd:kvwire-cuda-double (deleted)";  // readlink of such a memfd's fd
constexpr unsigned char kMagic[8] = {'K', 'V', 'W', 'C', 'U', 'D', 'B', 'L'};
constexpr size_t kTagBytes = 16;
constexpr unsigned kHostRegisterFlags = 0xF;  // PORTABLE | DEVICEMAP | IOMEMORY | READ_ONLY
constexpr unsigned kEventFlags = 0x3;         // BLOCKING_SYNC | DISABLE_TIMING
constexpr unsigned kMemoryTypeNone = 0;
constexpr int kDeviceOrdinalNone = -2;

// The 64-byte IPC handle: magic, exporter pid, the exporter's fd number of the memfd, allocation size,
// device, 16-byte tag; every other byte zero.
constexpr size_t kHandlePid = 8, kHandleFd = 12, kHandleSize = 16, kHandleDevice = 24, kHandleTag = 32;
// The memfd's trailing page (past the allocation, never part of a device range): magic, size, tag.
constexpr size_t kTrailerSize = 8, kTrailerTag = 16, kTrailerBytes = 32;
static_assert(kHandleTag + kTagBytes <= kIpcHandleBytes, "handle layout");

size_t pageSize() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

size_t roundUpToPage(size_t bytes) { return (bytes + pageSize() - 1) / pageSize() * pageSize(); }

// Both mappings of one device allocation, unmapped (and the fd closed) when the last reference goes:
// the range table holds one, and so does every queued copy that touches it, so a cuMemFree racing a
// copy never pulls the memory from under it.
struct Mapping {
  void* device = MAP_FAILED;  // PROT_NONE: its address is the CUdeviceptr
  void* alias = MAP_FAILED;   // read-write: the double's own view
  size_t length = 0;
  int fd = -1;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (device != MAP_FAILED) munmap(device, length);
    if (alias != MAP_FAILED) munmap(alias, length);
    if (fd >= 0) close(fd);
  }
};

enum class Kind { kAllocated, kIpcOpened };

struct Range {
  uintptr_t base = 0;
  size_t size = 0;    // bytes asked for: the device range
  size_t extent = 0;  // size rounded up to a page: what is mapped (and charged to the budget)
  int device = 0;
  Kind kind = Kind::kAllocated;
  std::shared_ptr<Mapping> mapping;
  unsigned char tag[kTagBytes] = {};
  pid_t exporter = 0;  // ipc-opened: the handle's pid and fd
  int exporterFd = -1;
  int ipcRefs = 0;  // ipc-opened: opens not yet closed
};

struct HostRegistration {
  uintptr_t base = 0;
  size_t size = 0;
  int device = 0;
};

struct StreamStatus {
  std::atomic<int> sticky{kSuccess};  // the first failure on the stream; every later report repeats it
};

struct Marker {  // an event record's place in its stream
  std::atomic<bool> done{false};
  std::shared_ptr<StreamStatus> status;
};

struct Op {  // one queued stream operation: a copy, a kernel (run set), or (marker set) an event record
  unsigned char* dst = nullptr;
  const unsigned char* src = nullptr;
  size_t bytes = 0;
  std::shared_ptr<Mapping> keepDst, keepSrc;
  std::shared_ptr<std::vector<unsigned char>> staged;  // a pageable host source, copied at the call
  std::function<CUresult()> run;  // a kernel the double knows, as host code: its error faults the stream
  std::shared_ptr<Marker> marker;
};

struct Stream {
  int device = 0;
  unsigned long long delayUs = 0;
  bool failCopies = false;
  std::shared_ptr<StreamStatus> status = std::make_shared<StreamStatus>();
  std::mutex mu;
  std::condition_variable work, drained;
  std::deque<Op> queue;
  bool stopping = false;
  unsigned long long enqueued = 0, completed = 0;
  std::thread worker;
  ~Stream() {  // normally stopped by whoever took it out of the tables; this covers a failed creation
    if (!worker.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mu);
      stopping = true;
    }
    work.notify_all();
    worker.join();
  }
};

struct Event {
  int device = 0;
  std::mutex mu;
  std::shared_ptr<Marker> last;  // the latest record; none: never recorded
};

struct Device {
  CUctx_st* context = nullptr;
  int refs = 0;     // primary context retains not yet released; 0: the context is not active
  size_t used = 0;  // bytes of the budget held by allocations
  std::shared_ptr<Stream> legacy;  // the NULL stream, made at first use
};

struct State {
  std::mutex mu;
  bool configured = false;
  unsigned long long delayUs = 0;
  bool failCopies = false;
  std::vector<Device> devices;
  std::map<uintptr_t, std::shared_ptr<Range>> ranges;  // device ranges by base
  std::map<uintptr_t, HostRegistration> host;          // host registrations by base
  std::map<uintptr_t, std::shared_ptr<Stream>> streams;
  std::map<uintptr_t, std::shared_ptr<Event>> events;
  uintptr_t nextHandle = 1;
};

// Never destroyed: stream threads may outlive static destruction at exit.
State& state() {
  static State* s = new State;
  return *s;
}

std::atomic<bool> gReady{false};   // cuInit succeeded
std::atomic<bool> gForked{false};  // this is a child forked after cuInit: the driver is unusable here
thread_local CUctx_st* tCurrent = nullptr;

bool ready() { return gReady.load(std::memory_order_acquire) && !gForked.load(std::memory_order_relaxed); }

template <typename Body>
CUresult guarded(Body&& body) noexcept {
  try {
    return body();
  } catch (...) {
    return kErrorUnknown;
  }
}

// With state().mu held: the device of this thread's current context, if that context is active.
CUresult currentDevice(int* device) {
  CUctx_st* context = tCurrent;
  if (context == nullptr) return kErrorInvalidContext;
  if (state().devices[context->device].refs <= 0) return kErrorInvalidContext;
  *device = context->device;
  return kSuccess;
}

bool validDevice(CUdevice device) { return device >= 0 && device < static_cast<int>(state().devices.size()); }

uintptr_t newHandle() { return 0x100000 + state().nextHandle++ * 16; }

// ---- device ranges --------------------------------------------------------------------------------

enum class Place { kHost, kDevice, kInvalid };

// With state().mu held: where [p, p + bytes) lies. kDevice (and *range set): wholly inside one device
// range. kHost: touches no device mapping. kInvalid: part of it is device memory (or the unmapped-for-
// the-device tail of an allocation's last page) and part is not.
Place locate(uintptr_t p, size_t bytes, std::shared_ptr<Range>* range) {
  auto& ranges = state().ranges;
  auto next = ranges.upper_bound(p);
  const std::shared_ptr<Range>* containing = nullptr;
  if (next != ranges.begin()) {
    auto prev = std::prev(next);
    if (p < prev->first + prev->second->extent) containing = &prev->second;
  }
  bool touchesNext = next != ranges.end() && next->first - p < bytes;
  if (containing == nullptr) return touchesNext ? Place::kInvalid : Place::kHost;
  const Range& r = **containing;
  if (touchesNext || p - r.base > r.size || bytes > r.size - (p - r.base)) return Place::kInvalid;
  *range = *containing;
  return Place::kDevice;
}

// With state().mu held: the device range holding p, if any.
std::shared_ptr<Range> rangeAt(uintptr_t p) {
  auto& ranges = state().ranges;
  auto next = ranges.upper_bound(p);
  if (next == ranges.begin()) return nullptr;
  auto prev = std::prev(next);
  if (p - prev->first >= prev->second->size) return nullptr;
  return prev->second;
}

// With state().mu held: the host registration holding p, if any.
const HostRegistration* registrationAt(uintptr_t p) {
  auto& host = state().host;
  auto next = host.upper_bound(p);
  if (next == host.begin()) return nullptr;
  auto prev = std::prev(next);
  if (p - prev->first >= prev->second.size) return nullptr;
  return &prev->second;
}

bool overflows(uintptr_t p, size_t bytes) { return bytes > UINTPTR_MAX - p; }

// Maps fd's first `extent` bytes twice (PROT_NONE for the device pointer, read-write for the alias).
bool mapTwice(Mapping& m, size_t extent) {
  m.length = extent;
  m.device = mmap(nullptr, extent, PROT_NONE, MAP_SHARED, m.fd, 0);
  if (m.device == MAP_FAILED) return false;
  m.alias = mmap(nullptr, extent, PROT_READ | PROT_WRITE, MAP_SHARED, m.fd, 0);
  return m.alias != MAP_FAILED;
}

bool fillRandom(unsigned char* out, size_t bytes) {
  while (bytes > 0) {
    ssize_t n = getrandom(out, bytes, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    out += n;
    bytes -= static_cast<size_t>(n);
  }
  return true;
}

bool readAll(int fd, void* out, size_t bytes, off_t offset) {
  auto* p = static_cast<unsigned char*>(out);
  while (bytes > 0) {
    ssize_t n = pread(fd, p, bytes, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    bytes -= static_cast<size_t>(n);
    offset += n;
  }
  return true;
}

bool writeAll(int fd, const void* in, size_t bytes, off_t offset) {
  auto* p = static_cast<const unsigned char*>(in);
  while (bytes > 0) {
    ssize_t n = pwrite(fd, p, bytes, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    bytes -= static_cast<size_t>(n);
    offset += n;
  }
  return true;
}

// Whether every page of [p, p + bytes) is mapped in this process.
bool hostRangeMapped(uintptr_t p, size_t bytes) {
  const size_t page = pageSize();
  uintptr_t start = p / page * page;
  uintptr_t end = p + bytes;
  std::vector<unsigned char> residency(4096);
  while (start < end) {
    size_t pages = std::min<size_t>(residency.size(), (end - start + page - 1) / page);
    if (mincore(reinterpret_cast<void*>(start), pages * page, residency.data()) != 0) return false;
    start += pages * page;
  }
  return true;
}

// ---- streams --------------------------------------------------------------------------------------

void execute(Stream& s, Op& op) {
  if (op.marker) {
    op.marker->done.store(true, std::memory_order_release);
    return;
  }
  if (s.delayUs > 0) std::this_thread::sleep_for(std::chrono::microseconds(s.delayUs));
  if (s.status->sticky.load() != kSuccess) return;  // a failed stream does no more work
  if (s.failCopies) {
    int expected = kSuccess;
    s.status->sticky.compare_exchange_strong(expected, kErrorIllegalAddress);
    return;
  }
  if (op.run) {
    if (CUresult r = op.run(); r != kSuccess) {
      int expected = kSuccess;
      s.status->sticky.compare_exchange_strong(expected, r);
    }
    return;
  }
  std::memmove(op.dst, op.src, op.bytes);
}

void streamMain(Stream* s) {
  std::unique_lock<std::mutex> lock(s->mu);
  for (;;) {
    s->work.wait(lock, [s] { return s->stopping || !s->queue.empty(); });
    if (s->queue.empty()) return;  // stopping, and all queued work done
    Op op = std::move(s->queue.front());
    s->queue.pop_front();
    lock.unlock();
    execute(*s, op);
    op = Op();  // drop the mapping references (perhaps unmapping) outside the lock
    lock.lock();
    ++s->completed;
    s->drained.notify_all();
  }
}

// A stream and its worker thread; the thread blocks every asynchronous signal, so that none meant for
// the application is delivered on it (a fault in a copy still reaches the application's handlers).
// Throws std::system_error if no thread can be made.
std::shared_ptr<Stream> startStream(int device) {
  auto s = std::make_shared<Stream>();
  s->device = device;
  s->delayUs = state().delayUs;
  s->failCopies = state().failCopies;
  sigset_t all, previous;
  sigfillset(&all);
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT}) sigdelset(&all, sig);
  pthread_sigmask(SIG_SETMASK, &all, &previous);
  try {
    s->worker = std::thread(streamMain, s.get());
  } catch (...) {
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
    throw;
  }
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  return s;
}

// Lets the stream finish its queued work, then joins its thread. Called by the one caller that took the
// stream out of the tables, never with state().mu held.
void stopStream(const std::shared_ptr<Stream>& s) {
  {
    std::lock_guard<std::mutex> lock(s->mu);
    s->stopping = true;
  }
  s->work.notify_all();
  if (s->worker.joinable()) s->worker.join();
}

CUresult enqueue(Stream& s, Op op) {
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.stopping) return kErrorInvalidHandle;
  int sticky = s.status->sticky.load();
  if (sticky != kSuccess) return sticky;
  s.queue.push_back(std::move(op));
  ++s.enqueued;
  s.work.notify_one();
  return kSuccess;
}

// With state().mu held and a current device: the stream a handle names (NULL: the device's legacy
// stream, made here at first use), or nullptr for a handle that names none.
std::shared_ptr<Stream> streamFor(CUstream handle, int device) {
  if (handle == nullptr) {
    Device& d = state().devices[device];
    if (!d.legacy) d.legacy = startStream(device);
    return d.legacy;
  }
  auto it = state().streams.find(reinterpret_cast<uintptr_t>(handle));
  return it == state().streams.end() ? nullptr : it->second;
}

// ---- contexts -------------------------------------------------------------------------------------

// With state().mu held: the device's primary context is destroyed, and with it everything made in it.
// Its streams are handed back to be stopped once the lock is dropped.
void destroyContext(int device, std::vector<std::shared_ptr<Stream>>* streams) {
  State& s = state();
  for (auto it = s.ranges.begin(); it != s.ranges.end();) {
    if (it->second->device != device) {
      ++it;
      continue;
    }
    it = s.ranges.erase(it);
  }
  s.devices[device].used = 0;
  for (auto it = s.host.begin(); it != s.host.end();) {
    it = it->second.device == device ? s.host.erase(it) : std::next(it);
  }
  for (auto it = s.streams.begin(); it != s.streams.end();) {
    if (it->second->device != device) {
      ++it;
      continue;
    }
    streams->push_back(std::move(it->second));
    it = s.streams.erase(it);
  }
  if (s.devices[device].legacy) streams->push_back(std::move(s.devices[device].legacy));
  for (auto it = s.events.begin(); it != s.events.end();) {
    it = it->second->device == device ? s.events.erase(it) : std::next(it);
  }
}

// ---- configuration --------------------------------------------------------------------------------

// A knob's value: unset or empty gives `fallback`; anything but a decimal number up to `max` is refused.
bool readKnob(const char* name, unsigned long long fallback, unsigned long long max, unsigned long long* out) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') {
    *out = fallback;
    return true;
  }
  if (*text < '0' || *text > '9') return false;
  errno = 0;
  char* end = nullptr;
  unsigned long long value = std::strtoull(text, &end, 10);
  if (errno != 0 || *end != '\0' || value > max) return false;
  *out = value;
  return true;
}

void markForkedChild() {
  if (gReady.load(std::memory_order_relaxed)) gForked.store(true, std::memory_order_relaxed);
}

// Stream threads run this library's code until the process exits, so it must never be unloaded.
void pinLibrary() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&cuInit), &info) != 0 && info.dli_fname != nullptr) {
    void* self = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
    (void)self;  // held for good
  }
}

struct ErrorText {
  CUresult code;
  const char* text;
};

// cuGetErrorString's texts, as the driver words them.
constexpr ErrorText kErrorTexts[] = {
    {0, "no error"},
    {1, "invalid argument"},
    {2, "out of memory"},
    {3, "initialization error"},
    {4, "driver shutting down"},
    {100, "no CUDA-capable device is detected"},
    {101, "invalid device ordinal"},
    {200, "device kernel image is invalid"},
    {201, "invalid device context"},
    {400, "invalid resource handle"},
    {500, "named symbol not found"},
    {600, "device not ready"},
    {700, "an illegal memory access was encountered"},
    {709, "context is destroyed"},
    {712, "part or all of the requested memory range is already mapped"},
    {713, "pointer does not correspond to a registered memory region"},
    {719, "unspecified launch failure"},
    {801, "operation not supported"},
    {999, "unknown error"},
};

}  // namespace

// ---- initialization and devices -------------------------------------------------------------------

KVWIRE_DOUBLE_EXPORT CUresult cuInit(unsigned flags) {
  return guarded([&]() -> CUresult {
    if (gForked.load()) return kErrorNotInitialized;
    if (flags != 0) return kErrorInvalidValue;
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.configured) {
      unsigned long long devices = 0, delay = 0, fail = 0;
      if (!readKnob("KVWIRE_CUDA_DOUBLE_DEVICES", kDefaultDevices, kMaxDevices, &devices) ||
          !readKnob("KVWIRE_CUDA_DOUBLE_COPY_DELAY_US", 0, 60ull * 1000 * 1000, &delay) ||
          !readKnob("KVWIRE_CUDA_DOUBLE_FAIL_COPIES", 0, 1, &fail)) {
        return kErrorInvalidValue;
      }
      if (devices == 0) return kErrorNoDevice;  // a machine without GPUs
      s.delayUs = delay;
      s.failCopies = fail != 0;
      s.devices.resize(devices);
      for (unsigned long long i = 0; i < devices; ++i) {
        s.devices[i].context = new kvwire::cuda::CUctx_st;
        s.devices[i].context->device = static_cast<int>(i);
      }
      pinLibrary();
      if (pthread_atfork(nullptr, nullptr, markForkedChild) != 0) return kErrorUnknown;
      s.configured = true;
      gReady.store(true, std::memory_order_release);
    }
    return kSuccess;
  });
}

// Like the driver's, these two work before cuInit.
KVWIRE_DOUBLE_EXPORT CUresult cuDriverGetVersion(int* version) {
  if (version == nullptr) return kErrorInvalidValue;
  *version = kDriverVersion;
  return kSuccess;
}

KVWIRE_DOUBLE_EXPORT CUresult cuGetErrorString(CUresult error, const char** text) {
  if (text == nullptr) return kErrorInvalidValue;
  for (const ErrorText& e : kErrorTexts) {
    if (e.code == error) {
      *text = e.text;
      return kSuccess;
    }
  }
  *text = nullptr;
  return kErrorInvalidValue;
}

KVWIRE_DOUBLE_EXPORT CUresult cuDeviceGetCount(int* count) {
  if (!ready()) return kErrorNotInitialized;
  if (count == nullptr) return kErrorInvalidValue;
  *count = static_cast<int>(state().devices.size());  // fixed once ready
  return kSuccess;
}

KVWIRE_DOUBLE_EXPORT CUresult cuDeviceGet(CUdevice* device, int ordinal) {
  if (!ready()) return kErrorNotInitialized;
  if (device == nullptr) return kErrorInvalidValue;
  if (!validDevice(ordinal)) return kErrorInvalidDevice;
  *device = ordinal;
  return kSuccess;
}

KVWIRE_DOUBLE_EXPORT CUresult cuDeviceGetName(char* name, int length, CUdevice device) {
  if (!ready()) return kErrorNotInitialized;
  if (name == nullptr || length <= 0) return kErrorInvalidValue;
  if (!validDevice(device)) return kErrorInvalidDevice;
  std::snprintf(name, static_cast<size_t>(length), "kvwire CUDA test double #%d", device);
  return kSuccess;
}

KVWIRE_DOUBLE_EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice device) {
  if (!ready()) return kErrorNotInitialized;
  if (bytes == nullptr) return kErrorInvalidValue;
  if (!validDevice(device)) return kErrorInvalidDevice;
  *bytes = kDeviceBytes;
  return kSuccess;
}

// ---- contexts -------------------------------------------------------------------------------------

KVWIRE_DOUBLE_EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* context, CUdevice device) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    if (context == nullptr) return kErrorInvalidValue;
    if (!validDevice(device)) return kErrorInvalidDevice;
    std::lock_guard<std::mutex> lock(state().mu);
    Device& d = state().devices[device];
    ++d.refs;
    *context = d.context;
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    if (!validDevice(device)) return kErrorInvalidDevice;
    std::vector<std::shared_ptr<Stream>> doomed;
    {
      std::lock_guard<std::mutex> lock(state().mu);
      Device& d = state().devices[device];
      if (d.refs <= 0) return kErrorInvalidContext;
      if (--d.refs == 0) destroyContext(device, &doomed);
    }
    for (auto& s : doomed) stopStream(s);
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuCtxSetCurrent(CUcontext context) {
  if (!ready()) return kErrorNotInitialized;
  if (context != nullptr) {
    bool known = false;
    for (const Device& d : state().devices) known = known || d.context == context;  // fixed once ready
    if (!known) return kErrorInvalidContext;
  }
  tCurrent = context;
  return kSuccess;
}

KVWIRE_DOUBLE_EXPORT CUresult cuCtxGetCurrent(CUcontext* context) {
  if (!ready()) return kErrorNotInitialized;
  if (context == nullptr) return kErrorInvalidValue;
  *context = tCurrent;
  return kSuccess;
}

// ---- device memory --------------------------------------------------------------------------------

KVWIRE_DOUBLE_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* pointer, size_t bytes) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    if (pointer == nullptr || bytes == 0) return kErrorInvalidValue;
    Device& d = s.devices[device];
    if (bytes > kDeviceBytes) return kErrorOutOfMemory;
    const size_t extent = roundUpToPage(bytes);
    if (extent > kDeviceBytes - d.used) return kErrorOutOfMemory;

    auto range = std::make_shared<Range>();
    range->size = bytes;
    range->extent = extent;
    range->device = device;
    range->kind = Kind::kAllocated;
    range->mapping = std::make_shared<Mapping>();
    Mapping& m = *range->mapping;
    if (!fillRandom(range->tag, kTagBytes)) return kErrorUnknown;
    m.fd = memfd_create(kMemfdName, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (m.fd < 0) return kErrorOutOfMemory;
    // One page past the allocation holds the IPC trailer; sealed so no process can shrink the file
    // under a mapping (which would turn accesses into SIGBUS).
    unsigned char trailer[kTrailerBytes] = {};
    std::memcpy(trailer, kMagic, sizeof kMagic);
    const uint64_t size64 = bytes;
    std::memcpy(trailer + kTrailerSize, &size64, sizeof size64);
    std::memcpy(trailer + kTrailerTag, range->tag, kTagBytes);
    if (ftruncate(m.fd, static_cast<off_t>(extent + pageSize())) != 0 ||
        !writeAll(m.fd, trailer, sizeof trailer, static_cast<off_t>(extent)) ||
        fcntl(m.fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0 || !mapTwice(m, extent)) {
      return kErrorOutOfMemory;
    }
    // A real GPU hands out memory holding whatever it held before (another process's data, even):
    // not zeroed. So nothing here is either.
    std::memset(m.alias, 0xa5, bytes);
    range->base = reinterpret_cast<uintptr_t>(m.device);
    s.ranges[range->base] = range;
    d.used += extent;
    *pointer = range->base;
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuMemFree_v2(CUdeviceptr pointer) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    auto it = s.ranges.find(static_cast<uintptr_t>(pointer));
    if (it == s.ranges.end() || it->second->kind != Kind::kAllocated) return kErrorInvalidValue;
    s.devices[it->second->device].used -= it->second->extent;
    s.ranges.erase(it);  // unmapped now, or when the last queued copy using it is done
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuMemGetAddressRange_v2(CUdeviceptr* base, size_t* bytes, CUdeviceptr pointer) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    std::lock_guard<std::mutex> lock(state().mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    std::shared_ptr<Range> range = rangeAt(static_cast<uintptr_t>(pointer));
    if (!range) return kErrorInvalidValue;
    if (base != nullptr) *base = range->base;
    if (bytes != nullptr) *bytes = range->size;
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuPointerGetAttributes(unsigned count, int* attributes, void** data,
                                                     CUdeviceptr pointer) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    std::lock_guard<std::mutex> lock(state().mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    if (count > 0 && (attributes == nullptr || data == nullptr)) return kErrorInvalidValue;
    for (unsigned i = 0; i < count; ++i) {
      int a = attributes[i];
      if (data[i] == nullptr) return kErrorInvalidValue;
      if (a != kPointerAttributeMemoryType && a != kPointerAttributeDeviceOrdinal &&
          a != kPointerAttributeRangeStartAddr && a != kPointerAttributeRangeSize) {
        return kErrorInvalidValue;
      }
    }
    const uintptr_t p = static_cast<uintptr_t>(pointer);
    unsigned type = kMemoryTypeNone;
    int ordinal = kDeviceOrdinalNone;
    CUdeviceptr start = 0;
    size_t size = 0;
    if (std::shared_ptr<Range> range = rangeAt(p)) {
      type = kMemoryTypeDevice;
      ordinal = range->device;
      start = range->base;
      size = range->size;
    } else if (const HostRegistration* reg = registrationAt(p)) {
      type = kMemoryTypeHost;
      ordinal = reg->device;
      start = reg->base;
      size = reg->size;
    }
    for (unsigned i = 0; i < count; ++i) {
      switch (attributes[i]) {
        case kPointerAttributeMemoryType:
          *static_cast<unsigned*>(data[i]) = type;
          break;
        case kPointerAttributeDeviceOrdinal:
          *static_cast<int*>(data[i]) = ordinal;
          break;
        case kPointerAttributeRangeStartAddr:
          *static_cast<CUdeviceptr*>(data[i]) = start;
          break;
        case kPointerAttributeRangeSize:
          *static_cast<size_t*>(data[i]) = size;
          break;
      }
    }
    return kSuccess;
  });
}

// ---- copies ---------------------------------------------------------------------------------------

namespace {

// A synchronous copy between host memory and one device range: resolves the device side (alias) with
// the lock held, keeping the mapping alive, and copies without the lock.
CUresult copySync(uintptr_t devicePointer, uintptr_t hostPointer, size_t bytes, bool toDevice) {
  std::shared_ptr<Range> range;
  {
    std::lock_guard<std::mutex> lock(state().mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    if (bytes == 0) return kSuccess;
    if (devicePointer == 0 || hostPointer == 0 || overflows(devicePointer, bytes) ||
        overflows(hostPointer, bytes)) {
      return kErrorInvalidValue;
    }
    std::shared_ptr<Range> unused;
    if (locate(devicePointer, bytes, &range) != Place::kDevice) return kErrorInvalidValue;
    if (locate(hostPointer, bytes, &unused) != Place::kHost) return kErrorInvalidValue;
  }
  auto* alias = static_cast<unsigned char*>(range->mapping->alias) + (devicePointer - range->base);
  if (toDevice) {
    std::memmove(alias, reinterpret_cast<const void*>(hostPointer), bytes);
  } else {
    std::memmove(reinterpret_cast<void*>(hostPointer), alias, bytes);
  }
  return kSuccess;
}

}  // namespace

// Synchronous, like the real cuMemsetD8 on memory of the current device: inside one device range.
KVWIRE_DOUBLE_EXPORT CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t count) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    std::shared_ptr<Range> range;
    {
      std::lock_guard<std::mutex> lock(state().mu);
      int device = 0;
      if (CUresult r = currentDevice(&device); r != kSuccess) return r;
      if (count == 0) return kSuccess;
      if (dst == 0 || overflows(static_cast<uintptr_t>(dst), count)) return kErrorInvalidValue;
      if (locate(static_cast<uintptr_t>(dst), count, &range) != Place::kDevice) return kErrorInvalidValue;
    }
    std::memset(static_cast<unsigned char*>(range->mapping->alias) + (static_cast<uintptr_t>(dst) - range->base), value, count);
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    return copySync(static_cast<uintptr_t>(dst), reinterpret_cast<uintptr_t>(src), bytes, true);
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    return copySync(static_cast<uintptr_t>(src), reinterpret_cast<uintptr_t>(dst), bytes, false);
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream stream) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    std::shared_ptr<Stream> s;
    Op op;
    {
      std::lock_guard<std::mutex> lock(state().mu);
      int device = 0;
      if (CUresult r = currentDevice(&device); r != kSuccess) return r;
      if (stream != nullptr && state().streams.count(reinterpret_cast<uintptr_t>(stream)) == 0) {
        return kErrorInvalidHandle;
      }
      if (bytes == 0) return kSuccess;
      const uintptr_t d = static_cast<uintptr_t>(dst), sp = static_cast<uintptr_t>(src);
      if (d == 0 || sp == 0 || overflows(d, bytes) || overflows(sp, bytes)) return kErrorInvalidValue;
      std::shared_ptr<Range> dstRange, srcRange;
      Place dstPlace = locate(d, bytes, &dstRange), srcPlace = locate(sp, bytes, &srcRange);
      if (dstPlace == Place::kInvalid || srcPlace == Place::kInvalid) return kErrorInvalidValue;
      op.bytes = bytes;
      if (dstRange) {
        op.dst = static_cast<unsigned char*>(dstRange->mapping->alias) + (d - dstRange->base);
        op.keepDst = dstRange->mapping;
      } else {
        op.dst = reinterpret_cast<unsigned char*>(d);
      }
      if (srcRange) {
        op.src = static_cast<const unsigned char*>(srcRange->mapping->alias) + (sp - srcRange->base);
        op.keepSrc = srcRange->mapping;
      } else {
        op.src = reinterpret_cast<const unsigned char*>(sp);
      }
      s = streamFor(stream, device);
    }
    return enqueue(*s, std::move(op));
  });
}

// ---- host registration ----------------------------------------------------------------------------

KVWIRE_DOUBLE_EXPORT CUresult cuMemHostRegister_v2(void* pointer, size_t bytes, unsigned flags) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    const uintptr_t p = reinterpret_cast<uintptr_t>(pointer);
    if (p == 0 || bytes == 0 || overflows(p, bytes) || (flags & ~kHostRegisterFlags) != 0) {
      return kErrorInvalidValue;
    }
    std::shared_ptr<Range> unused;
    if (locate(p, bytes, &unused) != Place::kHost) return kErrorInvalidValue;  // device memory is not host memory
    auto next = s.host.lower_bound(p);
    if (next != s.host.end() && next->first - p < bytes) return kErrorHostMemoryAlreadyRegistered;
    if (next != s.host.begin()) {
      auto prev = std::prev(next);
      if (p - prev->first < prev->second.size) return kErrorHostMemoryAlreadyRegistered;
    }
    if (!hostRangeMapped(p, bytes)) return kErrorInvalidValue;  // the driver could not pin it
    s.host[p] = HostRegistration{p, bytes, device};
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuMemHostUnregister(void* pointer) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    if (s.host.erase(reinterpret_cast<uintptr_t>(pointer)) == 0) return kErrorHostMemoryNotRegistered;
    return kSuccess;
  });
}

// ---- IPC ------------------------------------------------------------------------------------------

KVWIRE_DOUBLE_EXPORT CUresult cuIpcGetMemHandle(CUipcMemHandle* handle, CUdeviceptr pointer) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    std::lock_guard<std::mutex> lock(state().mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    if (handle == nullptr) return kErrorInvalidValue;
    std::shared_ptr<Range> range = rangeAt(static_cast<uintptr_t>(pointer));
    if (!range || range->kind != Kind::kAllocated) return kErrorInvalidValue;
    CUipcMemHandle h;
    std::memset(&h, 0, sizeof h);
    const int32_t pid = getpid(), fd = range->mapping->fd, dev = range->device;
    const uint64_t size = range->size;
    std::memcpy(h.reserved, kMagic, sizeof kMagic);
    std::memcpy(h.reserved + kHandlePid, &pid, sizeof pid);
    std::memcpy(h.reserved + kHandleFd, &fd, sizeof fd);
    std::memcpy(h.reserved + kHandleSize, &size, sizeof size);
    std::memcpy(h.reserved + kHandleDevice, &dev, sizeof dev);
    std::memcpy(h.reserved + kHandleTag, range->tag, kTagBytes);
    *handle = h;
    return kSuccess;
  });
}

namespace {

// Whether fd, by /proc path, is the double's memfd (readlink names it exactly).
bool isDoubleMemfd(const char* procPath) {
  char link[sizeof kMemfdLink + 1];
  ssize_t n = readlink(procPath, link, sizeof link);
  return n == static_cast<ssize_t>(sizeof kMemfdLink - 1) && std::memcmp(link, kMemfdLink, n) == 0;
}

// Opens and maps the memfd a handle names, in another process, checking it is what the handle says.
CUresult openExported(pid_t pid, int fd, uint64_t size, const unsigned char* tag, std::shared_ptr<Mapping>* out) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/fd/%d", static_cast<int>(pid), fd);
  // Look before opening, so that a forged handle cannot make the double open (with whatever side
  // effects) an arbitrary file of another process; look again at what was opened, which cannot change.
  if (!isDoubleMemfd(path)) return kErrorInvalidValue;
  auto m = std::make_shared<Mapping>();
  m->fd = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (m->fd < 0) return kErrorInvalidValue;
  std::snprintf(path, sizeof path, "/proc/self/fd/%d", m->fd);
  if (!isDoubleMemfd(path)) return kErrorInvalidValue;
  const size_t extent = roundUpToPage(size);
  struct stat st;
  if (fstat(m->fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size < 0 ||
      static_cast<uint64_t>(st.st_size) != extent + pageSize()) {
    return kErrorInvalidValue;
  }
  const int required = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
  int seals = fcntl(m->fd, F_GET_SEALS);
  if (seals < 0 || (seals & required) != required) return kErrorInvalidValue;
  unsigned char trailer[kTrailerBytes];
  if (!readAll(m->fd, trailer, sizeof trailer, static_cast<off_t>(extent))) return kErrorInvalidValue;
  uint64_t trailerSize = 0;
  std::memcpy(&trailerSize, trailer + kTrailerSize, sizeof trailerSize);
  if (std::memcmp(trailer, kMagic, sizeof kMagic) != 0 || trailerSize != size ||
      std::memcmp(trailer + kTrailerTag, tag, kTagBytes) != 0) {
    return kErrorInvalidValue;
  }
  if (!mapTwice(*m, extent)) return kErrorOutOfMemory;
  close(m->fd);  // the mappings hold the memory
  m->fd = -1;
  *out = std::move(m);
  return kSuccess;
}

}  // namespace

KVWIRE_DOUBLE_EXPORT CUresult cuIpcOpenMemHandle_v2(CUdeviceptr* pointer, CUipcMemHandle handle, unsigned flags) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    if (pointer == nullptr || (flags & ~kIpcMemLazyEnablePeerAccess) != 0) return kErrorInvalidValue;
    const unsigned char* h = handle.reserved;
    int32_t pid = 0, fd = 0, exportedDevice = 0;
    uint64_t size = 0;
    std::memcpy(&pid, h + kHandlePid, sizeof pid);
    std::memcpy(&fd, h + kHandleFd, sizeof fd);
    std::memcpy(&size, h + kHandleSize, sizeof size);
    std::memcpy(&exportedDevice, h + kHandleDevice, sizeof exportedDevice);
    if (std::memcmp(h, kMagic, sizeof kMagic) != 0) return kErrorInvalidValue;
    for (size_t i = kHandleDevice + sizeof exportedDevice; i < kHandleTag; ++i) {
      if (h[i] != 0) return kErrorInvalidValue;
    }
    for (size_t i = kHandleTag + kTagBytes; i < kIpcHandleBytes; ++i) {
      if (h[i] != 0) return kErrorInvalidValue;
    }
    if (pid <= 0 || fd < 0 || size == 0 || size > kDeviceBytes || exportedDevice < 0) return kErrorInvalidValue;
    if (pid == getpid()) return kErrorInvalidValue;  // the driver will not open a handle where it was made
    const unsigned char* tag = h + kHandleTag;

    // Opened already (in this context): the same pointer, one more reference.
    for (auto& entry : s.ranges) {
      Range& r = *entry.second;
      if (r.kind == Kind::kIpcOpened && r.device == device && r.exporter == pid && r.exporterFd == fd &&
          r.size == size && std::memcmp(r.tag, tag, kTagBytes) == 0) {
        ++r.ipcRefs;
        *pointer = r.base;
        return kSuccess;
      }
    }
    std::shared_ptr<Mapping> mapping;
    if (CUresult r = openExported(pid, fd, size, tag, &mapping); r != kSuccess) return r;
    auto range = std::make_shared<Range>();
    range->base = reinterpret_cast<uintptr_t>(mapping->device);
    range->size = size;
    range->extent = mapping->length;
    range->device = device;
    range->kind = Kind::kIpcOpened;
    range->mapping = std::move(mapping);
    std::memcpy(range->tag, tag, kTagBytes);
    range->exporter = pid;
    range->exporterFd = fd;
    range->ipcRefs = 1;
    s.ranges[range->base] = range;
    *pointer = range->base;
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuIpcCloseMemHandle(CUdeviceptr pointer) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    auto it = s.ranges.find(static_cast<uintptr_t>(pointer));
    if (it == s.ranges.end() || it->second->kind != Kind::kIpcOpened) return kErrorInvalidValue;
    if (--it->second->ipcRefs == 0) s.ranges.erase(it);
    return kSuccess;
  });
}

// ---- streams and events ---------------------------------------------------------------------------

KVWIRE_DOUBLE_EXPORT CUresult cuStreamCreate(CUstream* stream, unsigned flags) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    if (stream == nullptr || (flags & ~kStreamNonBlocking) != 0) return kErrorInvalidValue;
    std::shared_ptr<Stream> created;
    try {
      created = startStream(device);
    } catch (const std::system_error&) {
      return kErrorOutOfMemory;
    }
    uintptr_t handle = newHandle();
    s.streams[handle] = std::move(created);
    *stream = reinterpret_cast<CUstream>(handle);
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuStreamDestroy_v2(CUstream stream) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    std::shared_ptr<Stream> doomed;
    {
      State& s = state();
      std::lock_guard<std::mutex> lock(s.mu);
      int device = 0;
      if (CUresult r = currentDevice(&device); r != kSuccess) return r;
      auto it = s.streams.find(reinterpret_cast<uintptr_t>(stream));
      if (it == s.streams.end()) return kErrorInvalidHandle;
      doomed = std::move(it->second);
      s.streams.erase(it);
    }
    stopStream(doomed);  // its queued work is done first
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuStreamSynchronize(CUstream stream) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    std::shared_ptr<Stream> s;
    {
      State& st = state();
      std::lock_guard<std::mutex> lock(st.mu);
      int device = 0;
      if (CUresult r = currentDevice(&device); r != kSuccess) return r;
      if (stream == nullptr) {
        s = st.devices[device].legacy;  // none yet: nothing was ever queued on it
        if (!s) return kSuccess;
      } else {
        s = streamFor(stream, device);
        if (!s) return kErrorInvalidHandle;
      }
    }
    std::unique_lock<std::mutex> lock(s->mu);
    const unsigned long long target = s->enqueued;
    s->drained.wait(lock, [&] { return s->completed >= target; });
    return s->status->sticky.load();
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuEventCreate(CUevent* event, unsigned flags) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    if (event == nullptr || (flags & ~kEventFlags) != 0) return kErrorInvalidValue;
    auto created = std::make_shared<Event>();
    created->device = device;
    uintptr_t handle = newHandle();
    s.events[handle] = std::move(created);
    *event = reinterpret_cast<CUevent>(handle);
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuEventDestroy_v2(CUevent event) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    // A pending record stays queued (the marker is shared) and completes unobserved.
    if (s.events.erase(reinterpret_cast<uintptr_t>(event)) == 0) return kErrorInvalidHandle;
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuEventRecord(CUevent event, CUstream stream) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    std::shared_ptr<Event> e;
    std::shared_ptr<Stream> s;
    {
      State& st = state();
      std::lock_guard<std::mutex> lock(st.mu);
      int device = 0;
      if (CUresult r = currentDevice(&device); r != kSuccess) return r;
      auto it = st.events.find(reinterpret_cast<uintptr_t>(event));
      if (it == st.events.end()) return kErrorInvalidHandle;
      e = it->second;
      s = streamFor(stream, device);
      if (!s) return kErrorInvalidHandle;
    }
    auto marker = std::make_shared<Marker>();
    marker->status = s->status;
    Op op;
    op.marker = marker;
    // The event names its latest record; set under the event's lock, in the stream's order of
    // records, so a query never looks at an older marker than the last record returned.
    std::lock_guard<std::mutex> eventLock(e->mu);
    if (CUresult r = enqueue(*s, std::move(op)); r != kSuccess) return r;
    e->last = std::move(marker);
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuEventQuery(CUevent event) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    std::shared_ptr<Event> e;
    {
      State& s = state();
      std::lock_guard<std::mutex> lock(s.mu);
      int device = 0;
      if (CUresult r = currentDevice(&device); r != kSuccess) return r;
      auto it = s.events.find(reinterpret_cast<uintptr_t>(event));
      if (it == s.events.end()) return kErrorInvalidHandle;
      e = it->second;
    }
    std::shared_ptr<Marker> marker;
    {
      std::lock_guard<std::mutex> lock(e->mu);
      marker = e->last;
    }
    if (!marker) return kSuccess;  // never recorded
    int sticky = marker->status->sticky.load();
    if (sticky != kSuccess) return sticky;
    if (!marker->done.load(std::memory_order_acquire)) return kErrorNotReady;
    sticky = marker->status->sticky.load();  // a copy before the marker may have failed meanwhile
    return sticky != kSuccess ? sticky : kSuccess;
  });
}

// ---- modules and kernels --------------------------------------------------------------------------
// A module is PTX text; the double cannot run PTX. It records the entry points the text declares and
// runs the kernels it knows by name as host code with the same contract (kvwire_copy_runs: native/
// cuda/kernels/copy_runs.cu), on the stream, in order, with the faults a GPU would take.

namespace {

struct Module {
  int device = 0;
  std::set<std::string> entries;
};
struct Function {
  int device = 0;
  std::string name;
};
std::map<uintptr_t, std::shared_ptr<Module>>& modules() {
  static auto* m = new std::map<uintptr_t, std::shared_ptr<Module>>;
  return *m;
}
std::map<uintptr_t, std::shared_ptr<Function>>& functions() {
  static auto* f = new std::map<uintptr_t, std::shared_ptr<Function>>;
  return *f;
}
constexpr CUresult kErrorInvalidImage = 200;
constexpr CUresult kErrorNotFound = 500;
constexpr CUresult kErrorNotSupported = 801;

// kvwire_copy_runs(const Run* runs, unsigned count), Run = {dst, src, bytes} (u64 each): every run
// copied. A GPU faults on an address it cannot reach: here, anything but device memory of a range
// (allocated or opened) or host memory registered with the driver.
CUresult copyRunsOnHost(CUdeviceptr table, unsigned count) {
  struct Run {
    uint64_t dst, src, bytes;
  };
  struct Piece {
    unsigned char* dst;
    const unsigned char* src;
    size_t bytes;
  };
  std::vector<Piece> pieces;
  std::vector<std::shared_ptr<Mapping>> keep;
  {
    std::lock_guard<std::mutex> lock(state().mu);
    const size_t tableBytes = size_t{count} * sizeof(Run);
    std::shared_ptr<Range> range;
    if (count == 0) return kSuccess;
    if (overflows(static_cast<uintptr_t>(table), tableBytes) ||
        locate(static_cast<uintptr_t>(table), tableBytes, &range) != Place::kDevice) {
      return kErrorIllegalAddress;
    }
    std::vector<Run> runs(count);
    std::memcpy(runs.data(), static_cast<unsigned char*>(range->mapping->alias) + (table - range->base), tableBytes);
    keep.push_back(range->mapping);
    auto reach = [&](uint64_t p, uint64_t bytes, unsigned char** out) {
      std::shared_ptr<Range> r;
      if (overflows(static_cast<uintptr_t>(p), bytes)) return false;
      Place place = locate(static_cast<uintptr_t>(p), bytes, &r);
      if (place == Place::kDevice) {
        *out = static_cast<unsigned char*>(r->mapping->alias) + (p - r->base);
        keep.push_back(r->mapping);
        return true;
      }
      if (place != Place::kHost) return false;
      auto h = state().host.upper_bound(static_cast<uintptr_t>(p));
      if (h == state().host.begin()) return false;
      --h;
      if (p < h->second.base || p + bytes > h->second.base + h->second.size) return false;
      *out = reinterpret_cast<unsigned char*>(p);
      return true;
    };
    for (const Run& run : runs) {
      if (run.bytes == 0) continue;
      unsigned char *dst = nullptr, *src = nullptr;
      if (!reach(run.dst, run.bytes, &dst) || !reach(run.src, run.bytes, &src)) return kErrorIllegalAddress;
      pieces.push_back({dst, src, static_cast<size_t>(run.bytes)});
    }
  }
  for (const Piece& p : pieces) std::memmove(p.dst, p.src, p.bytes);
  return kSuccess;
}

}  // namespace

KVWIRE_DOUBLE_EXPORT CUresult cuModuleLoadData(CUmodule* module, const void* image) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    std::lock_guard<std::mutex> lock(state().mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    if (module == nullptr || image == nullptr) return kErrorInvalidValue;
    const std::string text(static_cast<const char*>(image), strnlen(static_cast<const char*>(image), 1u << 24));
    if (text.find(".version") == std::string::npos || text.find(".target") == std::string::npos) return kErrorInvalidImage;
    auto m = std::make_shared<Module>();
    m->device = device;
    for (size_t at = text.find(".entry "); at != std::string::npos; at = text.find(".entry ", at + 7)) {
      size_t from = at + 7, to = from;
      while (to < text.size() && (std::isalnum(static_cast<unsigned char>(text[to])) || text[to] == '_')) ++to;
      if (to > from) m->entries.insert(text.substr(from, to - from));
    }
    const uintptr_t handle = newHandle();
    modules()[handle] = m;
    *module = reinterpret_cast<CUmodule>(handle);
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuModuleGetFunction(CUfunction* function, CUmodule module, const char* name) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    std::lock_guard<std::mutex> lock(state().mu);
    int device = 0;
    if (CUresult r = currentDevice(&device); r != kSuccess) return r;
    if (function == nullptr || name == nullptr) return kErrorInvalidValue;
    auto it = modules().find(reinterpret_cast<uintptr_t>(module));
    if (it == modules().end()) return kErrorInvalidHandle;
    if (it->second->entries.count(name) == 0) return kErrorNotFound;
    auto f = std::make_shared<Function>();
    f->device = it->second->device;
    f->name = name;
    const uintptr_t handle = newHandle();
    functions()[handle] = f;
    *function = reinterpret_cast<CUfunction>(handle);
    return kSuccess;
  });
}

KVWIRE_DOUBLE_EXPORT CUresult cuLaunchKernel(CUfunction function, unsigned gridX, unsigned gridY, unsigned gridZ,
                                             unsigned blockX, unsigned blockY, unsigned blockZ, unsigned sharedBytes,
                                             CUstream stream, void** params, void** extra) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    std::shared_ptr<Stream> s;
    Op op;
    {
      std::lock_guard<std::mutex> lock(state().mu);
      int device = 0;
      if (CUresult r = currentDevice(&device); r != kSuccess) return r;
      auto it = functions().find(reinterpret_cast<uintptr_t>(function));
      if (it == functions().end() || it->second->device != device) return kErrorInvalidHandle;
      if (gridX == 0 || gridY == 0 || gridZ == 0 || blockX == 0 || blockY == 0 || blockZ == 0 ||
          uint64_t{blockX} * blockY * blockZ > 1024 || sharedBytes > 48 * 1024 || extra != nullptr || params == nullptr) {
        return kErrorInvalidValue;
      }
      if (stream != nullptr && state().streams.count(reinterpret_cast<uintptr_t>(stream)) == 0) return kErrorInvalidHandle;
      if (it->second->name != "kvwire_copy_runs") return kErrorNotSupported;
      // The parameters are read at launch, as the driver does.
      const CUdeviceptr table = *static_cast<const CUdeviceptr*>(params[0]);
      const unsigned count = *static_cast<const unsigned*>(params[1]);
      op.run = [table, count] { return copyRunsOnHost(table, count); };
      s = streamFor(stream, device);
    }
    return enqueue(*s, std::move(op));
  });
}

// Pageable host source: its bytes are taken at the call, as the driver stages them.
KVWIRE_DOUBLE_EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream stream) {
  return guarded([&]() -> CUresult {
    if (!ready()) return kErrorNotInitialized;
    std::shared_ptr<Stream> s;
    Op op;
    {
      std::lock_guard<std::mutex> lock(state().mu);
      int device = 0;
      if (CUresult r = currentDevice(&device); r != kSuccess) return r;
      if (stream != nullptr && state().streams.count(reinterpret_cast<uintptr_t>(stream)) == 0) return kErrorInvalidHandle;
      if (bytes == 0) return kSuccess;
      std::shared_ptr<Range> range;
      if (src == nullptr || dst == 0 || overflows(static_cast<uintptr_t>(dst), bytes) ||
          locate(static_cast<uintptr_t>(dst), bytes, &range) != Place::kDevice) {
        return kErrorInvalidValue;
      }
      op.staged = std::make_shared<std::vector<unsigned char>>(static_cast<const unsigned char*>(src),
                                                               static_cast<const unsigned char*>(src) + bytes);
      op.dst = static_cast<unsigned char*>(range->mapping->alias) + (dst - range->base);
      op.keepDst = range->mapping;
      op.src = op.staged->data();
      op.bytes = bytes;
      s = streamFor(stream, device);
    }
    return enqueue(*s, std::move(op));
  });
}
