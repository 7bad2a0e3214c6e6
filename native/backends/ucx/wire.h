// The active-message protocol kvwire speaks between two UCX workers. Every header is a fixed-size
// little-endian struct; a receiver checks the length before reading and trusts no address in it.
#pragma once
#include <cstdint>
#include <cstring>

namespace kvwire::ucx {

enum AmId : uint16_t {
  kAmHello = 1,        // initiator -> target: who I am (binds the connection to a name)
  kAmWrite = 2,        // initiator -> target: one segment of a WRITE, data attached
  kAmWriteCommit = 3,  // initiator -> target: all segments posted; notification attached
  kAmAck = 4,          // target -> initiator: WRITE landed (or why not)
  kAmReadRequest = 5,  // initiator -> target: segments to send back
  kAmReadData = 6,     // target -> initiator: one segment of a READ
  kAmReadDone = 7,     // target -> initiator: everything sent (or why not)
  kAmNotify = 8,       // either way: a notification on its own
  kAmWritePacked = 9,  // initiator -> target: many small WRITE segments in one message
  kAmReadPacked = 10,  // target -> initiator: a run of small READ segments in one message
  kAmBye = 11,         // either way: this agent is closing; the connection it came on is over
  kAmPing = 12,        // initiator -> target: are you there? (a peer with work pending went quiet)
  kAmPong = 13,        // target -> initiator: yes (the ping's token)
  kAmChallenge = 14,   // target -> initiator: prove you hold the secret (and here is my proof)
  kAmAuth = 15,        // initiator -> target: my proof; the target serves the connection from now on
  kAmCmaProbe = 16,    // initiator -> target: may I copy your registered regions myself? (a nonce to store)
  kAmCmaProof = 17,    // target -> initiator: yes, I am pid P and your nonce is at address A (or no)
  kAmRevoke = 18,      // target -> initiator: region R is withdrawn; stop copying into it, publish your safe epoch
  kAmRevokeAck = 19,   // initiator -> target: look at my grant slot now (a hint; the slot is what counts)
  kAmVramRevoke = 20,     // target -> initiator: VRAM region R is withdrawn; stop, close it, then acknowledge
  kAmVramRevokeAck = 21,  // initiator -> target: nothing of mine touches region R any more (it may be freed)
};

// Same-host one-sided copies (path 'cma'), for regions UCX cannot map into the peer (registered
// memory). The initiator sends PROBE {token, its pid, nonce N}; the target stores N in its own
// memory and answers PROOF {token, its pid P, address A}; the initiator reads 16 bytes at A in
// process P with process_vm_readv and uses the path only if they are N. So the process it will
// copy into is the one answering on this connection (a peer cannot name another process: it would
// have to write N into it), in this process's pid namespace, and the kernel lets this process
// reach it (same user, ptrace rules); the address must be a grant slot of the target's kvwire
// table mapping (a memfd no region covers), so it cannot be faked in writable memory. Every copy
// then reads the region's bounds and rights from that table. Deregistering withdraws the entry and
// raises the table's epoch to W; the memory is kept until every grant slot that may hold a copy in
// flight shows a safe epoch >= W, which the copying process writes there itself with
// process_vm_writev (no peer can forge it: only a process that may copy into the target can write
// there), or until a deadline. REVOKE tells a grantee to stop and publish; REVOKE_ACK only makes
// the target look again.

// The authenticated handshake (both sides hold the agent `secret`):
//   initiator -> target   HELLO      name, agent id, nonce A, worker address
//   target -> initiator   CHALLENGE  nonce A, nonce B, MAC_T    (on the endpoint HELLO came on)
//   initiator -> target   AUTH       nonce B, MAC_I             (MAC_I covers the worker address)
//   target -> initiator   HELLO reply, bind MAC, on the target's own endpoint: the connection is served
// MAC = HMAC-SHA256(secret, label | nonce A | nonce B | initiator id | target id | initiator name |
// target name [| SHA-256(initiator's worker address)]), one label per message, so no MAC can be
// replayed as another. Nothing from a connection is served, and no address from it is parsed,
// before AUTH verifies. A target without a secret answers HELLO as before, unauthenticated.
constexpr size_t kNonceBytes = 16;
constexpr size_t kMacBytes = 32;

// Segments up to kPackSegmentMax bytes travel packed, up to kPackBytesMax bytes per message: one
// active message per tiny descriptor costs more than copying it. Measured (bench/pair.cjs, 10,000 x
// 256 B, registered memory): shm 0.48 -> 1.02 GB/s WRITE, tcp 0.04 -> 0.45 GB/s. Packing 4 KiB
// segments, or packs above the eager size (8 KiB), made shm slower, so both limits stay small.
constexpr uint32_t kPackSegmentMax = 1u << 10;
constexpr size_t kPackBytesMax = 8u << 10;

constexpr uint32_t kWireVersion = 5;  // 4: CMA probe, proof and revocation; 5: VRAM revocation

#pragma pack(push, 1)
struct HelloHeader {  // data: the sender's name, then its worker address (a reply: then its bind MAC, if auth)
  uint32_t version;
  uint32_t nameLength;
  uint32_t isReply;  // 1: the target's answer on its own endpoint, so the initiator can name it too
  uint64_t agentId;  // the sender's instance: a HELLO from a new instance of a name ends the old one's connections
  uint8_t nonce[kNonceBytes];  // the initiator's nonce (a reply echoes it)
  uint32_t auth;     // 1: the sender holds a secret (a reply: a bind MAC follows its name)
};
struct ChallengeHeader {  // data: MAC_T
  uint8_t initiatorNonce[kNonceBytes];
  uint8_t targetNonce[kNonceBytes];
};
struct AuthHeader {  // data: MAC_I
  uint8_t targetNonce[kNonceBytes];
};
struct ByeHeader {
  uint64_t agentId;  // the closing instance: a loaded peer of another instance is left alone
  uint32_t moved;    // 1: not closing, moved to a new UCX worker (new address: load its metadata again)
};
struct PingHeader {  // PING and PONG
  uint64_t token;
};
struct CmaProbeHeader {
  uint64_t token;  // random: names this grant in PROOF, REVOKE and REVOKE_ACK
  uint64_t pid;    // the initiator's pid (the target keeps a revoked region while it lives)
  uint8_t nonce[kNonceBytes];
};
struct CmaProofHeader {
  uint64_t token;
  uint64_t pid;      // the target's pid; 0: refused
  uint64_t address;  // where the nonce is, in the target
};
struct RevokeHeader {  // REVOKE and REVOKE_ACK
  uint64_t token;
  uint64_t seq;
  uint32_t regionId;
};
struct VramRevokeHeader {  // VRAM_REVOKE and VRAM_REVOKE_ACK
  // The initiator's HELLO nonce: names the connection (only its two ends know it), so a revoke
  // reaches exactly the peer that connection belongs to and a stranger cannot forge one.
  uint8_t nonce[kNonceBytes];
  uint64_t seq;  // random per connection and withdrawal: the ACK names it
  uint32_t regionId;
};
struct WriteHeader {
  uint64_t transferId;
  uint32_t regionId;
  uint32_t firstIndex;
  uint64_t offset;
  uint64_t length;
};
struct CommitHeader {
  uint64_t transferId;
  uint64_t segments;
  uint32_t hasNotify;
};
struct StatusHeader {  // ACK and READ_DONE
  uint64_t transferId;
  uint32_t code;
  int64_t index;
};
struct ReadRequestHeader {
  uint64_t transferId;
  uint32_t regionId;
  uint32_t segments;
};
struct ReadSegment {  // payload of READ_REQUEST, one per segment
  uint64_t offset;
  uint64_t length;
  uint32_t firstIndex;
};
struct ReadDataHeader {
  uint64_t transferId;
  uint32_t segment;
};
struct PackedWriteHeader {  // data: count x PackedEntry, then the segments' bytes in order
  uint64_t transferId;
  uint32_t regionId;
  uint32_t count;
};
struct PackedEntry {
  uint64_t offset;
  uint32_t length;
  uint32_t firstIndex;
};
struct PackedReadHeader {  // data: segments [firstSegment, firstSegment + count) back to back
  uint64_t transferId;
  uint32_t firstSegment;
  uint32_t count;
};
#pragma pack(pop)

template <typename T>
bool readHeader(const void* header, size_t length, T* out) {
  if (length != sizeof(T) || header == nullptr) return false;
  std::memcpy(out, header, sizeof(T));
  return true;
}

}  // namespace kvwire::ucx
