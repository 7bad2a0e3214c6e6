// A bounded walk over a packed UCX worker address before UCX ever sees it.
//
// Why: ucp_ep_create parses a worker address without knowing its length and aborts the process on
// some malformed ones (measured on UCX 1.13 with ucp_ep_create in forked children: 88% of random byte strings
// and ~2% of real addresses with 1-4 bytes changed killed the process with SIGABRT: "addr version",
// select.c "score >= 0"). A peer's address reaches kvwire from HELLO (any process that can reach the
// worker can send one) and from metadata (checksummed, but a well-formed blob can carry anything).
//
// The walk follows UCX's worker address format (version 1, what ucp_worker_get_address packs by
// default in UCX 1.13 through 1.22, non-unified mode) field by field, bounded by the given length, and
// refuses what a worker address from ucp_worker_get_address never holds: another format version
// (UCX_ADDRESS_VERSION=v2 addresses are refused: see address_check.cc), no worker id, endpoint
// addresses, more entries than UCX allows, trailing bytes; and transport attributes that are not
// finite and in range (UCX asserts on the scores they make). Lengths of device and interface
// addresses are not compared with this process's (they legitimately differ across hosts, address
// families, namespaces and UCX releases). Shared-memory entries that UCX will use (same host and
// namespaces: their device address equals this process's) must name a receive FIFO that exists and
// is at least as large as this process's own.
//
// What the walk cannot rule out (UCX trusts what a well-formed address says): an address that names
// another process's file or FIFO of the right size, or mixes interfaces of several real workers, can
// still make UCX write there or abort; and UCX's transports may read a few bytes past an interface
// address, so callers hand UCX a copy with zeroed padding (kAddressPadding).
//
// If this process's own address does not walk (a UCX whose format this code does not know, or
// UCX_UNIFIED_MODE=y), the checker is disabled and says so, and callers must not parse untrusted
// addresses at all.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace kvwire::ucx {

// Zero bytes after a copy of a peer's address handed to UCX: its transports read namespace ids and
// the like past an interface address when flags in it say so (found by review, SIGSEGV at a guard page).
constexpr size_t kAddressPadding = 256;

class AddressChecker {
 public:
  // Learns the profile from this worker's own address. ok() tells whether that worked.
  explicit AddressChecker(const std::vector<uint8_t>& own);
  AddressChecker() = default;
  bool ok() const { return ok_; }
  // Why the checker is disabled (empty when ok()).
  const std::string& disabledBecause() const { return disabled_; }
  // Empty when `address` walks cleanly; otherwise what is wrong with it (for error messages).
  std::string check(const uint8_t* address, size_t length) const;

 private:
  struct Transport {  // this process's own shared-memory transport (posix, sysv)
    std::vector<uint8_t> deviceAddress;  // UCX's system id for this host (and namespaces)
    uint64_t segment = 0;                // its receive FIFO's segment id
    int64_t segmentBytes = -1;           // and that segment's size
  };
  using Profile = std::map<uint16_t, Transport>;  // by transport-name checksum
  // Walks `address`; checks known transports against `known`, or (when `learn` is set) records them.
  static std::string walk(const uint8_t* address, size_t length, const Profile* known, Profile* learn);
  bool ok_ = false;
  std::string disabled_ = "not initialised";
  Profile profile_;
};

}  // namespace kvwire::ucx
