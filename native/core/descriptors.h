// Descriptor validation and coalescing: pure functions, no backend, no Node.
#pragma once
#include <cstdint>
#include <vector>

#include "status.h"
#include "transfer.h"

namespace kvwire {

// A descriptor list as the binding hands it over: parallel arrays, one region. `addresses` are
// measured in the same space as the RegionBounds they are checked against (the core uses offsets
// from the region start, so base is 0).
struct DescriptorSpan {
  const uint64_t* addresses = nullptr;
  const uint64_t* lengths = nullptr;
  size_t count = 0;
};

struct RegionBounds {
  uint64_t base = 0;
  uint64_t length = 0;
  const char* side = "local";  // "local" or "remote", used in messages
  const std::string* name = nullptr;
};

// Checks one descriptor lies inside [base, base+length) without overflow. Returns the first bad index.
Status checkBounds(const DescriptorSpan& list, const RegionBounds& region);

// Validates a local/remote pair (equal count, equal per-index lengths, no zero lengths, bounds) and
// coalesces runs that are adjacent on both sides. `localPtr` maps the local base to a pointer.
Result<std::vector<Segment>> planSegments(const DescriptorSpan& local, const RegionBounds& localRegion,
                                          uint8_t* localPtr, const DescriptorSpan& remote,
                                          const RegionBounds& remoteRegion);

// A local gather/scatter: copies run i of lengths[i] bytes from src+srcOffsets[i] to
// dst+dstOffsets[i]. Every run is checked against both buffers first (overflow-safe, first bad
// index), so a bad list copies nothing.
Status copyRuns(uint8_t* dst, uint64_t dstLength, const uint64_t* dstOffsets, const uint8_t* src, uint64_t srcLength,
                const uint64_t* srcOffsets, const uint64_t* lengths, size_t count);

}  // namespace kvwire
