#include "backends/ucx/address_check.h"

#include <sys/shm.h>
#include <sys/stat.h>

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace kvwire::ucx {
namespace {

// UCX's worker address format, version 1 (src/ucp/wireup/address.c of UCX 1.13 to 1.22).
constexpr uint8_t kVersionMask = 0x0f, kHeaderShift = 4;
constexpr uint8_t kVersion1 = 0;  // UCP_OBJECT_VERSION_V1, what ucp_worker_get_address packs by default
constexpr uint8_t kHeaderDebugInfo = 0x01, kHeaderUuid = 0x02, kHeaderClientId = 0x04, kHeaderAmOnly = 0x08;
constexpr uint8_t kNullResource = 0xff;
constexpr uint8_t kMdEmptyDevice = 0x80;
constexpr uint8_t kLast = 0x80, kDevNumPaths = 0x40, kDevSysDevice = 0x20, kDevLengthMask = 0x1f;
constexpr uint8_t kIfaceHasEpAddress = 0x40, kIfaceLengthMask = 0x3f;
constexpr size_t kIfaceAttrBytes = 16;  // ucp_address_packed_iface_attr_t: 3 floats, u32
constexpr size_t kMaxEntries = 128;      // UCP_MAX_RESOURCES
constexpr size_t kMaxDevices = 128;

struct Reader {
  const uint8_t* p;
  size_t length;
  size_t pos = 0;
  bool take(size_t n) {
    if (n > length - pos) return false;
    pos += n;
    return true;
  }
  bool byte(uint8_t* out) {
    if (pos >= length) return false;
    *out = p[pos++];
    return true;
  }
};

// UCX names transports in addresses by ucs_crc16_string(name) (src/ucs/algorithm/crc.c).
uint16_t transportChecksum(const char* name) {
  uint16_t crc = 0xffff;
  for (const char* p = name; *p; ++p) {
    crc ^= static_cast<uint8_t>(*p);
    for (int bit = 0; bit < 8; ++bit) crc = static_cast<uint16_t>((crc >> 1) ^ (-(crc & 1) & 0x8408u));
  }
  return static_cast<uint16_t>(~crc);
}

// Shared memory: an mm interface address starts with the id of the peer's receive FIFO segment
// (src/uct/sm/mm), which UCX maps at ucp_ep_create and touches up to its own FIFO size. An id that
// names any other object kills the process: a posix id with neither the procfs nor the shm_open
// flag makes UCX assert ("mm_posix.c:369 Assertion `dir != NULL'"), and one that names a smaller file
// (any fd of any process the user can open, e.g. this process's own) raises SIGBUS on first touch
// (both measured through loadPeer). So the segment is opened here first and must exist and be at
// least as large as this process's own FIFO segment. A local process that resizes the object between
// this check and UCX's mapping still wins the race: only a secret keeps such processes out.
const uint16_t kPosix = transportChecksum("posix");
const uint16_t kSysv = transportChecksum("sysv");
constexpr uint64_t kPosixProcfs = 1ull << 63, kPosixShmOpen = 1ull << 62, kPosixFlags = 0xfull << 60;
constexpr int kPosixPidBits = 30;

// The size of the shared-memory segment an mm interface address names, or -1 if it cannot be opened.
int64_t segmentBytes(uint16_t csum, uint64_t segment) {
  if (csum == kSysv) {
    struct shmid_ds ds {};
    if (segment > INT32_MAX || shmctl(static_cast<int>(segment), IPC_STAT, &ds) != 0) return -1;
    return static_cast<int64_t>(ds.shm_segsz);
  }
  const uint64_t mmid = segment & ~kPosixFlags;
  char path[64];
  if (segment & kPosixProcfs)
    std::snprintf(path, sizeof path, "/proc/%d/fd/%d", static_cast<int>(mmid & ((1u << kPosixPidBits) - 1)),
                  static_cast<int>(mmid >> kPosixPidBits));
  else if (segment & kPosixShmOpen)
    std::snprintf(path, sizeof path, "/dev/shm/ucx_shm_posix_%" PRIx64, mmid);
  else
    return -1;
  // stat, not open: opening whatever a peer names (a device, a FIFO) could itself have effects.
  struct stat st {};
  if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) return -1;
  return static_cast<int64_t>(st.st_size);
}

std::string at(const char* what, size_t offset) { return std::string(what) + " at byte " + std::to_string(offset); }

// UCX turns these into lane-selection scores and asserts that each score is >= 0: a NaN, an
// infinity or a negative time in a peer's address aborts the process (measured on UCX 1.13).
bool saneAttributes(const uint8_t* a) {
  float overhead, bandwidth, latency;
  std::memcpy(&overhead, a, 4);
  std::memcpy(&bandwidth, a + 4, 4);
  std::memcpy(&latency, a + 8, 4);
  const auto time = [](float t) { return std::isfinite(t) && t >= 0.0f && t < 1.0f; };  // seconds
  const float bw = std::fabs(bandwidth);  // negative: a shared bandwidth (UCX <= 1.11)
  return time(overhead) && time(latency) && std::isfinite(bandwidth) && bw >= 1.0f && bw < 1e15f;
}

}  // namespace

AddressChecker::AddressChecker(const std::vector<uint8_t>& own) {
  Profile learned;
  const std::string why = walk(own.data(), own.size(), nullptr, &learned);
  if (!why.empty()) {
    disabled_ = "this UCX's own worker address does not follow the format kvwire checks (" + why + ")";
    return;
  }
  profile_ = std::move(learned);
  ok_ = true;
  disabled_.clear();
}

std::string AddressChecker::check(const uint8_t* address, size_t length) const {
  if (!ok_) return "addresses cannot be checked here: " + disabled_;
  return walk(address, length, &profile_, nullptr);
}

