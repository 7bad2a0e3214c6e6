// A hostile peer: a plain UCX program that speaks kvwire's wire protocol the way an attacker or a
// broken implementation would. Tests point it at a real agent and check that the agent survives,
// writes nowhere it should not, completes nothing it should not, and keeps serving its real peers.
//
//   kvwire_hostile_peer <metadata file> malformed [seed]   every message type, wrong sizes and fields
//   kvwire_hostile_peer <metadata file> forge <count>      ACK / READ_DONE / READ data for guessed ids
//   kvwire_hostile_peer <metadata file> flood <count> <ms> WRITEs never committed, reads never taken
//   kvwire_hostile_peer <metadata file> unauth <rounds>    at a target with a secret: HELLOs with garbage
//                                                          addresses, wrong proofs, then every data-plane
//                                                          message, on a connection that never authenticated
//   kvwire_hostile_peer <metadata file> badaddress <rounds>  at a target without a secret: HELLOs whose worker
//                                                          address is random, of another format version,
//                                                          truncated, or followed by junk (each aborted UCX's
//                                                          parser before kvwire checked addresses)
//   kvwire_hostile_peer <metadata file> vramrevoke <region> <count>  at an agent that loaded a VRAM peer: VRAM_REVOKEs
//                                                          for that region id with guessed connection nonces, and
//                                                          VRAM_REVOKE_ACKs with guessed sequence numbers
//   kvwire_hostile_peer <metadata file> rmaput             a UCX PUT of 0xEE bytes at the start of the target's
//                                                          first region, with its published key: no kvwire
//                                                          message at all (over tcp UCX emulates it in software)
//
// The metadata file holds the target's metadata blob (signed or not); only its worker address is used.
// Prints one line: "sent N messages".
#include <ucp/api/ucp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backends/ucx/wire.h"

using namespace kvwire::ucx;

namespace {

ucp_context_h context;
ucp_worker_h worker;
ucp_ep_h ep;
std::vector<uint8_t> ownAddress;
uint64_t sent = 0;
int pending = 0;

[[noreturn]] void die(const char* what, ucs_status_t st = UCS_OK) {
  std::fprintf(stderr, "hostile_peer: %s%s%s\n", what, st == UCS_OK ? "" : ": ", st == UCS_OK ? "" : ucs_status_string(st));
  std::exit(2);
}

struct FirstRegion {
  uint64_t base = 0;
  uint64_t length = 0;
  std::vector<uint8_t> rkey;
};

// From the metadata (native/core/metadata.cc): the worker address and the first region.
std::vector<uint8_t> workerAddressOf(const std::vector<uint8_t>& md, FirstRegion* first = nullptr) {
  // header 12, name str8, agentId u64, generation u64, backend str8, worker address blob32
  size_t p = 12;
  auto need = [&](size_t n) { if (p + n > md.size()) die("metadata too short"); };
  auto blob32 = [&] {
    need(4);
    uint32_t len = 0;
    std::memcpy(&len, &md[p], 4);
    p += 4;
    need(len);
    p += len;
    return std::vector<uint8_t>(md.begin() + p - len, md.begin() + p);
  };
  need(1); p += 1 + md[p];
  need(16); p += 16;
  need(1); p += 1 + md[p];
  std::vector<uint8_t> address = blob32();
  if (first != nullptr) {
    // regions: u32 count; each u32 id, str8 name, u8 kind, u8 access, u8 allocated, u32 device, u64 base, u64 length, blob32 key
    need(4 + 4); p += 4 + 4;
    need(1); p += 1 + md[p];
    need(3 + 4 + 16); p += 3 + 4;
    std::memcpy(&first->base, &md[p], 8);
    std::memcpy(&first->length, &md[p + 8], 8);
    p += 16;
    first->rkey = blob32();
  }
  return address;
}

// A PUT straight through UCX with the target's published key: kvwire's handlers never see it.
void rmaPut(const FirstRegion& region) {
  ucp_rkey_h rkey = nullptr;
  ucs_status_t st = ucp_ep_rkey_unpack(ep, region.rkey.data(), &rkey);
  if (st != UCS_OK) die("ucp_ep_rkey_unpack", st);
  std::vector<uint8_t> bytes(std::min<uint64_t>(region.length, 4096), 0xEE);
  ucp_request_param_t p{};
  void* req = ucp_put_nbx(ep, bytes.data(), bytes.size(), region.base, rkey, &p);
  if (UCS_PTR_IS_ERR(req)) die("ucp_put_nbx", UCS_PTR_STATUS(req));
  if (req != nullptr) {
    while (ucp_request_check_status(req) == UCS_INPROGRESS) ucp_worker_progress(worker);
    ucp_request_free(req);
  }
  ++sent;
  void* flush = ucp_ep_flush_nbx(ep, &p);
  if (UCS_PTR_IS_PTR(flush)) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);  // unanswered: RMA is off there
    while (ucp_request_check_status(flush) == UCS_INPROGRESS && std::chrono::steady_clock::now() < deadline)
      ucp_worker_progress(worker);
    std::printf("flush: %s\n", ucs_status_string(ucp_request_check_status(flush)));
  }
  ucp_rkey_destroy(rkey);
}

