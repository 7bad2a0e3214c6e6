#include "memory_ops.h"

#include <cstring>

#include "../cuda/vram.h"

namespace kvwire {

namespace {

class HostOps : public MemoryOps {
 public:
  Status write(const LocalRegion& region, uint64_t offset, const uint8_t* src, uint64_t length) const override {
    if (length != 0) std::memcpy(region.ptr() + offset, src, length);
    return Status::ok();
  }
  Status read(const LocalRegion& region, uint64_t offset, uint8_t* dst, uint64_t length) const override {
    if (length != 0) std::memcpy(dst, region.ptr() + offset, length);
    return Status::ok();
  }
};

class CudaOps : public MemoryOps {
 public:
  Status write(const LocalRegion& region, uint64_t offset, const uint8_t* src, uint64_t length) const override {
    return cuda::copyToDevice(static_cast<int>(region.info.deviceId), region.info.base + offset, src, length);
  }
  Status read(const LocalRegion& region, uint64_t offset, uint8_t* dst, uint64_t length) const override {
    return cuda::copyFromDevice(static_cast<int>(region.info.deviceId), dst, region.info.base + offset, length);
  }
};

}  // namespace

const MemoryOps& memoryOps(MemKind kind) {
  static const HostOps host;
  static const CudaOps cuda;
  return kind == MemKind::Vram ? static_cast<const MemoryOps&>(cuda) : host;
}

}  // namespace kvwire
