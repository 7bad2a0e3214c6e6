// The core without Node: metadata codec and descriptor planning, driven directly from C++.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "core/backend_registry.h"
#include "core/descriptors.h"
#include "core/hmac.h"
#include "core/metadata.h"

namespace kvwire {
namespace {

AgentMetadata sample() {
  AgentMetadata md;
  md.name = "prefill-0";
  md.agentId = 0x1122334455667788ull;
  md.generation = 7;
  md.backend = "ucx";
  md.workerAddress = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  RegionInfo a;
  a.id = 1;
  a.name = "kv";
  a.access = kAccessRead;
  a.base = 0x7f0000000000ull;
  a.length = 1 << 20;
  a.backendAllocated = true;
  a.rkey = {9, 9, 9};
  RegionInfo b = a;
  b.id = 2;
  b.name = "staging";
  b.access = kAccessReadWrite;
  b.backendAllocated = false;
  RegionInfo c = a;
  c.id = 3;
  c.name = "vram";
  c.kind = MemKind::Vram;
  c.deviceId = 3;
  c.rkey = {};
  c.sections = {{"cuda-ipc", std::vector<uint8_t>(72, 0xab)}, {"other", {}}};
  md.regions = {a, b, c};
  return md;
}

TEST(Metadata, RoundTrip) {
  auto blob = encodeMetadata(sample());
  ASSERT_TRUE(blob.isOk());
  auto md = decodeMetadata(blob.value().data(), blob.value().size());
  ASSERT_TRUE(md.isOk()) << md.status().message();
  EXPECT_EQ(md.value().name, "prefill-0");
  EXPECT_EQ(md.value().agentId, 0x1122334455667788ull);
  EXPECT_EQ(md.value().generation, 7u);
  ASSERT_EQ(md.value().regions.size(), 3u);
  EXPECT_EQ(md.value().regions[0].name, "kv");
  EXPECT_TRUE(md.value().regions[0].backendAllocated);
  EXPECT_EQ(md.value().regions[1].access, kAccessReadWrite);
  EXPECT_EQ(md.value().regions[1].rkey, (std::vector<uint8_t>{9, 9, 9}));
  const RegionInfo& v = md.value().regions[2];
  EXPECT_EQ(v.kind, MemKind::Vram);
  EXPECT_EQ(v.deviceId, 3u);
  ASSERT_EQ(v.sections.size(), 2u);
  ASSERT_NE(v.section("cuda-ipc"), nullptr);
  EXPECT_EQ(*v.section("cuda-ipc"), std::vector<uint8_t>(72, 0xab));
  EXPECT_EQ(v.section("other")->size(), 0u);
  EXPECT_EQ(v.section("missing"), nullptr);
}

// Region sections: unique, named, at most kMaxRegionSections, on encode and on decode.
TEST(Metadata, SectionsAreCheckedBothWays) {
  AgentMetadata md = sample();
  md.regions[2].sections.assign(kMaxRegionSections + 1, {"s", {}});
  EXPECT_FALSE(encodeMetadata(md).isOk());
  md.regions[2].sections = {{"", {1}}};
  EXPECT_FALSE(encodeMetadata(md).isOk());
  // Encoded with two distinct names, then one renamed to the other and resealed: refused.
  md.regions[2].sections = {{"aa", {1}}, {"ab", {2}}};
  auto blob = encodeMetadata(md).value();
  auto renamed = blob;
  for (size_t i = 0; i + 1 < renamed.size(); ++i)
    if (renamed[i] == 'a' && renamed[i + 1] == 'b') renamed[i + 1] = 'a';
  const uint64_t sum = metadataChecksum(renamed.data(), renamed.size() - 8);
  for (int i = 0; i < 8; ++i) renamed[renamed.size() - 8 + i] = static_cast<uint8_t>(sum >> (8 * i));
  auto decoded = decodeMetadata(renamed.data(), renamed.size());
  ASSERT_FALSE(decoded.isOk());
  EXPECT_NE(decoded.status().message().find("section 'aa' twice"), std::string::npos) << decoded.status().message();
}

TEST(Metadata, EveryTruncationIsRejected) {
  auto blob = encodeMetadata(sample()).value();
  for (size_t n = 0; n < blob.size(); ++n) {
    auto md = decodeMetadata(blob.data(), n);
    ASSERT_FALSE(md.isOk()) << "length " << n;
    EXPECT_EQ(md.status().code(), Code::InvalidParam);
  }
}

TEST(Metadata, RandomCorruptionNeverCrashes) {
  auto blob = encodeMetadata(sample()).value();
  std::mt19937 rng(42);
  for (int i = 0; i < 20000; ++i) {
    auto copy = blob;
    for (int f = 0; f < 3; ++f) copy[rng() % copy.size()] = static_cast<uint8_t>(rng());
    auto md = decodeMetadata(copy.data(), copy.size());
    if (!md.isOk()) EXPECT_EQ(md.status().code(), Code::InvalidParam);
  }
}

// The parser itself, past the checksum: corrupt, then reseal as a careless encoder would.
TEST(Metadata, ResealedCorruptionIsParsedStrictly) {
  auto blob = encodeMetadata(sample()).value();
  std::mt19937 rng(7);
  int refused = 0;
  for (int i = 0; i < 20000; ++i) {
    auto copy = blob;
    for (int f = 0; f < 3; ++f) copy[rng() % (copy.size() - 8)] = static_cast<uint8_t>(rng());
    const uint64_t sum = metadataChecksum(copy.data(), copy.size() - 8);
    for (int k = 0; k < 8; ++k) copy[copy.size() - 8 + k] = static_cast<uint8_t>(sum >> (8 * k));
    auto md = decodeMetadata(copy.data(), copy.size());
    if (!md.isOk()) {
      EXPECT_EQ(md.status().code(), Code::InvalidParam);
      EXPECT_EQ(md.status().message().find("checksum mismatch"), std::string::npos);
      ++refused;
    }
  }
  EXPECT_GT(refused, 0);
}

TEST(Metadata, EveryAlteredBodyByteFailsTheChecksum) {
  auto blob = encodeMetadata(sample()).value();
  for (size_t at = 12; at < blob.size(); ++at) {
    auto copy = blob;
    copy[at] ^= 0x01;
    auto md = decodeMetadata(copy.data(), copy.size());
    ASSERT_FALSE(md.isOk()) << "byte " << at;
    EXPECT_NE(md.status().message().find("checksum mismatch"), std::string::npos) << md.status().message();
  }
}

TEST(Plan, CoalescesOnlyRunsAdjacentOnBothSides) {
  std::vector<uint8_t> mem(4096);
  const uint64_t lo[] = {0, 64, 128, 1000, 1064};
  const uint64_t ro[] = {0, 64, 500, 564, 628};
  const uint64_t len[] = {64, 64, 64, 64, 64};
  std::string name = "r";
  auto segs = planSegments({lo, len, 5}, {0, 4096, "local", &name}, mem.data(), {ro, len, 5}, {0, 4096, "remote", &name});
  ASSERT_TRUE(segs.isOk());
  // [0,64] merge; 128 breaks (remote jumps); 128->1000 breaks (local jumps); 1000,1064 merge with 500,564.
  ASSERT_EQ(segs.value().size(), 3u);
  EXPECT_EQ(segs.value()[0].length, 128u);
  EXPECT_EQ(segs.value()[1].firstIndex, 2u);
  EXPECT_EQ(segs.value()[1].length, 64u);
  EXPECT_EQ(segs.value()[2].firstIndex, 3u);
  EXPECT_EQ(segs.value()[2].length, 128u);
  EXPECT_EQ(segs.value()[2].local, mem.data() + 1000);
}

TEST(Plan, NamesTheFirstBadIndexAndNeverOverflows) {
  std::vector<uint8_t> mem(4096);
  std::string name = "r";
  const uint64_t lo[] = {0, 8, UINT64_MAX - 4};
  const uint64_t len[] = {8, 8, 8};
  auto bad = planSegments({lo, len, 3}, {0, 4096, "local", &name}, mem.data(), {lo, len, 3}, {0, 4096, "remote", &name});
  ASSERT_FALSE(bad.isOk());
  EXPECT_EQ(bad.status().code(), Code::InvalidParam);
  EXPECT_EQ(bad.status().index(), 2);

  const uint64_t ok[] = {0, 8};
  const uint64_t lens[] = {8, 16};
  const uint64_t other[] = {8, 8};
  auto mismatch = planSegments({ok, lens, 2}, {0, 4096, "local", &name}, mem.data(), {ok, other, 2}, {0, 4096, "remote", &name});
  ASSERT_FALSE(mismatch.isOk());
  EXPECT_EQ(mismatch.status().index(), 1);

  auto count = planSegments({ok, lens, 2}, {0, 4096, "local", &name}, mem.data(), {ok, lens, 1}, {0, 4096, "remote", &name});
  ASSERT_FALSE(count.isOk());
  EXPECT_EQ(count.status().index(), kNoIndex);
}

}  // namespace
}  // namespace kvwire