void fillRandom(std::mt19937_64& rng, void* p, size_t n) {
  for (size_t i = 0; i < n; ++i) static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(rng());
}

std::vector<uint8_t> randomBytes(std::mt19937_64& rng, size_t n) {
  std::vector<uint8_t> b(n);
  fillRandom(rng, b.data(), n);
  return b;
}

void onSent(void* request, ucs_status_t, void*) {
  --pending;
  ucp_request_free(request);
}

// Sends one active message. Header and data are copied into storage that outlives the send: UCX
// reads both until the request completes.
void send(uint16_t id, const void* header, size_t headerLength, const void* data, size_t length) {
  static std::vector<std::pair<std::vector<uint8_t>, std::vector<uint8_t>>> keep;
  if (keep.size() > 4096 && pending == 0) keep.clear();
  keep.emplace_back(std::vector<uint8_t>(static_cast<const uint8_t*>(header), static_cast<const uint8_t*>(header) + headerLength),
                    std::vector<uint8_t>(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + length));
  auto& [hdr, body] = keep.back();
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_FLAGS;
  p.cb.send = onSent;
  p.flags = UCP_AM_SEND_FLAG_REPLY;
  void* req = ucp_am_send_nbx(ep, id, hdr.data(), hdr.size(), body.data(), body.size(), &p);
  ++sent;
  if (UCS_PTR_IS_PTR(req)) ++pending;
  // Keep the number in flight small; a target that stopped reading (or died) ends the run.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (pending > 64) {
    ucp_worker_progress(worker);
    if (std::chrono::steady_clock::now() > deadline) die("the target stopped taking messages for 20 s");
  }
}

template <typename T>
void send(uint16_t id, const T& header, const std::vector<uint8_t>& data) {
  send(id, &header, sizeof header, data.data(), data.size());
}

void drain() {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (pending > 0) {
    ucp_worker_progress(worker);
    if (std::chrono::steady_clock::now() > deadline) die("the target stopped taking messages for 20 s");
  }
  ucp_request_param_t p{};
  void* req = ucp_ep_flush_nbx(ep, &p);
  if (UCS_PTR_IS_PTR(req)) {
    while (ucp_request_check_status(req) == UCS_INPROGRESS) ucp_worker_progress(worker);
    ucp_request_free(req);
  }
}

void hello() {
  HelloHeader h{kWireVersion, 7, 0, 0x686f7374696c65ull, {}, 0};
  std::vector<uint8_t> data{'h', 'o', 's', 't', 'i', 'l', 'e'};
  data.insert(data.end(), ownAddress.begin(), ownAddress.end());
  send(kAmHello, h, data);
}

