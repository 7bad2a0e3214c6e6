// SHA-256 and HMAC-SHA256 (FIPS 180-4, RFC 2104), for the authenticated connection handshake: the
// core links no crypto library. Checked against Node's crypto in test/native/core_test.cc vectors.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace kvwire {

using Digest = std::array<uint8_t, 32>;

class Sha256 {
 public:
  Sha256();
  Sha256& update(const void* data, size_t length);
  Sha256& update(const std::string& s) { return update(s.data(), s.size()); }
  Digest finish();

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buffer_[64];
  size_t buffered_ = 0;
  uint64_t total_ = 0;
};

// HMAC-SHA256 of `message` under `key`.
Digest hmacSha256(const std::string& key, const std::string& message);

// Compares in time independent of where the digests differ.
bool digestsEqual(const uint8_t* a, const uint8_t* b);

}  // namespace kvwire
