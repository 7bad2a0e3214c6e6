// Local bytes of a region, whatever memory it is: the one seam through which the core reads and
// writes them (host memory: memcpy; VRAM: the CUDA driver). Backends move host memory only; a
// device address never reaches a host copy.
#pragma once
#include <cstdint>

#include "status.h"
#include "transfer.h"

namespace kvwire {

class MemoryOps {
 public:
  virtual ~MemoryOps() = default;
  // [offset, offset + length) lies inside the region (checked by the caller).
  virtual Status write(const LocalRegion& region, uint64_t offset, const uint8_t* src, uint64_t length) const = 0;
  virtual Status read(const LocalRegion& region, uint64_t offset, uint8_t* dst, uint64_t length) const = 0;
};

// The operations for a region of this kind.
const MemoryOps& memoryOps(MemKind kind);

}  // namespace kvwire