void malformed(uint32_t seed) {
  std::mt19937_64 rng(seed);
  auto bytes = [&](size_t n) { return randomBytes(rng, n); };
  hello();
  // 1. Every message id (and unknown ones) with headers of the wrong size and junk data. HELLO is
  //    left out here: its address bytes reach ucp_ep_create (see below).
  const uint16_t ids[] = {0, 255, 256, 1000, 32768, 65534, kAmWrite, kAmWriteCommit, kAmAck, kAmReadRequest, kAmReadData, kAmReadDone,
                          kAmNotify, kAmWritePacked, kAmReadPacked, kAmBye, kAmPing, kAmPong, kAmChallenge, kAmAuth,
                          kAmCmaProbe, kAmCmaProof, kAmRevoke, kAmRevokeAck, kAmVramRevoke, kAmVramRevokeAck,
                          31 /* the canary's id (kvwire's own check of its receive queue) */, 99, 65535};
  const size_t headerSizes[] = {0, 1, 7, 8, 11, 12, 15, 16, 19, 20, 23, 24, 27, 28, 29, 31, 32, 33, 47, 48, 49, 64, 200};
  const size_t dataSizes[] = {0, 1, 17, 1024, 4096, 9000, 65536};
  // HOSTILE_MAX_ID: the highest message id sent (UCX 1.13 itself crashes on ids >= 32768, before
  // any handler runs: the tests leave those out there and say so). HOSTILE_ONLY_ID: one id, to bisect.
  const char* maxId = std::getenv("HOSTILE_MAX_ID");
  const char* only = std::getenv("HOSTILE_ONLY_ID");
  for (uint16_t id : ids) {
    if (maxId && id > std::atoi(maxId)) continue;
    if (only && std::atoi(only) != id) continue;
    for (size_t hs : headerSizes)
      for (size_t ds : dataSizes) {
        auto h = bytes(hs);
        auto d = bytes(ds);
        send(id, h.data(), h.size(), d.data(), d.size());
      }
  }
  if (only) { drain(); return; }
  // HELLOs the target must refuse before it parses an address: wrong size, wrong version, a name
  // longer than the message or than 255 bytes. (A well-formed HELLO with a garbage address is not
  // sent: without a secret that still reaches UCX's address parser, which can abort on it.)
  for (int i = 0; i < 200; ++i) {
    auto h = bytes(1 + rng() % 40);
    auto d = bytes(rng() % 300);
    if (h.size() == sizeof(HelloHeader)) h[0] ^= 0xff;  // never kWireVersion by accident
    send(kAmHello, h.data(), h.size(), d.data(), d.size());
    HelloHeader bad{kWireVersion + 1 + static_cast<uint32_t>(rng() % 5), 3, 0, rng(), {}, 0};
    send(kAmHello, bad, bytes(200));
    HelloHeader longName{kWireVersion, static_cast<uint32_t>(256 + rng() % 100000), 0, rng(), {}, 0};
    send(kAmHello, longName, bytes(rng() % 300));
    HelloHeader noAddress{kWireVersion, 16, 0, rng(), {}, 0};
    send(kAmHello, noAddress, bytes(16));
  }
  // 2. Right sizes, lying fields: region ids, offsets and lengths that do not fit, overflowing
  //    sums, counts that disagree with the data, ids nobody was given.
  const uint32_t regions[] = {0, 1, 2, 3, 4, 7, 0xffffffffu};
  const uint64_t offsets[] = {0, 1, 4095, 4096, 65535, 1ull << 32, 1ull << 63, ~0ull, ~0ull - 4095};
  const uint64_t lengths[] = {0, 1, 64, 4096, 65536, 1ull << 32, ~0ull};
  for (uint32_t r : regions)
    for (uint64_t off : offsets)
      for (uint64_t len : lengths) {
        WriteHeader w{rng(), r, static_cast<uint32_t>(rng()), off, len};
        send(kAmWrite, w, bytes(len <= 4096 ? len : 64));
        ReadSegment seg{off, len, 0};
        ReadRequestHeader rq{rng(), r, 1};
        send(kAmReadRequest, &rq, sizeof rq, &seg, sizeof seg);
        ReadRequestHeader lying{rng(), r, 0xffffffffu};  // claims 4 billion segments, carries one
        send(kAmReadRequest, &lying, sizeof lying, &seg, sizeof seg);
        PackedEntry e{off, static_cast<uint32_t>(len), 0};
        PackedWriteHeader pw{rng(), r, 1};
        std::vector<uint8_t> packed(reinterpret_cast<uint8_t*>(&e), reinterpret_cast<uint8_t*>(&e) + sizeof e);
        auto body = bytes(len <= 1024 ? len : 16);
        packed.insert(packed.end(), body.begin(), body.end());
        send(kAmWritePacked, pw, packed);
        PackedWriteHeader pwLying{rng(), r, static_cast<uint32_t>(rng())};
        send(kAmWritePacked, pwLying, packed);
      }
  for (int i = 0; i < 2000; ++i) {
    CommitHeader c{rng() % 4 ? rng() : i, rng() % 3 ? rng() : static_cast<uint64_t>(rng() % 4), static_cast<uint32_t>(rng() % 3)};
    send(kAmWriteCommit, c, bytes(rng() % 64));
    StatusHeader s{static_cast<uint64_t>(i), static_cast<uint32_t>(rng()), static_cast<int64_t>(rng())};
    send(rng() % 2 ? kAmAck : kAmReadDone, s, bytes(rng() % 64));
    ReadDataHeader rd{rng() % 2 ? rng() : static_cast<uint64_t>(i), static_cast<uint32_t>(rng())};
    send(kAmReadData, rd, bytes(rng() % 2 ? 4096 : 9000));
    PackedReadHeader pr{static_cast<uint64_t>(i), static_cast<uint32_t>(rng()), static_cast<uint32_t>(rng() % 5)};
    send(kAmReadPacked, pr, bytes(rng() % 2048));
    ByeHeader bye{rng(), static_cast<uint32_t>(i % 2)};  // not this connection's instance (said to be closing or moved): ignored
    send(kAmBye, bye, {});
  }
  drain();
}

