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
// refuses anything a worker address from ucp_worker_get_address never holds: another format version
// (UCX_ADDRESS_VERSION=v2 addresses are refused: see address_check.cc), unknown header flags, endpoint
// addresses, more entries than UCX allows, trailing bytes. For every transport this process has too
// (matched by UCX's transport-name checksum), the device and interface address lengths must be ones
// this process's own address uses for it, and the transport's packed attributes (times, bandwidth) must be finite and in range.
// Transports this process does not have are skipped by UCX and only checked for framing.
//
// The profile of what is "known" is learned from this process's own worker address; if that one does
// not walk (a UCX whose format this code does not know, or UCX_UNIFIED_MODE=y), the checker is
// disabled and says so, and callers must not parse untrusted addresses at all.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace kvwire::ucx {

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
  struct Transport {
    std::set<size_t> deviceLengths;
    std::set<size_t> ifaceLengths;
    int64_t segmentBytes = -1;  // shared memory: this process's own receive FIFO segment
  };
  using Profile = std::map<uint16_t, Transport>;  // by transport-name checksum
  // Walks `address`; checks known transports against `known`, or (when `learn` is set) records them.
  static std::string walk(const uint8_t* address, size_t length, const Profile* known, Profile* learn);
  bool ok_ = false;
  std::string disabled_ = "not initialised";
  Profile profile_;
};

}  // namespace kvwire::ucx
