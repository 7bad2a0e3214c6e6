// Cross-memory attach: copies between this process and another on the same host with
// process_vm_readv/writev (path 'cma', wire.h). Safe to call from the copy pool's threads.
#pragma once
#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "../../core/status.h"

namespace kvwire::ucx {

struct CmaSpan {
  uint8_t* local;   // in this process
  uint8_t* remote;  // an address in the peer process
  uint64_t length;
};

// Copies every span (write: local -> remote; read: remote -> local) in as few system calls as the
// kernel's iovec limit allows. Names the first span that failed and why. `stop`, when set, is
// checked before each system call (the target revoked the region: ERR_NOT_FOUND).
Status cmaCopy(pid_t pid, bool write, const CmaSpan* spans, size_t count, const std::atomic<bool>* stop = nullptr);

// Reads `length` bytes at `remote` in process `pid` into `out`; true if all of them were read.
bool cmaRead(pid_t pid, uint64_t remote, void* out, size_t length);

// What a target lets same-host grantees reach, kept in its own memory and read by them with
// process_vm_readv before every copy: the bounds and rights of a copy come from the process copied
// into, never from metadata (which a third party may have forged, or which may be stale).
struct CmaEntry {    // one region; slot = id % kCmaSlots
  uint64_t seq;      // odd while being written (a seqlock: readers give up on a changing entry)
  uint32_t id;
  uint32_t access;   // kvwire access bits; 0: withdrawn
  uint64_t base;
  uint64_t length;
};
struct CmaGrant {    // one grant: the nonce its initiator sent, and where the entries are
  uint8_t nonce[16];
  uint64_t entries;
  uint64_t slots;
  // Written by the grantee itself (process_vm_writev: only a process that may copy into this one
  // can): every copy it still runs began at or after this epoch. Twice, so a torn write shows.
  uint64_t safeEpoch[2];
};
struct CmaHeader {   // at the start of the table
  uint64_t epoch;    // raised after every withdrawal
  uint64_t reserved[3];
};
constexpr uint32_t kCmaSlots = 4096;
constexpr uint32_t kCmaGrants = 4096;
constexpr size_t kCmaTableBytes = sizeof(CmaHeader) + sizeof(CmaEntry) * kCmaSlots + sizeof(CmaGrant) * kCmaGrants;
// The table lives in a memfd mapping of this name, which no peer can write into (no region ever
// covers it): a grant is believed only if it lies there (checked in /proc/<pid>/maps), so a grant
// and table faked inside some writable region of a process are refused.
constexpr char kCmaTableName[] = "kvwire-cma-table";

class CmaTable {
 public:
  CmaTable() = default;
  CmaTable(const CmaTable&) = delete;
  CmaTable& operator=(const CmaTable&) = delete;
  // The mapping is never unmapped: a grantee may still read it after this table is gone, and must
  // then fail (it is made inaccessible), never find memory reused for something else.
  ~CmaTable();
  bool init();
  bool ok() const { return entries_ != nullptr; }
  // A region two ids share a slot with stays unpublished (its copies go by active messages).
  void publish(uint32_t id, uint32_t access, uint64_t base, uint64_t length);
  // Withdraws region `id` and returns the epoch from which no copy can start into it.
  uint64_t withdraw(uint32_t id);
  void withdrawAll();
  // A grant slot holding `nonce` (-1: none free); its address for the PROOF; ending it clears it.
  // An ended slot is not given again for `coolNs`: its grantee may still write its epoch there.
  int grant(const uint8_t* nonce, uint64_t nowNs);
  uint64_t grantAddress(int slot) const { return reinterpret_cast<uint64_t>(&grants_[slot]); }
  void endGrant(int slot, uint64_t nowNs, uint64_t coolNs);
  // What the grantee of `slot` last wrote (0 while a write of it is torn).
  uint64_t safeEpoch(int slot) const;
  // Slots of grants that ended less than their cooling time ago.
  void coolingSlots(uint64_t nowNs, std::vector<int>* out) const {
    for (const auto& [until, slot] : cooling_)
      if (until > nowNs) out->push_back(slot);
  }

 private:
  void write(CmaEntry& e, uint32_t id, uint32_t access, uint64_t base, uint64_t length);
  CmaHeader* header_ = nullptr;
  CmaEntry* entries_ = nullptr;
  CmaGrant* grants_ = nullptr;
  std::vector<int> free_;
  std::vector<std::pair<uint64_t, int>> cooling_;  // (free again at, slot)
};

// Initiator, once per grant: the grant at `grant` in process `pid` holds `nonce` and lies in that
// process's kvwire table mapping, at a grant slot. Sets *table to the table's start; else returns
// why not.
std::string cmaVerifyGrant(pid_t pid, uint64_t grant, const uint8_t* nonce, uint64_t* table);

// Initiator, before every copy: the entry of region `id`, read through a verified grant (whose
// nonce must still be ours), and the table's epoch read before it (*epoch). Ok only for a
// consistent, live entry of that id.
enum class CmaLookup { Ok, GrantGone, NotPublished };
CmaLookup cmaLookup(pid_t pid, uint64_t grant, uint64_t table, const uint8_t* nonce, uint32_t id, CmaEntry* out,
                    uint64_t* epoch);
// Initiator: a pidfd of `pid` (-1 where the kernel has none), taken before the grant is verified, and
// whether that process has exited since (its pid may then name another process).
int cmaWatch(pid_t pid);
bool cmaGone(int pidfd);

// Initiator: the table's epoch now (0 if unreadable), and writing its own safe epoch into its grant.
uint64_t cmaEpoch(pid_t pid, uint64_t table);
bool cmaWriteSafeEpoch(pid_t pid, uint64_t grant, uint64_t epoch);

}  // namespace kvwire::ucx