// A stranger (its own connection, no nonce of anyone's) tells an initiator that region `region` of some
// peer is withdrawn, and acknowledges withdrawals it was never told of.
void vramRevoke(uint32_t region, uint64_t count) {
  hello();
  std::mt19937_64 rng(count);
  for (uint64_t i = 0; i < count; ++i) {
    VramRevokeHeader h{};
    for (auto& b : h.nonce) b = static_cast<uint8_t>(rng());
    h.seq = rng();
    h.regionId = i % 2 == 0 ? region : static_cast<uint32_t>(rng());
    send(kAmVramRevoke, h, {});
    send(kAmVramRevokeAck, h, {});
  }
  drain();
}

void forge(uint64_t count) {
  hello();
  const char note[] = "forger";
  send(kAmNotify, nullptr, 0, note, sizeof note - 1);
  std::mt19937_64 rng(count);
  std::vector<uint8_t> filler(4096, 0xEE);
  for (uint64_t i = 1; i <= 2 * count; ++i) {
    const uint64_t id = i <= count ? i : rng();  // sequential ids, then random guesses
    StatusHeader ok{id, 0, -1};
    send(kAmReadDone, ok, {});
    send(kAmAck, ok, {});
    PackedReadHeader pr{id, 0, 1};
    send(kAmReadPacked, pr, std::vector<uint8_t>(64, 0xEE));
    ReadDataHeader rd{id, 0};
    send(kAmReadData, rd, filler);
  }
  drain();
}

