// Cross-memory attach: copies between this process and another on the same host with
// process_vm_readv/writev (path 'cma', wire.h). Safe to call from the copy pool's threads.
#pragma once
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../../core/status.h"

namespace kvwire::ucx {

struct CmaSpan {
  uint8_t* local;   // in this process
  uint8_t* remote;  // an address in the peer process
  uint64_t length;
};

// Copies every span (write: local -> remote; read: remote -> local) in as few system calls as the
// kernel's iovec limit allows. Names the first span that failed and why.
Status cmaCopy(pid_t pid, bool write, const CmaSpan* spans, size_t count);

// Reads `length` bytes at `remote` in process `pid` into `out`; true if all of them were read.
bool cmaRead(pid_t pid, uint64_t remote, void* out, size_t length);

// What a target lets same-host grantees reach, kept in its own memory and read by them with
// process_vm_readv before every copy: the bounds and rights of a copy come from the process copied
// into, never from metadata (which a third party may have forged, or which may be stale).
struct CmaEntry {    // one region; slot = id % CmaTable::kSlots
  uint64_t seq;      // odd while being written (a seqlock: readers retry or give up)
  uint32_t id;
  uint32_t access;   // kvwire access bits; 0: withdrawn
  uint64_t base;
  uint64_t length;
};
struct CmaGrant {    // one grant: the nonce its initiator sent, and where the entries are
  uint8_t nonce[16];
  uint64_t entries;
  uint64_t slots;
};

class CmaTable {
 public:
  static constexpr uint32_t kSlots = 4096;
  static constexpr uint32_t kGrants = 4096;
  CmaTable() = default;
  CmaTable(const CmaTable&) = delete;
  CmaTable& operator=(const CmaTable&) = delete;
  // The mapping is never unmapped: a grantee may still read it after this table is gone, and must
  // then find nothing (it is left without access), never memory reused for something else.
  ~CmaTable();
  bool init();
  bool ok() const { return entries_ != nullptr; }
  // A region two ids share a slot with stays unpublished (its copies go by active messages).
  void publish(uint32_t id, uint32_t access, uint64_t base, uint64_t length);
  void withdraw(uint32_t id);
  void withdrawAll();
  // A grant slot holding `nonce` (-1: none free); its address for the PROOF; ending it clears it.
  int grant(const uint8_t* nonce);
  uint64_t grantAddress(int slot) const { return reinterpret_cast<uint64_t>(&grants_[slot]); }
  void endGrant(int slot);

 private:
  void write(CmaEntry& e, uint32_t id, uint32_t access, uint64_t base, uint64_t length);
  CmaEntry* entries_ = nullptr;
  CmaGrant* grants_ = nullptr;
  size_t bytes_ = 0;
  std::vector<int> free_;
};

// Initiator: the entry of region `id` in the target's table, read through the grant at `grant`
// (whose nonce must still be ours). Ok only for a consistent, live entry of that id.
enum class CmaLookup { Ok, GrantGone, NotPublished };
CmaLookup cmaLookup(pid_t pid, uint64_t grant, const uint8_t* nonce, uint32_t id, CmaEntry* out);

}  // namespace kvwire::ucx
