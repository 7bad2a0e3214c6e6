#include "metadata.h"

#include <cstring>
#include <unordered_set>

namespace kvwire {

const char* memKindName(MemKind kind) {
  switch (kind) {
    case MemKind::Dram: return "dram";
    case MemKind::Vram: return "vram";
  }
  return "unknown";
}

namespace {

// Layout (little-endian):
//   header: magic u32, version u16, flags u16, bodyLength u32
//   body:   name str8, agentId u64, generation u64, backend str8, workerAddress blob32,
//           regionCount u32, regions[regionCount]
//   region: id u32, name str8, kind u8, access u8, flags u8 (bit0 backendAllocated),
//           deviceId u32, base u64, length u64, rkey blob32, sectionCount u8,
//           sections[sectionCount] (name str8, data blob32)
//   trailer: checksum u64 = metadataChecksum(header + body)
constexpr size_t kHeaderBytes = 12;
constexpr size_t kTrailerBytes = 8;

class Writer {
 public:
  void u8(uint8_t v) { out_.push_back(v); }
  void u16(uint16_t v) { le(v, 2); }
  void u32(uint32_t v) { le(v, 4); }
  void u64(uint64_t v) { le(v, 8); }
  void str8(const std::string& s) {
    u8(static_cast<uint8_t>(s.size()));
    out_.insert(out_.end(), s.begin(), s.end());
  }
  void blob32(const std::vector<uint8_t>& b) {
    u32(static_cast<uint32_t>(b.size()));
    out_.insert(out_.end(), b.begin(), b.end());
  }
  std::vector<uint8_t>& bytes() { return out_; }