// Against a target with a secret, which this tool does not have. Each round: a HELLO that claims a
// secret and a legitimate peer's name, with a garbage worker address (a target that parsed it before
// the proof would abort inside UCX's address parser); AUTH with a guessed proof, of the wrong size,
// and before any HELLO; then every data-plane message, well formed and aimed at region 1: a WRITE of
// 0xEE bytes with its commit and a notification, a packed WRITE, a READ request, a notification, a
// PING and a BYE. The target must serve none of it.
void unauthenticated(uint64_t rounds) {
  std::mt19937_64 rng(rounds);
  auto bytes = [&](size_t n) { return randomBytes(rng, n); };
  std::vector<uint8_t> block(4096, 0xEE);
  const std::string claimed = "legit";
  for (uint64_t r = 0; r < rounds; ++r) {
    AuthHeader early{};
    fillRandom(rng, early.targetNonce, sizeof early.targetNonce);
    send(kAmAuth, early, bytes(kMacBytes));
    HelloHeader h{kWireVersion, static_cast<uint32_t>(claimed.size()), 0, rng(), {}, 1};
    fillRandom(rng, h.nonce, sizeof h.nonce);
    std::vector<uint8_t> data(claimed.begin(), claimed.end());
    auto garbage = bytes(1 + rng() % 512);
    data.insert(data.end(), garbage.begin(), garbage.end());
    send(kAmHello, h, data);
    AuthHeader a{};
    fillRandom(rng, a.targetNonce, sizeof a.targetNonce);
    send(kAmAuth, a, bytes(kMacBytes));
    send(kAmAuth, a, bytes(rng() % 64));
    const uint64_t id = rng() | 1;
    WriteHeader w{id, 1, 0, 0, block.size()};
    send(kAmWrite, w, block);
    PackedEntry e{8192, 64, 0};
    PackedWriteHeader pw{id, 1, 1};
    std::vector<uint8_t> packed(reinterpret_cast<uint8_t*>(&e), reinterpret_cast<uint8_t*>(&e) + sizeof e);
    packed.insert(packed.end(), 64, 0xEE);
    send(kAmWritePacked, pw, packed);
    const std::string note = "forged";
    CommitHeader c{id, 2, 1};
    send(kAmWriteCommit, c, std::vector<uint8_t>(note.begin(), note.end()));
    ReadSegment seg{0, 4096, 0};
    ReadRequestHeader rq{rng() | 1, 1, 1};
    send(kAmReadRequest, &rq, sizeof rq, &seg, sizeof seg);
    send(kAmNotify, nullptr, 0, note.data(), note.size());
    PingHeader ping{rng() | 1};
    send(kAmPing, ping, {});
    ByeHeader bye{h.agentId};
    send(kAmBye, bye, {});
  }
  drain();
}

// HELLOs well formed but for their worker address, which UCX must never be given: random bytes (88%
// of them aborted ucp_ep_create on UCX 1.13), this tool's own address with another format version
// (assertion "addr version"), cut short (UCX reads past the end: it takes no length), or followed by
// junk. Half claim a name, half a fresh random one.
void badAddresses(uint64_t rounds) {
  std::mt19937_64 rng(rounds);
  for (uint64_t r = 0; r < rounds; ++r) {
    for (int kind = 0; kind < 4; ++kind) {
      std::vector<uint8_t> address;
      switch (kind) {
        case 0: address = randomBytes(rng, 1 + rng() % 512); break;
        case 1:
          address = ownAddress;
          address[0] = static_cast<uint8_t>((address[0] & 0xf0) | (2 + rng() % 14));
          break;
        case 2: address.assign(ownAddress.begin(), ownAddress.begin() + 1 + rng() % (ownAddress.size() - 1)); break;
        default: {
          address = ownAddress;
          auto junk = randomBytes(rng, 1 + rng() % 64);
          address.insert(address.end(), junk.begin(), junk.end());
        }
      }
      const std::string name = rng() % 2 ? "legit" : "n" + std::to_string(rng());
      HelloHeader h{kWireVersion, static_cast<uint32_t>(name.size()), 0, rng(), {}, 0};
      fillRandom(rng, h.nonce, sizeof h.nonce);
      std::vector<uint8_t> data(name.begin(), name.end());
      data.insert(data.end(), address.begin(), address.end());
      send(kAmHello, h, data);
    }
  }
  drain();
}