std::string AddressChecker::walk(const uint8_t* address, size_t length, const Profile* known, Profile* learn) {
  if (address == nullptr || length < 2) return "shorter than a header";
  const uint8_t version = address[0] & kVersionMask;
  // Version 2 (UCX_ADDRESS_VERSION=v2) is not accepted: with every field framed and its fp8 attributes
  // free of NaN, 4 of 16,000 mutated version-2 addresses still aborted UCX 1.13 (assertions on segment
  // sizes derived from them), against 0 of 25,000 in version 1.
  if (version != kVersion1)
    return "format version " + std::to_string(version) + " (kvwire accepts UCX's default worker address format, v1; is UCX_ADDRESS_VERSION set?)";
  const uint8_t flags = address[0] >> kHeaderShift;  // version and header flags share the first byte
  Reader r{address, length, 1};
  // UCX reads a v1 address's 8-byte worker id whether or not the header says it is there (it unpacks
  // with the worker-id flag on); every address ucp_worker_get_address packed since UCX 1.12 has the
  // flag. One without it would be walked here from byte 1 and parsed by UCX from byte 9.
  if (!(flags & kHeaderUuid)) return "no worker id (UCX >= 1.12 always packs one)";
  if (!r.take(8)) return "truncated worker id";
  if ((flags & kHeaderClientId) && !r.take(8)) return "truncated client id";
  if (flags & kHeaderDebugInfo) {
    uint8_t nameLength;
    if (!r.byte(&nameLength) || !r.take(nameLength)) return "truncated worker name";
  }
  if (r.pos >= length) return "truncated before its device list";
  if (address[r.pos] == kNullResource) return "lists no device";
  size_t entries = 0, devices = 0;
  for (bool lastDevice = false; !lastDevice;) {
    if (++devices > kMaxDevices) return "more than " + std::to_string(kMaxDevices) + " devices";
    const size_t deviceAt = r.pos;
    uint8_t md, dev;
    if (!r.byte(&md) || !r.byte(&dev)) return at("truncated device", deviceAt);
    const bool emptyDevice = md & kMdEmptyDevice;
    const size_t deviceLength = dev & kDevLengthMask;
    lastDevice = dev & kLast;
    uint8_t paths = 1, sysDevice;
    if ((dev & kDevNumPaths) && !r.byte(&paths)) return at("truncated path count", deviceAt);
    if (paths == 0) return at("device with no path", deviceAt);
    if ((dev & kDevSysDevice) && !r.byte(&sysDevice)) return at("truncated system device", deviceAt);
    const size_t deviceAddressAt = r.pos;
    if (!r.take(deviceLength)) return at("device address runs past the end", deviceAt);
    const std::vector<uint8_t> deviceAddress(address + deviceAddressAt, address + r.pos);
    for (bool lastTransport = emptyDevice; !lastTransport;) {
      if (++entries > kMaxEntries) return "more than " + std::to_string(kMaxEntries) + " transport entries";
      const size_t entryAt = r.pos;
      if (!r.take(2)) return at("truncated transport", entryAt);
      uint16_t csum;
      std::memcpy(&csum, address + entryAt, 2);
      const size_t attrAt = r.pos;
      if (!r.take(kIfaceAttrBytes)) return at("truncated transport attributes", entryAt);
      uint8_t iface;
      if (!r.byte(&iface)) return at("truncated interface", entryAt);
      const size_t ifaceLength = iface & kIfaceLengthMask;
      lastTransport = iface & kLast;
      // A worker address (not an endpoint's) never carries endpoint addresses.
      if (iface & kIfaceHasEpAddress) return at("endpoint address in a worker address", entryAt);
      if (!r.take(ifaceLength)) return at("interface address runs past the end", entryAt);
      uint64_t segment = 0;  // shared memory: the receive FIFO's segment id
      const bool sharedMemory = (csum == kPosix || csum == kSysv) && ifaceLength >= sizeof segment;
      if (sharedMemory) std::memcpy(&segment, address + r.pos - ifaceLength, sizeof segment);
      if (learn != nullptr) {
        if (sharedMemory) (*learn)[csum] = {deviceAddress, segment, segmentBytes(csum, segment)};
        continue;
      }
      if (!saneAttributes(address + attrAt)) return at("transport attributes out of range", entryAt);
      // Shared memory UCX will use: same host and namespaces as this process, which UCX tells by the
      // device address (its system id). Anything else UCX does not reach, so it is not looked at.
      auto k = known->find(csum);
      if (k == known->end() || k->second.deviceAddress != deviceAddress) continue;
      if (!sharedMemory) return at("shared-memory interface address too short", entryAt);
      // A posix id without the procfs or shm_open flag names a file in UCX_POSIX_DIR: fine where this
      // process works that way too; otherwise UCX asserts on it ("mm_posix.c: dir != NULL").
      if (csum == kPosix && !(segment & (kPosixProcfs | kPosixShmOpen))) {
        if (k->second.segment & (kPosixProcfs | kPosixShmOpen)) return at("shared-memory segment of no known kind", entryAt);
        continue;  // file mode on both sides: the file lives in a directory only UCX's config names
      }
      const int64_t bytes = segmentBytes(csum, segment);
      if (bytes < 0) return at("shared-memory segment that cannot be opened", entryAt);
      if (k->second.segmentBytes > 0 && bytes < k->second.segmentBytes)
        return at("shared-memory FIFO smaller than this process's (peers must run the same UCX release and UCX_MM_FIFO_SIZE)", entryAt);
    }
  }
  if (r.pos != length) return at("trailing bytes", r.pos);
  return {};
}

}  // namespace kvwire::ucx
