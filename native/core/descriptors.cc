#include "descriptors.h"

#include <cstring>

#include <string>

namespace kvwire {

Status checkBounds(const DescriptorSpan& list, const RegionBounds& region) {
  const uint64_t end = region.base + region.length;
  for (size_t i = 0; i < list.count; ++i) {
    const uint64_t a = list.addresses[i], n = list.lengths[i];
    if (n == 0)
      return {Code::InvalidParam, std::string(region.side) + " descriptor " + std::to_string(i) + " has length 0",
              static_cast<int64_t>(i)};
    // a >= base and n <= end - a, written so neither side can overflow.
    if (a < region.base || a > end || n > end - a)
      return {Code::InvalidParam,
              std::string(region.side) + " descriptor " + std::to_string(i) + " (offset " +
                  std::to_string(a) + ", length " + std::to_string(n) +
                  ") lies outside region '" + (region.name ? *region.name : "") + "' (" +
                  std::to_string(region.length) + " bytes)",
              static_cast<int64_t>(i)};
  }
  return Status::ok();
}

Result<std::vector<Segment>> planSegments(const DescriptorSpan& local, const RegionBounds& localRegion,
                                          uint8_t* localPtr, const DescriptorSpan& remote,
                                          const RegionBounds& remoteRegion) {
  if (local.count != remote.count)
    return Status(Code::InvalidParam, "local list has " + std::to_string(local.count) +
                                          " descriptors but remote list has " + std::to_string(remote.count));
  if (local.count == 0) return Status(Code::InvalidParam, "descriptor lists are empty");
  if (local.count > UINT32_MAX) return Status(Code::InvalidParam, "too many descriptors in one transfer");
  for (size_t i = 0; i < local.count; ++i)
    if (local.lengths[i] != remote.lengths[i])
      return Status(Code::InvalidParam,
                    "descriptor " + std::to_string(i) + " length differs: local " + std::to_string(local.lengths[i]) +
                        " bytes, remote " + std::to_string(remote.lengths[i]) + " bytes",
                    static_cast<int64_t>(i));
  Status st = checkBounds(local, localRegion);
  if (!st) return st;
  st = checkBounds(remote, remoteRegion);
  if (!st) return st;

  std::vector<Segment> segs;
  segs.reserve(local.count);
  for (size_t i = 0; i < local.count; ++i) {
    uint8_t* l = localPtr + (local.addresses[i] - localRegion.base);
    const uint64_t r = remote.addresses[i] - remoteRegion.base;
    const uint64_t n = local.lengths[i];
    if (!segs.empty()) {
      Segment& last = segs.back();
      if (last.local + last.length == l && last.remoteOffset + last.length == r) {
        last.length += n;
        continue;
      }
    }
    segs.push_back({l, r, n, static_cast<uint32_t>(i)});
  }
  return segs;
}

Status copyRuns(uint8_t* dst, uint64_t dstLength, const uint64_t* dstOffsets, const uint8_t* src, uint64_t srcLength,
                const uint64_t* srcOffsets, const uint64_t* lengths, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    const uint64_t n = lengths[i];
    if (dstOffsets[i] > dstLength || n > dstLength - dstOffsets[i])
      return Status(Code::InvalidParam, "run " + std::to_string(i) + " (" + std::to_string(n) + " bytes at " +
                                           std::to_string(dstOffsets[i]) + ") is outside the destination (" +
                                           std::to_string(dstLength) + " bytes)", static_cast<int64_t>(i));
    if (srcOffsets[i] > srcLength || n > srcLength - srcOffsets[i])
      return Status(Code::InvalidParam, "run " + std::to_string(i) + " (" + std::to_string(n) + " bytes at " +
                                           std::to_string(srcOffsets[i]) + ") is outside the source (" +
                                           std::to_string(srcLength) + " bytes)", static_cast<int64_t>(i));
  }
  for (size_t i = 0; i < count; ++i) std::memmove(dst + dstOffsets[i], src + srcOffsets[i], lengths[i]);
  return Status::ok();
}

}  // namespace kvwire