// Opens WRITEs it never finishes (segments and commits for fresh random ids) and asks for reads it
// never takes, then stays connected without progressing for `holdMs`, so the target's state for
// this connection can be measured at its largest. Prints "flooded" when it starts holding.
void flood(uint64_t count, int holdMs) {
  hello();
  std::mt19937_64 rng(count);
  std::vector<uint8_t> block(64, 0xAB);
  for (uint64_t i = 0; i < count; ++i) {
    WriteHeader w{rng() | 1, 1, 0, 0, 64};  // region 1 of the target, a valid range: only never committed
    send(kAmWrite, w, block);
    CommitHeader c{rng() | 1, 1000, 0};      // a commit waiting for 1,000 segments that never come
    send(kAmWriteCommit, c, {});
    if (i % 16 == 0) {
      ReadSegment seg{0, 64 << 10, 0};
      ReadRequestHeader rq{rng() | 1, 1, 1};
      send(kAmReadRequest, &rq, sizeof rq, &seg, sizeof seg);
    }
  }
  drain();
  std::printf("flooded\n");
  std::fflush(stdout);
  std::this_thread::sleep_for(std::chrono::milliseconds(holdMs));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) die("usage: kvwire_hostile_peer <metadata file> malformed [seed] | forge <count> | flood <count> <ms> | unauth <rounds> | badaddress <rounds> | rmaput");
  std::ifstream in(argv[1], std::ios::binary);
  std::vector<uint8_t> md((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string scenario = argv[2];
  FirstRegion region;
  const std::vector<uint8_t> address = workerAddressOf(md, scenario == "rmaput" ? &region : nullptr);

  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_RMA;
  ucp_config_t* config = nullptr;
  if (ucp_config_read(nullptr, nullptr, &config) != UCS_OK) die("ucp_config_read");
  ucs_status_t st = ucp_init(&params, config, &context);
  ucp_config_release(config);
  if (st != UCS_OK) die("ucp_init", st);
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  if ((st = ucp_worker_create(context, &wp, &worker)) != UCS_OK) die("ucp_worker_create", st);
  ucp_address_t* own = nullptr;
  size_t ownLength = 0;
  if ((st = ucp_worker_get_address(worker, &own, &ownLength)) != UCS_OK) die("ucp_worker_get_address", st);
  // Replies the target sends back are dropped; UCX 1.13 crashes on ids without a handler.
  for (uint16_t id = 0; id < 32; ++id) {
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB;
    hp.id = id;
    hp.cb = [](void*, const void*, size_t, void*, size_t, const ucp_am_recv_param_t*) { return UCS_OK; };
    ucp_worker_set_am_recv_handler(worker, &hp);
  }
  ownAddress.assign(reinterpret_cast<uint8_t*>(own), reinterpret_cast<uint8_t*>(own) + ownLength);
  ucp_worker_release_address(worker, own);
  ucp_ep_params_t ep_params{};
  ep_params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  ep_params.address = reinterpret_cast<const ucp_address_t*>(address.data());
  ep_params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  if ((st = ucp_ep_create(worker, &ep_params, &ep)) != UCS_OK) die("ucp_ep_create", st);

  if (scenario == "malformed")
    malformed(argc > 3 ? static_cast<uint32_t>(std::strtoul(argv[3], nullptr, 10)) : 1);
  else if (scenario == "forge")
    forge(argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 1000);
  else if (scenario == "vramrevoke")
    vramRevoke(argc > 3 ? static_cast<uint32_t>(std::strtoul(argv[3], nullptr, 10)) : 1,
               argc > 4 ? std::strtoull(argv[4], nullptr, 10) : 1000);
  else if (scenario == "rmaput")
    rmaPut(region);
  else if (scenario == "unauth")
    unauthenticated(argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 100);
  else if (scenario == "badaddress")
    badAddresses(argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 100);
  else if (scenario == "flood")
    flood(argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 100000, argc > 4 ? std::atoi(argv[4]) : 3000);
  else
    die("unknown scenario");
  // Stay connected a moment so the target handles everything while this connection is up.
  for (auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(500); std::chrono::steady_clock::now() < until;)
    ucp_worker_progress(worker);
  std::printf("sent %llu messages\n", static_cast<unsigned long long>(sent));
  std::fflush(stdout);
  // No graceful close: an attacker just goes away (the target sees the connection fail).
  std::_Exit(0);
}