TEST(CopyRuns, GathersAndRefusesABadListWithoutCopyingAnything) {
  std::vector<uint8_t> src(64), dst(16, 0xee);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i);
  const uint64_t srcOffsets[] = {40, 8, 0};
  const uint64_t dstOffsets[] = {0, 4, 8};
  const uint64_t lengths[] = {4, 4, 8};
  ASSERT_TRUE(kvwire::copyRuns(dst.data(), dst.size(), dstOffsets, src.data(), src.size(), srcOffsets, lengths, 3));
  const std::vector<uint8_t> want = {40, 41, 42, 43, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7};
  EXPECT_EQ(dst, want);

  std::vector<uint8_t> before = dst;
  const uint64_t badDst[] = {0, 4, 9};  // run 2 ends one byte past the destination
  kvwire::Status st = kvwire::copyRuns(dst.data(), dst.size(), badDst, src.data(), src.size(), srcOffsets, lengths, 3);
  EXPECT_FALSE(st);
  EXPECT_EQ(st.index(), 2);
  EXPECT_EQ(dst, before);  // runs 0 and 1 were valid but nothing was copied
  const uint64_t huge[] = {UINT64_MAX, 0, 0};
  st = kvwire::copyRuns(dst.data(), dst.size(), dstOffsets, src.data(), src.size(), huge, lengths, 3);
  EXPECT_FALSE(st);
  EXPECT_EQ(st.index(), 0);
}

