#include "driver.h"

#include <dlfcn.h>

#include <cstdlib>
#include <memory>
#include <mutex>

namespace kvwire {
namespace cuda {

namespace {

struct Loaded {
  Driver driver;
  Status failure;  // why there is no driver (ok when loaded)
  std::mutex contextsMutex;
  std::vector<CUcontext> contexts;  // primary contexts retained so far, by device
};

Loaded& load() {
  static Loaded* loaded = [] {
    auto* l = new Loaded();  // never freed: the driver stays loaded for the life of the process
    const char* override = std::getenv("KVWIRE_CUDA_DRIVER");
    const bool chosen = override != nullptr && *override != '\0';
    Driver& d = l->driver;
    d.path = chosen ? override : "libcuda.so.1";
    void* lib = dlopen(d.path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* why = dlerror();
      l->failure = {Code::Unavailable, chosen ? "CUDA driver " + d.path + " (KVWIRE_CUDA_DRIVER) could not be loaded: " +
                                                    (why ? why : "unknown error")
                                              : std::string("no CUDA driver: libcuda.so.1 not found (") +
                                                    (why ? why : "unknown error") + ")"};
      return l;
    }
    if (const auto* tag = static_cast<const char*>(dlsym(lib, "kvwire_cuda_test_double"))) d.testDouble = tag;
#define KVWIRE_CUDA_RESOLVE(symbol, member, params)                                                               \
  d.member = reinterpret_cast<decltype(d.member)>(dlsym(lib, #symbol));                                          \
  if (d.member == nullptr) {                                                                                      \
    l->failure = {Code::Unavailable, "CUDA driver " + d.path + " lacks " #symbol " (driver too old?)"};           \
    return l;                                                                                                     \
  }
    KVWIRE_CUDA_ENTRY_POINTS(KVWIRE_CUDA_RESOLVE)
#undef KVWIRE_CUDA_RESOLVE
    if (CUresult r = d.init(0); r != kSuccess) {
      l->failure = {Code::Unavailable, r == kErrorNoDevice ? "no CUDA device (cuInit: " + d.describe(r) + ")"
                                                           : "CUDA driver " + d.path + " failed to initialise: " + d.describe(r)};
      return l;
    }
    d.driverGetVersion(&d.version);
    if (CUresult r = d.deviceGetCount(&d.deviceCount); r != kSuccess || d.deviceCount <= 0) {
      l->failure = {Code::Unavailable, "no CUDA device (cuDeviceGetCount: " + d.describe(r) + ")"};
      return l;
    }
    l->contexts.assign(static_cast<size_t>(d.deviceCount), nullptr);
    return l;
  }();
  return *loaded;
}

}  // namespace

std::string Driver::describe(CUresult result) const {
  const char* text = nullptr;
  if (getErrorString == nullptr || getErrorString(result, &text) != kSuccess || text == nullptr) text = "unknown error";
  return std::string(text) + " (CUDA error " + std::to_string(result) + ")";
}

Status Driver::fail(const std::string& what, CUresult result) const {
  return {result == kErrorInvalidValue ? Code::InvalidParam : Code::Backend, what + ": " + describe(result)};
}

Result<const Driver*> driver() {
  Loaded& l = load();
  if (!l.failure.isOk()) return l.failure;
  return static_cast<const Driver*>(&l.driver);
}

Status useDevice(int device) {
  auto d = driver();
  if (!d.isOk()) return d.status();
  const Driver& drv = *d.value();
  if (device < 0 || device >= drv.deviceCount)
    return {Code::InvalidParam, "device " + std::to_string(device) + " does not exist (this machine has " +
                                    std::to_string(drv.deviceCount) + " CUDA device" + (drv.deviceCount == 1 ? "" : "s") + ")"};
  Loaded& l = load();
  CUcontext ctx = nullptr;
  {
    std::lock_guard<std::mutex> lock(l.contextsMutex);
    ctx = l.contexts[static_cast<size_t>(device)];
    if (ctx == nullptr) {
      CUdevice dev = 0;
      if (CUresult r = drv.deviceGet(&dev, device); r != kSuccess) return drv.fail("cuDeviceGet", r);
      if (CUresult r = drv.primaryCtxRetain(&ctx, dev); r != kSuccess) return drv.fail("cuDevicePrimaryCtxRetain", r);
      l.contexts[static_cast<size_t>(device)] = ctx;
    }
  }
  if (CUresult r = drv.ctxSetCurrent(ctx); r != kSuccess) return drv.fail("cuCtxSetCurrent", r);
  return Status::ok();
}

Result<std::vector<DeviceInfo>> devices() {
  auto d = driver();
  if (!d.isOk()) return d.status();
  const Driver& drv = *d.value();
  std::vector<DeviceInfo> out;
  for (int i = 0; i < drv.deviceCount; ++i) {
    CUdevice dev = 0;
    if (CUresult r = drv.deviceGet(&dev, i); r != kSuccess) return drv.fail("cuDeviceGet", r);
    DeviceInfo info;
    info.ordinal = i;
    char name[256] = {};
    if (drv.deviceGetName(name, sizeof name - 1, dev) == kSuccess) info.name = name;
    size_t total = 0;
    if (drv.deviceTotalMem(&total, dev) == kSuccess) info.totalBytes = total;
    out.push_back(std::move(info));
  }
  return out;
}

}  // namespace cuda
}  // namespace kvwire