 private:
  void le(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  std::vector<uint8_t> out_;
};

class Reader {
 public:
  Reader(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  // Each read returns false (and records what) when the blob is too short.
  bool u8(uint8_t& v, const char* what) { return le(v, 1, what); }
  bool u16(uint16_t& v, const char* what) { return le(v, 2, what); }
  bool u32(uint32_t& v, const char* what) { return le(v, 4, what); }
  bool u64(uint64_t& v, const char* what) { return le(v, 8, what); }
  bool str8(std::string& s, const char* what) {
    uint8_t len = 0;
    if (!u8(len, what) || !need(len, what)) return false;
    s.assign(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += len;
    return true;
  }
  bool blob32(std::vector<uint8_t>& b, const char* what) {
    uint32_t len = 0;
    if (!u32(len, what)) return false;
    if (len > kMaxBlobBytes) {
      error_ = std::string(what) + " length " + std::to_string(len) + " exceeds the limit of " +
               std::to_string(kMaxBlobBytes) + " bytes";
      return false;
    }
    if (!need(len, what)) return false;
    b.assign(p_ + pos_, p_ + pos_ + len);
    pos_ += len;
    return true;
  }
  size_t remaining() const { return n_ - pos_; }
  void skip(size_t k) { pos_ += k; }
  const std::string& error() const { return error_; }

 private:
  bool need(size_t k, const char* what) {
    if (n_ - pos_ >= k) return true;
    error_ = std::string("metadata truncated while reading ") + what + " (needs " +
             std::to_string(k) + " bytes at offset " + std::to_string(pos_) + ", " +
             std::to_string(n_ - pos_) + " left)";
    return false;
  }
  template <typename T>
  bool le(T& v, int n, const char* what) {
    if (!need(static_cast<size_t>(n), what)) return false;
    uint64_t acc = 0;
    for (int i = 0; i < n; ++i) acc |= static_cast<uint64_t>(p_[pos_ + i]) << (8 * i);
    v = static_cast<T>(acc);
    pos_ += static_cast<size_t>(n);
    return true;
  }
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
  std::string error_;
};

Status invalid(const std::string& msg) { return {Code::InvalidParam, "invalid metadata: " + msg}; }

}  // namespace

Result<std::vector<uint8_t>> encodeMetadata(const AgentMetadata& md) {
  if (md.name.empty() || md.name.size() > kMaxNameBytes)
    return Status(Code::InvalidParam, "agent name must be 1.." + std::to_string(kMaxNameBytes) + " bytes");
  if (md.backend.size() > kMaxNameBytes || md.workerAddress.size() > kMaxBlobBytes)
    return Status(Code::InvalidParam, "backend name or worker address too large");
  if (md.regions.size() > kMaxRegions)
    return Status(Code::InvalidParam, "too many regions to publish (" + std::to_string(md.regions.size()) + ")");
  Writer w;
  w.u32(kMetadataMagic);
  w.u16(kMetadataVersion);
  w.u16(0);
  w.u32(0);  // body length, patched below
  w.str8(md.name);
  w.u64(md.agentId);
  w.u64(md.generation);
  w.str8(md.backend);
  w.blob32(md.workerAddress);
  w.u32(static_cast<uint32_t>(md.regions.size()));
  for (const auto& r : md.regions) {
    if (r.name.size() > kMaxNameBytes || r.rkey.size() > kMaxBlobBytes)
      return Status(Code::InvalidParam, "region '" + r.name + "' name or key too large");
    w.u32(r.id);
    w.str8(r.name);
    w.u8(static_cast<uint8_t>(r.kind));
    w.u8(r.access);
    w.u8(r.backendAllocated ? 1 : 0);
    w.u32(r.deviceId);
    w.u64(r.base);
    w.u64(r.length);
    w.blob32(r.rkey);
    if (r.sections.size() > kMaxRegionSections)
      return Status(Code::InvalidParam, "region '" + r.name + "' has more than " + std::to_string(kMaxRegionSections) + " sections");
    w.u8(static_cast<uint8_t>(r.sections.size()));
    for (const auto& s : r.sections) {
      if (s.name.empty() || s.name.size() > kMaxNameBytes || s.data.size() > kMaxBlobBytes)
        return Status(Code::InvalidParam, "region '" + r.name + "' section name or data too large");
      w.str8(s.name);
      w.blob32(s.data);
    }
  }
  auto& out = w.bytes();
  uint32_t body = static_cast<uint32_t>(out.size() - kHeaderBytes);
  for (int i = 0; i < 4; ++i) out[8 + i] = static_cast<uint8_t>(body >> (8 * i));
  w.u64(metadataChecksum(out.data(), out.size()));
  return std::move(out);
}

uint64_t metadataChecksum(const uint8_t* data, size_t size) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < size; ++i) h = (h ^ data[i]) * 0x100000001b3ull;
  return h;
}

Result<AgentMetadata> decodeMetadata(const uint8_t* data, size_t size) {
  if (data == nullptr || size < kHeaderBytes)
    return invalid("blob of " + std::to_string(size) + " bytes is shorter than the " +
                   std::to_string(kHeaderBytes) + "-byte header");
  if (size > kMaxMetadataBytes) return invalid("blob of " + std::to_string(size) + " bytes is too large");
  Reader r(data, size);
  uint32_t magic = 0, body = 0;
  uint16_t version = 0, flags = 0;
  r.u32(magic, "magic");
  r.u16(version, "version");
  r.u16(flags, "flags");
  r.u32(body, "body length");
  if (magic != kMetadataMagic) return invalid("wrong magic (not a kvwire metadata blob)");
  // Version 2 (no region sections) is still read: agents of the previous release keep working
  // with this one while a deployment upgrades.
  if (version != kMetadataVersion && version != kMetadataVersionNoSections)
    return invalid("unsupported version " + std::to_string(version) + " (this build reads versions " +
                   std::to_string(kMetadataVersionNoSections) + " and " + std::to_string(kMetadataVersion) + ")");
  if (flags != 0) return invalid("unknown flags 0x" + std::to_string(flags));
  if (size < kHeaderBytes + kTrailerBytes || body != size - kHeaderBytes - kTrailerBytes)
    return invalid("body length field says " + std::to_string(body) + " bytes but " +
                   std::to_string(size < kHeaderBytes + kTrailerBytes ? 0 : size - kHeaderBytes - kTrailerBytes) +
                   " follow the header (before the 8-byte checksum)");
  uint64_t sum = 0;
  for (int i = 0; i < 8; ++i) sum |= static_cast<uint64_t>(data[size - kTrailerBytes + i]) << (8 * i);
  if (sum != metadataChecksum(data, size - kTrailerBytes))
    return invalid("checksum mismatch (the blob was altered or damaged on the way)");
  r = Reader(data, size - kTrailerBytes);
  r.skip(kHeaderBytes);

  AgentMetadata md;
  uint32_t count = 0;
  bool ok = r.str8(md.name, "agent name") && r.u64(md.agentId, "agent id") &&
            r.u64(md.generation, "generation") && r.str8(md.backend, "backend") &&
            r.blob32(md.workerAddress, "worker address") && r.u32(count, "region count");
  if (!ok) return invalid(r.error());
  if (md.name.empty()) return invalid("empty agent name");
  if (md.workerAddress.empty()) return invalid("empty worker address");
  // Each region takes at least 37 bytes, so a count the blob cannot hold is rejected before allocating.
  const size_t kMinRegionBytes = 4 + 1 + 1 + 1 + 1 + 4 + 8 + 8 + 4 + (version == kMetadataVersion ? 1 : 0);
  if (count > kMaxRegions || count > r.remaining() / kMinRegionBytes)
    return invalid("region count " + std::to_string(count) + " cannot fit in the " +
                   std::to_string(r.remaining()) + " bytes left");
  md.regions.resize(count);
  std::unordered_set<uint32_t> seenIds;
  for (uint32_t i = 0; i < count; ++i) {
    RegionInfo& g = md.regions[i];
    uint8_t kind = 0, rflags = 0;
    ok = r.u32(g.id, "region id") && r.str8(g.name, "region name") && r.u8(kind, "region kind") &&
         r.u8(g.access, "region access") && r.u8(rflags, "region flags") &&
         r.u32(g.deviceId, "region device id") && r.u64(g.base, "region base") &&
         r.u64(g.length, "region length") && r.blob32(g.rkey, "region key");
    uint8_t sections = 0;
    if (version == kMetadataVersion) ok = ok && r.u8(sections, "region section count");
    if (!ok) return invalid("region " + std::to_string(i) + ": " + r.error());
    const std::string where = "region " + std::to_string(i) + " ('" + g.name + "'): ";
    if (sections > kMaxRegionSections)
      return invalid(where + std::to_string(sections) + " sections (at most " + std::to_string(kMaxRegionSections) + ")");
    g.sections.resize(sections);
    for (auto& s : g.sections) {
      if (!r.str8(s.name, "region section name") || !r.blob32(s.data, "region section data"))
        return invalid(where + r.error());
      if (s.name.empty()) return invalid(where + "a section without a name");
      if (&s != &g.sections.front())
        for (const auto* o = &g.sections.front(); o != &s; ++o)
          if (o->name == s.name) return invalid(where + "section '" + s.name + "' twice");
    }
    if (kind > static_cast<uint8_t>(MemKind::Vram)) return invalid(where + "unknown memory kind " + std::to_string(kind));
    g.kind = static_cast<MemKind>(kind);
    // Host memory is on no device and carries no CUDA IPC handle ("cuda-ipc", cuda/vram.h); a CUDA
    // device ordinal is small. (Other section names are let through for later versions.)
    if (g.kind == MemKind::Dram && g.deviceId != 0)
      return invalid(where + "host memory with device id " + std::to_string(g.deviceId));
    if (g.kind == MemKind::Vram && g.deviceId >= kMaxDeviceOrdinal)
      return invalid(where + "device id " + std::to_string(g.deviceId) + " (at most " + std::to_string(kMaxDeviceOrdinal - 1) + ")");
    if (g.kind == MemKind::Dram && g.section("cuda-ipc") != nullptr) return invalid(where + "a CUDA IPC handle on host memory");
    if (g.access < kAccessRead || g.access > kAccessReadWrite)
      return invalid(where + "unknown access " + std::to_string(g.access));
    if (rflags > 1) return invalid(where + "unknown flags " + std::to_string(rflags));
    g.backendAllocated = rflags & 1;
    // A host region is reached through its UCX key (UCX parses it, and crashed on an empty one);
    // VRAM has none (same-host peers open it by its CUDA IPC handle).
    if (g.kind == MemKind::Dram && g.rkey.empty()) return invalid(where + "host memory without a key");
    if (g.kind == MemKind::Vram && !g.rkey.empty()) return invalid(where + "VRAM with a UCX key (not produced by this version)");
    if (g.length == 0) return invalid(where + "zero length");
    if (g.base + g.length < g.base) return invalid(where + "base + length overflows");
    if (!seenIds.insert(g.id).second) return invalid(where + "duplicate region id " + std::to_string(g.id));
  }
  if (r.remaining() != 0) return invalid(std::to_string(r.remaining()) + " unexpected trailing bytes");
  return md;
}

}  // namespace kvwire