// HMAC-SHA256 against digests Node's crypto computed (createHmac('sha256', key).update(message)):
// empty key and message, RFC-style text, a key longer than the block, and messages whose padding
// falls on each side of a block boundary.
TEST(Hmac, MatchesNodeCrypto) {
  auto hex = [](const kvwire::Digest& d) {
    static const char* digits = "0123456789abcdef";
    std::string out;
    for (uint8_t b : d) out += std::string{digits[b >> 4], digits[b & 15]};
    return out;
  };
  EXPECT_EQ(hex(kvwire::hmacSha256("", "")), "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad");
  EXPECT_EQ(hex(kvwire::hmacSha256("key", "The quick brown fox jumps over the lazy dog")),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8");
  EXPECT_EQ(hex(kvwire::hmacSha256(std::string(100, 'k'), std::string(1000, 'x'))),
            "3e7454caad47b54cbf21e89cd1bcf7e95f1f2c395cb2f8fa29b3a79fd46a998c");
  EXPECT_EQ(hex(kvwire::hmacSha256("s3cret", std::string(55, 'a'))), "8f8e98b0486915740d92ed0406b03760b24b5c42187083c9c3675f17c6fedd06");
  EXPECT_EQ(hex(kvwire::hmacSha256("s3cret", std::string(56, 'a'))), "43ba763a16d9b18ab9b367540ff1190be5bc51852b0435815db495488ba2378a");
  EXPECT_EQ(hex(kvwire::hmacSha256("s3cret", std::string(64, 'a'))), "d774b85efbec57b2c5ebdc540c03e8177349fbcafe929b3574ddf72d739679e5");
  const auto a = kvwire::hmacSha256("s3cret", "x"), b = kvwire::hmacSha256("s3cret", "y");
  EXPECT_TRUE(kvwire::digestsEqual(a.data(), a.data()));
  EXPECT_FALSE(kvwire::digestsEqual(a.data(), b.data()));
}

namespace kvwire {
namespace {

// The core creates backends by name only; an unknown one is refused with the names it has.
TEST(BackendRegistry, UnknownBackendIsUnavailableAndNamesTheOthers) {
  registerBackend("fake-for-test", [](const BackendOptions&, BackendHost*) -> Result<std::unique_ptr<Backend>> {
    return Status(Code::Backend, "fake backend: not for moving bytes");
  });
  auto missing = createBackend("nccl", BackendOptions{}, nullptr);
  ASSERT_FALSE(missing.isOk());
  EXPECT_EQ(missing.status().code(), Code::Unavailable);
  EXPECT_NE(missing.status().message().find("backend 'nccl' is not built into this kvwire"), std::string::npos);
  EXPECT_NE(missing.status().message().find("fake-for-test"), std::string::npos);
  auto fake = createBackend("fake-for-test", BackendOptions{}, nullptr);
  ASSERT_FALSE(fake.isOk());
  EXPECT_EQ(fake.status().message(), "fake backend: not for moving bytes");
}

}  // namespace
}  // namespace kvwire
