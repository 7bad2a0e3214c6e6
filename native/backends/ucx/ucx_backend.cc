#include "ucx_backend.h"

#include <ucp/api/ucp.h>

#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <mutex>
#include <thread>
#include <deque>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "../../core/copy_pool.h"
#include "../../core/hmac.h"
#include "../../cuda/vram.h"
#include "address_check.h"
#include "cma.h"
#include "wire.h"

namespace kvwire {
namespace {

using ucx::AmId;

std::string ucsMessage(const char* what, ucs_status_t st) {
  return std::string(what) + ": " + ucs_status_string(st);
}

// memcpy for bytes off the wire: a message with no data may come with a null pointer, and memcpy
// from null is undefined even for 0 bytes (UndefinedBehaviorSanitizer: npm run test:asan).
inline void copyBytes(void* dst, const void* src, size_t n) {
  if (n != 0) std::memcpy(dst, src, n);
}

// UCX failures that mean "the other side is gone".
bool isDisconnect(ucs_status_t st) {
  return st == UCS_ERR_CONNECTION_RESET || st == UCS_ERR_ENDPOINT_TIMEOUT || st == UCS_ERR_UNREACHABLE ||
         st == UCS_ERR_CANCELED || st == UCS_ERR_REJECTED || st == UCS_ERR_NOT_CONNECTED ||
         st == UCS_ERR_IO_ERROR;
}

Status fromUcs(const char* what, ucs_status_t st) {
  return {isDisconnect(st) ? Code::RemoteDisconnect : Code::Backend, ucsMessage(what, st)};
}

struct ContextHolder {
  ucp_context_h context = nullptr;
  ~ContextHolder() {
    if (context) ucp_cleanup(context);
  }
};

class UcxMemory : public BackendMemory {
 public:
  UcxMemory(std::shared_ptr<ContextHolder> ctx, ucp_mem_h memh) : ctx_(std::move(ctx)), memh_(memh) {}
  ~UcxMemory() override { ucp_mem_unmap(ctx_->context, memh_); }

 private:
  std::shared_ptr<ContextHolder> ctx_;  // the context outlives every mapping made in it
  ucp_mem_h memh_;
};

struct RkeyDeleter {
  void operator()(ucp_rkey_h k) const { ucp_rkey_destroy(k); }
};

struct RemoteRegion {
  RegionInfo info;
  std::unique_ptr<ucp_rkey, RkeyDeleter> rkey;
  uint8_t* mapped = nullptr;  // non-null when the peer's memory is mapped into this process
  // A VRAM region, opened through its CUDA IPC handle: once per local device whose stream copies.
  std::map<int, std::shared_ptr<cuda::IpcMapping>> vram;
  // The mapped host memory page-locked for cuda_ipc copies (declared after rkey: unregistered
  // before the mapping goes).
  std::shared_ptr<void> pinned;
  bool pinTried = false;
  bool revoked = false;  // its owner withdrew it (VRAM_REVOKE): no copy into it starts any more
  std::string ipcFailed;  // why its IPC handle did not open here (then 'auto' takes 'am')
  Code ipcFailedCode = Code::Unavailable;  // and the code it failed with (repeated to later transfers)
};
using RemoteRegionRef = std::shared_ptr<RemoteRegion>;

class UcxBackendImpl;

class UcxPeer : public BackendPeer {
 public:
  UcxPeer(UcxBackendImpl* backend, uint64_t key, std::string name) : backend_(backend), key_(key), name_(std::move(name)) {}
  ~UcxPeer() override;
  Status updateRegions(const AgentMetadata& md) override;
  Path choosePath(uint32_t remoteRegionId, const LocalRegion& local, Path requested, uint64_t bytes, size_t segments,
                  Status* why) override;
  // Path 'cuda_ipc': why it cannot move between `local` and `rr` (ok when it can).
  Status cudaIpcReady(const LocalRegion& local, const RemoteRegion& rr) const;
  // The peer's VRAM region opened on `device` (through its IPC handle, the first time).
  Result<std::shared_ptr<cuda::IpcMapping>> openVram(RemoteRegion& rr, int device);
  void markGone() override {
    failed_ = true;
    dropMappings();
  }
  // The peer is gone or failed: its VRAM is closed here (each mapping once the copies holding it end),
  // so no mapping outlives memory its owner may free without being able to tell us.
  void dropMappings() {
    for (auto& [id, rr] : regions_) rr->vram.clear();
  }

  UcxBackendImpl* backend_;
  uint64_t key_;
  std::string name_;
  uint64_t agentId_ = 0;
  ucp_ep_h ep_ = nullptr;
  bool failed_ = false;
  // Liveness: when we last heard from this peer, and the ping we are waiting on (0: none).
  uint64_t lastHeardNs_ = 0;
  uint64_t pingToken_ = 0;
  uint64_t pingSentNs_ = 0;
  std::unordered_map<uint32_t, RemoteRegionRef> regions_;
  // The authenticated handshake (with a secret): our nonce and the target's, whether we sent our
  // proof, and whether the target has answered that it serves us. Until then transfers and
  // notifications wait here (in order); one that waits longer than kHandshakeNs fails the peer.
  uint8_t nonce_[ucx::kNonceBytes] = {};
  uint8_t targetNonce_[ucx::kNonceBytes] = {};
  bool proved_ = false;
  bool authenticated_ = true;
  // The target has named this connection (its HELLO reply arrived): it knows us, so it will tell us
  // when it withdraws a VRAM region. cuda_ipc waits for this (as transfers wait for authentication).
  bool named_ = false;
  uint64_t waitingSinceNs_ = 0;
  struct Waiting {
    TransferRef t;     // a transfer, or (null) a notification
    std::string note;
  };
  std::vector<Waiting> waiting_;
  // Path 'cma' (wire.h): usable once the target proved, on this connection, which process it is.
  // Every copy then checks the region's bounds and rights in the target's own table (cma.h).
  enum class Cma : uint8_t { Off, Probing, Ready } cma_ = Cma::Off;
  uint64_t cmaToken_ = 0;
  uint8_t cmaNonce_[ucx::kNonceBytes] = {};
  pid_t cmaPid_ = 0;
  int cmaPidfd_ = -1;        // that process, even after its pid is reused
  uint64_t cmaGrant_ = 0;    // where the target keeps our grant (verified: in its kvwire table)
  uint64_t cmaTableAddr_ = 0;  // and that table's start
  static constexpr uint64_t kCmaSegmentMin = 16u << 10;  // mean segment size from which 'auto' picks cma
  static constexpr uint64_t kCmaBatchMin = 256u << 10;   // and batch size
  bool cmaUsable(const RemoteRegion& rr) const { return cma_ == Cma::Ready && rr.info.kind == MemKind::Dram; }
};

// Host memory that VRAM bytes pass through on path 'am' where UCX is not given the device address
// (a UCX without CUDA memory support: it would read a device address as host memory; and packed
// small segments, which host code gathers). What the connections being served hold is counted:
// each may hold `perConnection` bytes, all together never more than `total`, and the last quarter of
// `total` is kept for connections holding less than `fairShare` (so a few connections that never
// finish their transfers cannot starve the others). What does not fit now waits
// (UcxBackendImpl::stagingWaits_) until some is released; what can never fit (one READ, or one
// segment, larger than `perConnection`) is refused.
struct StagingLedger {
  explicit StagingLedger(uint64_t limit) : perConnection(limit), total(4 * limit), fairShare(limit / 16) {}
  const uint64_t perConnection, total, fairShare;
  uint64_t held = 0;
  std::map<ucp_ep_h, uint64_t> byConnection;
  bool released = false;  // some was released since the waiters were last tried
  uint64_t heldBy(ucp_ep_h conn) const {
    auto it = byConnection.find(conn);
    return it == byConnection.end() ? 0 : it->second;
  }
  bool fits(ucp_ep_h conn, uint64_t bytes) const {
    const uint64_t mine = heldBy(conn);
    if (bytes > perConnection - std::min(perConnection, mine) || bytes > total - std::min(total, held)) return false;
    return mine + bytes <= fairShare || held + bytes <= total - total / 4;
  }
  Status tooLarge(uint64_t bytes) const {
    return {Code::Unavailable, "VRAM moved by path 'am' passes through host memory at this agent, and " + std::to_string(bytes) +
                                   " bytes at once (one READ, or one segment) are more than the " +
                                   std::to_string(perConnection >> 20) + " MiB a connection may stage "
                                   "(KVWIRE_VRAM_STAGING_LIMIT): split the batch"};
  }
};
class Staging {
 public:
  // `conn`: the connection served (counted in `ledger`; the caller checked fits()); nullptr: this
  // agent's own transfer (not counted).
  static Result<std::shared_ptr<Staging>> take(const std::shared_ptr<StagingLedger>& ledger, ucp_ep_h conn, uint64_t bytes) {
    std::shared_ptr<Staging> s(new Staging());
    s->data_.reset(new (std::nothrow) uint8_t[bytes == 0 ? 1 : bytes]);  // not zeroed: every byte is written before use
    if (!s->data_)
      return Status(Code::Unavailable, "no host memory for " + std::to_string(bytes) + " bytes of VRAM moving by path 'am'");
    if (conn != nullptr) {
      s->ledger_ = ledger;
      s->conn_ = conn;
      s->bytes_ = bytes;
      ledger->byConnection[conn] += bytes;
      ledger->held += bytes;
    }
    return s;
  }
  ~Staging() {
    if (!ledger_) return;
    ledger_->held -= bytes_;
    ledger_->released = true;
    auto it = ledger_->byConnection.find(conn_);
    if (it != ledger_->byConnection.end() && (it->second -= bytes_) == 0) ledger_->byConnection.erase(it);
  }
  uint8_t* data() const { return data_.get(); }

 private:
  Staging() = default;
  std::unique_ptr<uint8_t[]> data_;
  std::shared_ptr<StagingLedger> ledger_;
  ucp_ep_h conn_ = nullptr;
  uint64_t bytes_ = 0;
};
using StagingRef = std::shared_ptr<Staging>;

inline uint64_t addressOf(const void* p) { return reinterpret_cast<uint64_t>(p); }

// Everything a UCX request carries back to its completion callback.
struct RequestContext {
  enum Kind : uint8_t {
    kControl, kWriteData, kReadDataSend, kInboundWrite, kInboundRead, kFlush, kNotify, kControlRecv, kBye
  } kind;
  UcxBackendImpl* backend = nullptr;
  bool orphaned = false;                // its worker is being destroyed: nothing to do but free it
  // Between callbackParam and track: the UCX call that takes this context has not returned yet. A
  // callback then (UCX completing inside the call yet returning a request anyway: possible for
  // ucp_am_recv_data_nbx in UCX 1.13 and 1.22, found by review) is recorded, and track() finishes it.
  bool posting = false;
  bool completedInline = false;
  ucs_status_t inlineStatus = UCS_OK;
  TransferRef transfer;                 // initiator side
  LocalRegionRef hold;                  // memory that must stay mapped while UCX uses it
  RemoteRegionRef remote;               // rkey an RMA transfer uses
  std::pair<ucp_ep_h, uint64_t> inbound{nullptr, 0};  // target side WRITE key
  ucp_ep_h servedOn = nullptr;          // kReadDataSend: the connection a read is served on
  uint32_t segment = 0;
  alignas(8) uint8_t header[48];
  size_t headerLength = 0;
  template <typename H>
  void setHeader(const H& h) {  // a wire header (wire.h), sent ahead of the payload
    static_assert(sizeof(H) <= sizeof(header), "wire header too large");
    std::memcpy(header, &h, sizeof h);
    headerLength = sizeof h;
  }
  std::string payload;                  // bytes that must outlive the send (or a received request list)
  ucp_ep_h reply = nullptr;             // the connection a received control message came on
  AmId amId = ucx::kAmHello;            // kControlRecv: which message is being received
  // VRAM on path 'am' through host memory: the staging buffer a send reads or a receive lands in,
  // and (receives) the device address of device `stagedDevice` the bytes are copied to after.
  StagingRef staging;
  uint64_t stagedTo = 0;
  uint64_t stagedBytes = 0;
  int stagedDevice = -1;
  uint32_t stagedIndex = 0;  // the WRITE segment's descriptor index
};

// Control messages (notifications, read lists) larger than this are refused; so are more than
// kMaxControlRecvBytes of them being received at once.
constexpr size_t kMaxControlBytes = 64u << 20;
constexpr size_t kMaxControlRecvBytes = 256u << 20;

// A peer's WRITE as the target tracks it until every segment landed and the commit arrived.
struct InboundWrite {
  int64_t expected = -1;
  uint64_t landed = 0;
  Status error;
  bool hasNotify = false;
  std::string notify;
};

class UcxBackendImpl : public Backend {
 public:
  UcxBackendImpl(BackendHost* host) : host_(host) {}
  ~UcxBackendImpl() override;
  Status init(const BackendOptions& options);
  Status openWorker();
  // The receive queue is blocked for good (see sendCanary): this worker is abandoned (never
  // progressed or destroyed again: UCX may still hold requests on it) and a new one opened; every
  // transfer in flight fails, connections served end, and the host reconnects loaded peers.
  void rebuildWorker();
  // A worker given up in a rebuild, with what UCX still held on it: released when the agent closes
  // (by then no peer, transfer or key of it is left), the contexts before the worker.
  struct Abandoned {
    ucp_worker_h worker = nullptr;
    std::vector<RequestContext*> requests;
  };
  std::vector<Abandoned> abandoned_;
  // Destroys a worker with requests UCX never completed. ucp_worker_destroy calls back for some of
  // them (sends pending on its endpoints, purged when it destroys them: measured, 1.13) and not for
  // others (receives from a dead peer: UCX 1.13 only warns "was not returned to mpool"): each
  // context is marked orphaned first, so a callback just frees it, and the rest are freed after. A
  // key a context still holds is kept, not destroyed: UCX (1.13 and 1.22) returns keys to a pool of
  // the worker they were unpacked on, which is gone by then. (Such a key is an RMA transfer's, in
  // flight when its worker was given up; its mapping of the peer's memory stays for the process.)
  void releaseWorker(ucp_worker_h worker, std::vector<RequestContext*>& requests);
  std::unordered_set<RequestContext*> orphans_;
  static void freeOrphan(RequestContext* op);
  const char* name() const override { return "ucx"; }
  Result<std::unique_ptr<BackendMemory>> allocate(uint64_t length) override;
  Result<std::unique_ptr<BackendMemory>> registerMemory(uint8_t* ptr, uint64_t length) override;
  std::vector<uint8_t> address() const override { return address_; }
  Result<std::unique_ptr<BackendPeer>> connect(const AgentMetadata& md, uint64_t peerKey) override;
  Status post(BackendPeer& peer, const TransferRef& t) override;
  void regionRegistered(const LocalRegionRef& region) override;
  void regionDeregistered(const LocalRegionRef& region) override;
  uint64_t retiredRegions() const override {
    uint64_t n = retired_.size();
    for (const auto& w : heldVram_) {
      LocalRegionRef r = w.lock();
      if (r && std::none_of(retired_.begin(), retired_.end(), [&](const Retired& x) { return x.region == r; })) ++n;
    }
    return n;
  }
  // Deregistered VRAM that another library owns (register): counted in retiredRegions while anything
  // of this agent still holds it (a transfer, an 'am' request moving bytes in or out), so its owner
  // knows when it may free it.
  std::vector<std::weak_ptr<LocalRegion>> heldVram_;
  std::string gpuFault() const override { return gpuFault_; }
  std::string gpuFault_;  // the first GPU copy that failed (empty: none)
  uint64_t vramStagedBytes() const override { return vramStagedBytes_; }
  uint64_t vramStagedBytes_ = 0;  // VRAM bytes copied through host memory for path 'am' (copyStaged)
  uint64_t gpuKernelBatches() const override {
    uint64_t n = 0;
    for (const auto& [device, queue] : cudaQueues_) n += queue->kernelLaunches();
    return n;
  }
  Status notify(BackendPeer& peer, const std::string& message) override;
  bool abandon(const TransferRef& t, bool peerGone) override;
  // An ending transfer's last landing byte arrived: settle it now.
  void settleIfQuiet(const TransferRef& t);
  int eventFd() const override { return efd_; }
  bool progress() override;
  bool arm() override;
  bool busy() const override {
    if (!requests_.empty() || !inbound_.empty() || !closing_.empty() || !copyJobs_.empty() || !retired_.empty() ||
        !cudaJobs_.empty())
      return true;
    for (const auto& [ep, peer] : peersByEp_)  // work waiting for a handshake needs its timeout checked
      if (!peer->waiting_.empty()) return true;
    return false;
  }
  bool needsPolling() const override { return !cudaJobs_.empty(); }
  void finishLocalCopies() override {
    for (auto& [device, queue] : cudaQueues_) queue->drain();
    ackVramRevokes(true);  // every copy has ended: the revocations they held up are acknowledged while the peers are here
    // The copy pool's jobs report when done (copied_); wait for every one in flight.
    for (;;) {
      size_t done = 0;
      {
        std::lock_guard<std::mutex> lock(copiedMutex_);
        for (uint64_t id : copied_) done += copyJobs_.count(id);
      }
      if (done >= copyJobs_.size()) return;
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }
  SecurityCounters securityCounters() const override { return counters_; }
  std::vector<ConnectionInfo> describeConnections() override;
  bool receiveBlocked() const override { return receiveBlocked_; }
  void rebuild() override {
    rebuildWanted_ = false;
    rebuildWorker();
  }
  uint64_t rebuilds() const override { return rebuilds_; }
  void shutdown() override;

  Result<RemoteRegionRef> unpackRegion(UcxPeer& peer, const RegionInfo& info);
  void closeEndpoint(ucp_ep_h ep, bool force);
  // HELLO: name and worker address (initiator), or name and bind MAC (a target's reply).
  void sendHello(ucp_ep_h ep, bool isReply, const uint8_t* nonce, const std::string& extra);
  Status notifyConnection(const std::string& name, const std::string& message) override;
  void forgetPeer(UcxPeer* peer) { peersByEp_.erase(peer->ep_); }
  void forgetGrant(uint64_t token) {  // its peer is gone: kept while pool copies of it still run
    auto it = heldGrants_.find(token);
    if (it == heldGrants_.end()) return;
    if (oldestCopy(token) == 0) heldGrants_.erase(it);
    else it->second.peerGone = true;
  }
  bool shuttingDown() const { return shuttingDown_; }

 private:
  friend class UcxPeer;
  Result<std::unique_ptr<BackendMemory>> map(uint8_t* ptr, uint64_t length, bool allocate);

  // Sends one active message owned by `op`; returns false (and has already reported) on failure.
  // `device`: `data` is VRAM, handed to UCX with its memory type (only where ucxCuda_).
  bool send(ucp_ep_h ep, AmId id, std::unique_ptr<RequestContext> op, const void* data, size_t length, bool reply,
            bool device = false);
  // Receives a rendezvous message's data at `dst` (VRAM, with its memory type, where `device`).
  void receive(void* data, void* dst, size_t length, std::unique_ptr<RequestContext> op, bool device);
  // VRAM on path 'am': this UCX takes device addresses with their memory type (it was built with CUDA
  // support and loaded it, and KVWIRE_VRAM_STAGING is not set), so large segments go without a host
  // copy (GPUDirect RDMA where a NIC offers it; UCX's own staging otherwise). Else kvwire stages them
  // through host memory itself: a device address never reaches UCX.
  bool ucxCuda_ = false;
  uint64_t stagingLimit_ = 1ull << 30;  // per connection served (KVWIRE_VRAM_STAGING_LIMIT)
  std::shared_ptr<StagingLedger> staging_ = std::make_shared<StagingLedger>(stagingLimit_);
  // What waits for staging to be released: a rendezvous WRITE segment into VRAM (its data left with
  // UCX, which holds the sender until it is received), or a READ of VRAM to serve. Bounded per
  // connection; tried again, in order, as staging is released (progress).
  struct StagingWait {
    ucp_ep_h conn = nullptr;  // the connection served (connections_ key, the ledger's)
    bool read = false;
    // WRITE:
    uint32_t firstIndex = 0;  // the segment's descriptor index (errors name it)
    void* data = nullptr;
    uint64_t length = 0;
    std::pair<ucp_ep_h, uint64_t> key{nullptr, 0};
    LocalRegionRef hold;
    uint64_t dst = 0;
    int device = 0;
    // READ:
    ucp_ep_h sendOn = nullptr;
    ucx::ReadRequestHeader header{};
    std::vector<ucx::ReadSegment> segments;
  };
  // What waits is bounded: per connection in number and in the bytes of the READ segment lists kept,
  // and those bytes in all.
  static constexpr size_t kMaxStagingWaitsPerConnection = 4096;
  static constexpr uint64_t kMaxStagingWaitBytesPerConnection = 16u << 20;
  static constexpr uint64_t kMaxStagingWaitBytes = 64u << 20;
  struct WaitCount {
    size_t waits = 0;
    uint64_t bytes = 0;
  };
  std::deque<StagingWait> stagingWaits_;
  std::unordered_map<ucp_ep_h, WaitCount> stagingWaitsByConn_;
  uint64_t stagingWaitBytes_ = 0;
  static uint64_t waitBytes(const StagingWait& w) { return w.segments.size() * sizeof(ucx::ReadSegment); }
  void countWait(const StagingWait& w) {
    WaitCount& c = stagingWaitsByConn_[w.conn];
    ++c.waits;
    c.bytes += waitBytes(w);
    stagingWaitBytes_ += waitBytes(w);
  }
  // false: this connection may not wait (too many of its own wait already, or it is not a connection
  // this agent can fail: one without an endpoint of ours)
  bool waitForStaging(StagingWait w);
  void startStagedWrite(StagingWait w);  // its staging fits (outside the AM callback): receives the segment
  void receiveStaged(StagingWait w, StagingRef staging);
  void retryStagingWaits();
  // Lets go of the waits of `conn` (nullptr: all), handing their data back to `worker`.
  void dropStagingWaits(ucp_ep_h conn, ucp_worker_h worker);
  // The largest VRAM staging of one of this agent's own transfers.
  static constexpr uint64_t kMaxOwnStaging = 4ull << 30;
  // The host copy of a local VRAM transfer's segments that go staged (all, or the packed ones where
  // ucxCuda_), and those segments pointing into it; segments UCX takes from the device keep theirs.
  Status stageOut(const TransferRef& t, StagingRef* staging, std::vector<Segment>* segments);
  // Copies `runs` between host memory and VRAM of `device` now (CopyQueue::stageNow: `toHost`, into
  // one host buffer in order; else from ascending host addresses); a failure is the GPU's (health.gpuFault).
  Status copyStaged(int device, const std::vector<cuda::CopyRun>& runs, bool toHost);
  // This agent's copy queue on `device` (created on first use).
  Result<cuda::CopyQueue*> queueFor(int device);
  void sendStatus(ucp_ep_h ep, AmId id, uint64_t transferId, const Status& st);
  void completeOp(std::unique_ptr<RequestContext> op, ucs_status_t st);
  // Hands the result of a UCX call that owns `op` over: done, failed, or tracked until its callback.
  void track(void* req, RequestContext* op);
  static ucp_request_param_t callbackParam(RequestContext* op, bool recv);
  void endTransfer(const TransferRef& t, const Status& st);
  // Sends a transfer's notification (if it has one) to its peer, after its data.
  void notifyAfter(const TransferRef& t);
  void finishRead(const TransferRef& t);
  void maybeFinishInbound(std::pair<ucp_ep_h, uint64_t> key);

  Status postDirect(UcxPeer& peer, const TransferRef& t, const RemoteRegionRef& rr);
  // Path 'cma': the initiator copies with process_vm_readv/writev into the proven peer process.
  Status postCma(UcxPeer& peer, const TransferRef& t, const RemoteRegionRef& rr);
  // Runs a direct (pid 0: memcpy into the mapping at rr->mapped) or cma copy (into process pid, at
  // remoteBase, under grant cmaToken) on the pool.
  void copyInBackground(const TransferRef& t, const RemoteRegionRef& rr, pid_t pid = 0, uint64_t cmaToken = 0,
                        uint64_t remoteBase = 0);
  // Path 'cma', target side (wire.h): grants given, by token; deregistered regions kept for them.
  void probeCma(UcxPeer& peer);
  void handleCmaProbe(ucp_ep_h reply, const ucx::CmaProbeHeader& h);
  void handleCmaProof(const ucx::CmaProofHeader& h);
  void handleRevoke(const ucx::RevokeHeader& h);
  void sendRevokeAck(const ucx::RevokeHeader& h);
  void releaseRetired();
  void endGrant(uint64_t token);
  bool cmaAllowed_ = true;
  ucx::CmaTable cmaTable_;  // what grantees may reach, read by them before every copy
  struct Grantee {
    ucp_ep_h reply = nullptr;  // the connection it was granted on
    int slot = -1;             // its grant in cmaTable_
  };
  std::unordered_map<uint64_t, Grantee> grantees_;
  static constexpr size_t kMaxGrantsPerConnection = 4;  // one per loaded peer instance; a reload or two
  // A deregistered region is withdrawn from the table at once (epoch W); copies a grantee started
  // before may still run, so its memory is kept until every grant slot that may hold such a copy
  // (live grants, and ended ones for kRetiredNs) shows a safe epoch >= W — written there by the
  // copying process itself, never taken from a message (a REVOKE_ACK only says "look now"), so a
  // peer that relayed a grant cannot make this agent release early — or kRetiredNs passed (a copy
  // takes milliseconds; a grantee that never answers, e.g. one whose REVOKE went to a relay, is not
  // waited for longer).
  struct Retired {
    LocalRegionRef region;
    uint64_t epoch = 0;
    std::vector<int> slots;
    std::vector<std::pair<uint64_t, ucp_ep_h>> vramAcks;  // a VRAM region: revocations (seq, connection) not yet acknowledged
    uint64_t deadlineNs = 0;
  };
  static constexpr uint64_t kRetiredNs = 5'000'000'000ull;
  std::vector<Retired> retired_;
  uint64_t retiredCheckNs_ = 0;
  // Initiator side, per grant token: where to write the safe epoch, and whether a REVOKE asks this
  // process to publish it as the grant's pool copies (copyJobs_) end.
  struct HeldGrant {
    pid_t pid = 0;
    uint64_t grant = 0, table = 0;
    bool revokePending = false;
    bool peerGone = false;
  };
  // The table epoch the oldest pool copy of grant `token` still running began at (0: none runs).
  uint64_t oldestCopy(uint64_t token) const {
    uint64_t oldest = 0;
    for (const auto& [id, job] : copyJobs_)
      if (job->cmaToken == token && (oldest == 0 || job->epoch < oldest)) oldest = job->epoch;
    return oldest;
  }
  // A copy of grant `token` ended: publish the safe epoch a REVOKE asked for, forget a grant whose
  // peer is gone once nothing of it runs.
  void copyEnded(uint64_t token) {
    auto held = heldGrants_.find(token);
    if (token == 0 || held == heldGrants_.end()) return;
    if (held->second.revokePending) publishSafeEpoch(token);
    if (held->second.peerGone && oldestCopy(token) == 0) heldGrants_.erase(held);
  }
  std::unordered_map<uint64_t, HeldGrant> heldGrants_;
  void publishSafeEpoch(uint64_t token);
  Status postActiveMessage(UcxPeer& peer, const TransferRef& t);
  Status postNow(UcxPeer& peer, const TransferRef& t, const RemoteRegionRef& rr);
  Status sendNotify(UcxPeer& peer, const std::string& message);
  // Holds a transfer (or, null, a notification) until the peer's handshake completes (bounded).
  Status waitForHandshake(UcxPeer& peer, TransferRef t, std::string note);
  static constexpr size_t kMaxWaiting = 65536;

  // The authenticated handshake (wire.h).
  struct Handshake {  // target side: a HELLO answered with a CHALLENGE, awaiting the initiator's AUTH
    std::string name;
    uint64_t agentId = 0;
    uint8_t initiatorNonce[ucx::kNonceBytes];
    uint8_t targetNonce[ucx::kNonceBytes];
    std::vector<uint8_t> address;  // parsed (by ucp_ep_create) only once AUTH verifies
    uint64_t startedNs = 0;
  };
  // Pending at once, and the addresses they hold; the oldest is dropped first. A flood of HELLOs
  // from many endpoints can still crowd out a real handshake (it then fails after kHandshakeNs).
  static constexpr size_t kMaxHandshakes = 1024;
  static constexpr size_t kMaxHandshakeBytes = 16u << 20;
  static constexpr size_t kMaxAddressBytes = 64u << 10;  // a worker address in HELLO (as in metadata)
  static constexpr uint64_t kHandshakeNs = 3'000'000'000ull;
  std::unordered_map<ucp_ep_h, Handshake> handshakes_;  // by reply ep
  std::string secret_;
  SecurityCounters counters_;
  Digest mac(const char* label, const uint8_t* initiatorNonce, const uint8_t* targetNonce, uint64_t initiatorId,
             uint64_t targetId, const std::string& initiatorName, const std::string& targetName,
             const std::vector<uint8_t>* address = nullptr) const;
  UcxPeer* peerByNonce(const uint8_t* nonce);
  void challenge(ucp_ep_h reply, const ucx::HelloHeader& h, std::string name, const uint8_t* address, size_t addressLength);
  void handleChallenge(ucp_ep_h reply, const ucx::ChallengeHeader& c, const uint8_t* proof, size_t length);
  void handleAuth(ucp_ep_h reply, const ucx::AuthHeader& a, const uint8_t* proof, size_t length);
  void handleHelloReply(ucp_ep_h reply, const ucx::HelloHeader& h, const std::string& name, const uint8_t* rest, size_t restLength);
  // Serves the connection whose messages arrive on `reply`: names it, opens our endpoint to the
  // initiator at `address` and answers HELLO on it.
  void acceptConnection(ucp_ep_h reply, const std::string& name, uint64_t agentId, const uint8_t* address,
                        size_t addressLength, const uint8_t* initiatorNonce, const uint8_t* targetNonce);
  void failPeer(UcxPeer& peer, Status why);
  void releaseWaiting(UcxPeer& peer);
  Status postRma(UcxPeer& peer, const TransferRef& t, const RemoteRegionRef& rr);

  static void onSendDone(void* request, ucs_status_t st, void* user);
  static void onRecvDone(void* request, ucs_status_t st, size_t length, void* user);
  static void onEndpointError(void* arg, ucp_ep_h ep, ucs_status_t st);
  static constexpr uint16_t kAmIdBlock = 32;  // drop handlers cover ids below this (UCX 1.13: see init)
  static constexpr uint16_t kAmCanary = 31;   // the canary worker's message to this worker (never on the wire)
  static_assert(kAmCanary > ucx::kAmVramRevokeAck && kAmCanary < kAmIdBlock, "the canary needs an id of its own");
  static ucs_status_t dropAm(void* arg, const void* header, size_t headerLength, void* data, size_t length,
                             const ucp_am_recv_param_t* param);
  template <AmId id>
  static ucs_status_t onAm(void* arg, const void* header, size_t headerLength, void* data, size_t length,
                           const ucp_am_recv_param_t* param) {
    return static_cast<UcxBackendImpl*>(arg)->handleAm(id, header, headerLength, data, length, param);
  }
  // The longest data a control message of this kind may carry.
  static size_t maxControlLength(AmId id);
  size_t controlRecvBytes_ = 0;
  ucs_status_t handleAm(AmId id, const void* header, size_t headerLength, void* data, size_t length,
                        const ucp_am_recv_param_t* param);
  ucs_status_t handleWrite(const void* header, size_t headerLength, void* data, size_t length,
                           const ucp_am_recv_param_t* param, ucp_ep_h reply);
  void handleControl(AmId id, const void* header, size_t headerLength, const uint8_t* data, size_t length,
                     ucp_ep_h reply);
  ucs_status_t handleReadData(const void* header, size_t headerLength, void* data, size_t length,
                              const ucp_am_recv_param_t* param);
  // A READ request from connection `conn` (connections_ key), answered on `sendOn`.
  void serveRead(ucp_ep_h conn, ucp_ep_h sendOn, const ucx::ReadRequestHeader& h, const ucx::ReadSegment* segs);

  BackendHost* host_;
  std::shared_ptr<ContextHolder> ctx_;
  ucp_worker_h worker_ = nullptr;
  int efd_ = -1;
  std::vector<uint8_t> address_;
  ucx::AddressChecker addressChecker_;  // what a peer's worker address must look like before UCX parses it
  uint64_t agentId_ = 0;
  std::string agentName_;
  std::unordered_map<void*, RequestContext*> requests_;  // UCX requests in flight; each is freed in its callback
  // Initiator transfers awaiting the wire, by wire id, with the connection their replies must come on.
  struct ActiveTransfer {
    TransferRef t;
    ucp_ep_h ep = nullptr;  // the endpoint it was posted on
    std::string peer;       // the peer instance it was posted to
    uint64_t peerAgentId = 0;
  };
  std::unordered_map<uint64_t, ActiveTransfer> active_;
  void activate(UcxPeer& peer, const TransferRef& t) { active_[t->wireId] = {t, peer.ep_, peer.name_, peer.agentId_}; }
  // The transfer `wireId` names, if it is active and `reply` is the connection it was posted on
  // (its own endpoint, or the one the peer instance answers on); anything else is dropped.
  TransferRef replyTarget(uint64_t wireId, ucp_ep_h reply);
  std::map<std::pair<ucp_ep_h, uint64_t>, InboundWrite> inbound_;    // target-side WRITEs
  // What one connection may hold at this agent (a peer that never commits its WRITEs, or never takes
  // the data of its READs, must not grow this process without bound).
  static constexpr size_t kMaxOpenWritesPerConnection = 4096;
  static constexpr size_t kMaxReadSendsPerConnection = 65536;
  std::unordered_map<ucp_ep_h, size_t> openWrites_;     // by reply ep
  std::unordered_map<ucp_ep_h, size_t> readSends_;      // by the ep reads are served on
  // WRITEs whose data was refused for the bound: their commit is answered ERR_UNAVAILABLE (bounded).
  std::set<std::pair<ucp_ep_h, uint64_t>> refusedWrites_;
  // The WRITE `key` names, opened if the connection has room for another one (else nullptr).
  InboundWrite* openInbound(const std::pair<ucp_ep_h, uint64_t>& key);
  void closeInbound(std::map<std::pair<ucp_ep_h, uint64_t>, InboundWrite>::iterator it);
  // Target side: one entry per initiator that said HELLO, keyed by the reply ep its messages carry.
  // Replies go over an endpoint we create ourselves, so we can close it and hear when it fails.
  struct Connection {
    std::string name;
    uint64_t agentId = 0;
    ucp_ep_h ep = nullptr;
    uint32_t cmaGrants = 0;  // path 'cma' grants it holds (at most kMaxGrantsPerConnection)
    uint8_t nonce[ucx::kNonceBytes] = {};  // the initiator's HELLO nonce (VRAM_REVOKE names it)
    bool hasNonce = false;
  };
  std::vector<ucp_ep_h> endpointsToClose_;  // closed after progress returns, never inside a UCX callback
  std::unordered_map<ucp_ep_h, Connection> connections_;
  std::unordered_map<ucp_ep_h, ucp_ep_h> connectionByOwnEp_;  // our ep -> reply ep
  // Binds `reply` to the agent `name`/`agentId` (ending what the reply ep or an older instance had).
  Connection& nameConnection(ucp_ep_h reply, const std::string& name, uint64_t agentId);
  std::string connectionName(ucp_ep_h reply) const {
    auto it = connections_.find(reply);
    return it == connections_.end() ? std::string() : it->second.name;
  }
  ucp_ep_h replyPath(ucp_ep_h reply) const {
    auto it = connections_.find(reply);
    return it == connections_.end() || it->second.ep == nullptr ? reply : it->second.ep;
  }
  void connectionFailed(ucp_ep_h ownEp);
  // A peer with transfers awaiting the wire that has been silent for kProbeAfterNs is pinged; one
  // that does not answer the ping within kLivenessNs is failed (ERR_REMOTE_DISCONNECT). Why: a peer
  // that dies before its endpoint is connected is never noticed by UCX (no keepalive runs), and its
  // transfers waited forever (measured: 2 rounds in 6 of SIGKILL mid-batch on shm).
  void checkLiveness();
  void heardFrom(ucp_ep_h ep);
  // Self-check of this worker's receive queue. A peer killed while it writes a message into UCX's
  // shared-memory FIFO leaves a slot that never becomes ready, and the FIFO delivers nothing after
  // it, from anyone (measured: after ~9 SIGKILLs of peers serving READs, a healthy long-lived peer's
  // messages never arrived). Whenever a peer is pinged, a second worker in this context sends this
  // one a canary over the same FIFO; if it has not arrived kCanaryNs later, the receive queue is
  // blocked: peers that do not answer are failed with that diagnosis, and health() reports it.
  void sendCanary(uint64_t now);
  void closeCanaryEndpoint();  // force-closes it (and forgets it), waiting briefly
  static ucs_status_t onCanary(void* arg, const void* header, size_t headerLength, void* data, size_t length,
                               const ucp_am_recv_param_t* param);
  ucp_worker_h canary_ = nullptr;
  ucp_ep_h canaryEp_ = nullptr;
  uint64_t canaryToken_ = 0;  // in flight (0: none)
  uint64_t canaryHeader_ = 0;
  uint64_t receivedSinceCanary_ = 0;  // messages this worker received meanwhile: a blocked queue delivers none
  // Rebuilds in a row after which the new worker had received nothing at all: 3 such, and the agent
  // stops (receiveBlocked_) — the check itself, not a dying peer, would be failing then.
  uint64_t receivedOnWorker_ = 0;
  int idleRebuilds_ = 0;
  // A rebuild decided on the native progress thread, done on the JS thread's next step (opening a
  // worker sets UCX_TCP_TX_SEG_SIZE in the environment, which Node reads there).
  bool rebuildWanted_ = false;
  static constexpr int kMaxIdleRebuilds = 3;
  uint64_t canarySentNs_ = 0;
  int canaryTicks_ = 0;       // liveness ticks (each after a progress of this worker) since it was sent
  bool receiveBlocked_ = false;
  bool sharedMemory_ = false;
  bool tcpSegments_ = false;  // open this worker's tcp interfaces with 64 KiB send segments (init)
  uint64_t rebuilds_ = 0;
  static constexpr uint64_t kCanaryNs = 500'000'000ull;
  static constexpr uint64_t kProbeAfterNs = 1'000'000'000ull;
  static constexpr uint64_t kLivenessNs = 2'000'000'000ull;
  static constexpr uint64_t kLivenessTickNs = 100'000'000ull;
  uint64_t lastLivenessCheckNs_ = 0;
  // Forgets the connection whose messages arrive on `reply`: its half-received WRITEs and our
  // endpoint to it. Returns the name and agent id it had said HELLO with (empty name if none).
  // `closed`: its agent said BYE (not moved): it finished its own copies first, so VRAM it was told
  // to stop using is no longer waited for. Any other end (failure, replacement) waits for the ACK or
  // the deadline: its process may still be copying.
  std::pair<std::string, uint64_t> dropConnection(ucp_ep_h reply, bool closed = false);
  // Whether an agent of this name (maybe a newer instance) still has a connection we serve: the
  // end of an older one must not read as this name going away.
  bool connectedTo(const std::string& name) const;
  // Reports that the connection with `name` ended, unless it still has another one we serve.
  void reportLost(const std::string& name, uint64_t agentId, const char* why);
  // Tells every peer and connection that this agent is closing, and gives the messages up to
  // `budgetNs` to leave (a peer then fails our transfers at once instead of after UCX keepalive).
  void sayGoodbye(uint64_t budgetNs, bool moved = false);
  int byesPending_ = 0;
  struct Goodbye {
    ucp_ep_h reply;
    uint64_t agentId;
    bool moved;
  };
  std::vector<Goodbye> goodbyes_;  // BYEs, handled after progress
  std::unordered_map<ucp_ep_h, UcxPeer*> peersByEp_;
  std::vector<std::pair<uint64_t, Status>> failedPeers_;              // reported after progress returns
  std::vector<ucp_ep_h> failedConnections_;                            // target-side, handled likewise
  std::vector<void*> closing_;                                        // endpoint close requests
  bool shuttingDown_ = false;
  // Direct copies of at least this many bytes run on the copy pool, off the caller's thread.
  static constexpr uint64_t kBackgroundCopyBytes = 1u << 20;
  std::unique_ptr<CopyPool> copyPool_;
  struct CopyJob {
    TransferRef transfer;
    RemoteRegionRef remote;
    std::atomic<size_t> pending{0};
    uint64_t cmaToken = 0;         // a cma copy's grant, and the region it copies into or out of
    uint32_t regionId = 0;
    uint64_t epoch = 0;                // the target's table epoch read before its lookup
    std::atomic<bool> revoked{false};  // the target withdrew that region: shares not yet copied stop
    std::mutex errorMutex;         // the first failing share says why
    Status error;
  };
  std::unordered_map<uint64_t, std::unique_ptr<CopyJob>> copyJobs_;  // by transfer id
  std::mutex copiedMutex_;
  std::vector<uint64_t> copied_;  // finished by the pool, settled by progress()
  std::atomic<ucp_worker_h> signalWorker_{nullptr};  // the worker pool threads wake (replaced in a rebuild)
  // Path 'cuda_ipc': copies on one CUDA stream per local device, each transfer ended by an event
  // that progress() polls. A job holds both sides' memory until its copies have finished.
  Status postCudaIpc(UcxPeer& peer, const TransferRef& t, const RemoteRegionRef& rr);
  bool pollCuda();
  struct CudaJob {
    TransferRef transfer;
    RemoteRegionRef remote;
    std::shared_ptr<cuda::IpcMapping> mapping;  // kept open while the copies run, even after a REVOKE
  };
  // VRAM revocation (wire.h: VRAM_REVOKE). A target that withdraws a VRAM region (deregister,
  // close) tells every connection it serves, and keeps the memory until each has acknowledged or
  // kRetiredNs passed; an initiator refuses new copies into the region at once, closes its IPC
  // mapping, and acknowledges once its copies into it have ended. (CUDA leaves freeing memory a
  // peer still maps undefined; and a copy through stale metadata must not land in memory reused since.)
  void withdrawVram(const LocalRegionRef& region);
  void handleVramRevoke(const ucx::VramRevokeHeader& h);
  void ackVramRevokes(bool copiesEnded = false);  // sends the acknowledgements whose copies have ended
  struct PendingVramAck {
    uint64_t peerKey;  // the peer (looked up when the ACK goes: it may be gone by then)
    ucx::VramRevokeHeader header;
  };
  std::vector<PendingVramAck> vramAcks_;
  std::unordered_map<uint64_t, CudaJob> cudaJobs_;  // by transfer id
  // Declared after cudaJobs_: destroyed first, waiting for the copies that use the jobs' memory.
  std::map<int, std::unique_ptr<cuda::CopyQueue>> cudaQueues_;
};

// ---------------------------------------------------------------------------------------------
// Set-up

// Whether a UCX_TLS-style list may select a transport of `names`: empty and "all" select every one;
// "^a,b" every one but those listed.
static bool mayUse(const std::string& tls, std::initializer_list<const char*> names) {
  if (tls.empty()) return true;
  const bool excluding = tls[0] == '^';
  bool listed = false, all = false;
  size_t start = excluding ? 1 : 0;
  while (start <= tls.size()) {
    size_t end = tls.find(',', start);
    if (end == std::string::npos) end = tls.size();
    std::string token = tls.substr(start, end - start);
    token.erase(0, token.find_first_not_of(" \t"));
    token.erase(token.find_last_not_of(" \t") + 1);
    if (token == "all") all = true;
    for (const char* n : names) listed = listed || token == n;
    start = end + 1;
  }
  return excluding ? !listed : (listed || all);
}

Status UcxBackendImpl::init(const BackendOptions& options) {
  agentName_ = options.agentName;
  agentId_ = options.agentId;
  secret_ = options.secret;
  // Peer-failure detection on shared memory needs these; respect a caller's own UCX_* setting.
  const char* envTls = std::getenv("UCX_TLS");
  const std::string tls = !options.transports.empty() ? options.transports : envTls ? envTls : "";
  const bool sharedMemory = mayUse(tls, {"shm", "sm", "mm", "posix", "sysv", "xpmem"});
  if (sharedMemory) setenv("UCX_MM_ERROR_HANDLING", "y", 0);
  sharedMemory_ = sharedMemory;
  // One-sided same-host copies only where the caller allows shared-memory transports (a 'tcp' agent
  // keeps its bytes on tcp) and did not turn the path off.
  cmaAllowed_ = options.cma && mayUse(tls, {"shm", "sm", "cma"}) && cmaTable_.init();
  setenv("UCX_KEEPALIVE_INTERVAL", "1s", 0);
  // tcp with peer error handling (which kvwire needs to hear of dead peers) gets no RMA lanes from UCX
  // (tcp cannot revoke a peer's access): rendezvous runs over active-message fragments of
  // UCX_TCP_TX_SEG_SIZE, 8 KiB by default, received into segments of UCX_TCP_RX_SEG_SIZE.
  // 64 KiB is the most that stays compatible: a receiver asserts (tcp_ep.c "hdr->length <=
  // rx_seg_size") on a segment larger than its UCX_TCP_RX_SEG_SIZE, 64 KiB by default in UCX 1.13 and
  // 1.22, so a larger one would crash peers that keep UCX's defaults (older kvwire builds, plain UCX
  // programs). Measured (ucx_perftest tag_bw, 1 MiB, tcp, -e): UCX 1.22 1.6 -> 5.6 GB/s, UCX 1.13
  // 3.8 -> 6.5 GB/s; kvwire bench tcp in the README. Set in the environment only while this agent's
  // worker opens its interfaces (openWorker), where tcp may be used, and never when the caller set
  // either segment size (TX must not exceed RX, or UCX refuses the interface). (ucp_config_modify
  // would avoid the environment, but UCX 1.13 does not apply tcp keys given that way.)
  tcpSegments_ = mayUse(tls, {"tcp"}) && !std::getenv("UCX_TCP_TX_SEG_SIZE") && !std::getenv("UCX_TCP_RX_SEG_SIZE");

  ucp_config_t* config = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &config);
  if (st != UCS_OK) return {Code::Backend, ucsMessage("ucp_config_read", st)};
  if (!options.transports.empty()) {
    st = ucp_config_modify(config, "TLS", options.transports.c_str());
    if (st != UCS_OK) {
      ucp_config_release(config);
      return {Code::InvalidParam, "ucx.transports '" + options.transports + "' rejected by UCX: " + ucs_status_string(st)};
    }
  }
  if (!options.devices.empty()) {
    st = ucp_config_modify(config, "NET_DEVICES", options.devices.c_str());
    if (st != UCS_OK) {
      ucp_config_release(config);
      return {Code::InvalidParam, "ucx.devices '" + options.devices + "' rejected by UCX: " + ucs_status_string(st)};
    }
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  // UCX's software RMA (tcp, user memory) writes wherever a connected peer's PUT says, unchecked:
  // an agent with a secret leaves RMA off, so only its checked active-message paths touch memory.
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP | (options.secret.empty() ? UCP_FEATURE_RMA : 0);
  params.mt_workers_shared = 0;
  ctx_ = std::make_shared<ContextHolder>();
  st = ucp_init(&params, config, &ctx_->context);
  ucp_config_release(config);
  if (st != UCS_OK) {
    ctx_->context = nullptr;
    return {Code::Backend, ucsMessage("ucp_init", st)};
  }
  if (const char* limit = std::getenv("KVWIRE_VRAM_STAGING_LIMIT"); limit != nullptr && *limit != '\0') {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(limit, &end, 10);
    if (*end != '\0' || v < (1u << 20) || v > (1ull << 40))
      return {Code::InvalidParam, std::string("KVWIRE_VRAM_STAGING_LIMIT '") + limit +
                                      "': bytes of VRAM staging per connection, from 1048576 to 2^40"};
    stagingLimit_ = v;
    staging_ = std::make_shared<StagingLedger>(stagingLimit_);
  }
  ucp_context_attr_t attr{};
  attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  const char* staging = std::getenv("KVWIRE_VRAM_STAGING");
  ucxCuda_ = ucp_context_query(ctx_->context, &attr) == UCS_OK && (attr.memory_types & (1ull << UCS_MEMORY_TYPE_CUDA)) &&
             !(staging != nullptr && *staging != '\0' && std::strcmp(staging, "0") != 0);
  return openWorker();
}

// The worker, its event fd and address, and its message handlers (again after a rebuild).
Status UcxBackendImpl::openWorker() {
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;  // the JS thread and the progress thread, one at a time (addon lock)
  // Only for this worker's interfaces (see init): not inherited by child processes, not seen by
  // other UCX users of this process.
  if (tcpSegments_) setenv("UCX_TCP_TX_SEG_SIZE", "64k", 1);
  ucs_status_t st = ucp_worker_create(ctx_->context, &wp, &worker_);
  if (tcpSegments_) unsetenv("UCX_TCP_TX_SEG_SIZE");
  if (st != UCS_OK) return {Code::Backend, ucsMessage("ucp_worker_create", st)};
  signalWorker_ = worker_;
  st = ucp_worker_get_efd(worker_, &efd_);
  if (st != UCS_OK) return {Code::Backend, ucsMessage("ucp_worker_get_efd", st)};

  ucp_address_t* addr = nullptr;
  size_t addrLen = 0;
  st = ucp_worker_get_address(worker_, &addr, &addrLen);
  if (st != UCS_OK) return {Code::Backend, ucsMessage("ucp_worker_get_address", st)};
  address_.assign(reinterpret_cast<uint8_t*>(addr), reinterpret_cast<uint8_t*>(addr) + addrLen);
  ucp_worker_release_address(worker_, addr);
  addressChecker_ = ucx::AddressChecker(address_);
  static bool warned = false;
  if (!addressChecker_.ok() && !std::exchange(warned, true))
    fprintf(stderr, "kvwire: peers' worker addresses cannot be checked before UCX parses them: %s. Addresses from "
                    "metadata are trusted as given; those in unauthenticated HELLOs are not used.\n",
            addressChecker_.disabledBecause().c_str());

  const std::pair<AmId, ucp_am_recv_callback_t> handlers[] = {
      {ucx::kAmHello, &onAm<ucx::kAmHello>},           {ucx::kAmWrite, &onAm<ucx::kAmWrite>},
      {ucx::kAmWriteCommit, &onAm<ucx::kAmWriteCommit>}, {ucx::kAmAck, &onAm<ucx::kAmAck>},
      {ucx::kAmReadRequest, &onAm<ucx::kAmReadRequest>}, {ucx::kAmReadData, &onAm<ucx::kAmReadData>},
      {ucx::kAmReadDone, &onAm<ucx::kAmReadDone>},       {ucx::kAmNotify, &onAm<ucx::kAmNotify>},
      {ucx::kAmWritePacked, &onAm<ucx::kAmWritePacked>}, {ucx::kAmReadPacked, &onAm<ucx::kAmReadPacked>},
      {ucx::kAmBye, &onAm<ucx::kAmBye>},             {ucx::kAmPing, &onAm<ucx::kAmPing>},
      {ucx::kAmPong, &onAm<ucx::kAmPong>},           {ucx::kAmChallenge, &onAm<ucx::kAmChallenge>},
      {ucx::kAmAuth, &onAm<ucx::kAmAuth>},
      {ucx::kAmCmaProbe, &onAm<ucx::kAmCmaProbe>},
      {ucx::kAmCmaProof, &onAm<ucx::kAmCmaProof>},
      {ucx::kAmRevoke, &onAm<ucx::kAmRevoke>},
      {ucx::kAmRevokeAck, &onAm<ucx::kAmRevokeAck>},
      {ucx::kAmVramRevoke, &onAm<ucx::kAmVramRevoke>},
      {ucx::kAmVramRevokeAck, &onAm<ucx::kAmVramRevokeAck>},
  };
  // UCX 1.13 calls whatever lies in its handler table for an id it has a slot for but no handler
  // (the table grows in blocks of 16): one message with id 0 crashed an agent (test/hostile). Every
  // id below kAmIdBlock gets a handler: kvwire's, the canary's, or one that drops the message.
  for (uint16_t id = 0; id < kAmIdBlock; ++id) {
    ucp_am_recv_callback_t cb = id == kAmCanary ? &onCanary : &dropAm;
    for (const auto& [known, handler] : handlers)
      if (known == id) cb = handler;
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    hp.id = id;
    hp.cb = cb;
    hp.arg = this;
    st = ucp_worker_set_am_recv_handler(worker_, &hp);
    if (st != UCS_OK) return {Code::Backend, ucsMessage("ucp_worker_set_am_recv_handler", st)};
  }
  return Status::ok();
}

ucs_status_t UcxBackendImpl::dropAm(void*, const void*, size_t, void*, size_t, const ucp_am_recv_param_t*) {
  return UCS_OK;
}

void UcxBackendImpl::sayGoodbye(uint64_t budgetNs, bool moved) {
  std::vector<ucp_ep_h> eps;
  for (auto& [ep, peer] : peersByEp_)
    if (ep && !peer->failed_) eps.push_back(ep);
  for (auto& [reply, conn] : connections_)
    if (conn.ep) eps.push_back(conn.ep);
  for (ucp_ep_h ep : eps) {
    auto op = std::make_unique<RequestContext>();
    op->kind = RequestContext::kBye;
    ucx::ByeHeader h{agentId_, moved ? 1u : 0u};
    op->setHeader(h);
    ++byesPending_;
    send(ep, ucx::kAmBye, std::move(op), nullptr, 0, true);
  }
  const uint64_t deadline = monotonicNs() + budgetNs;
  while (byesPending_ > 0 && monotonicNs() < deadline) ucp_worker_progress(worker_);
}

void UcxBackendImpl::shutdown() {
  if (shuttingDown_) return;
  // Why: on shared memory a peer notices a vanished agent only through UCX keepalive (about 1 s);
  // a goodbye lets it fail our transfers and free what it holds for us within microseconds.
  // Measured here (shm): the goodbyes of an agent with two connections leave in < 50 µs.
  sayGoodbye(20'000'000ull);
  shuttingDown_ = true;  // peers destroyed from now on force-close their endpoints
  while (!grantees_.empty()) endGrant(grantees_.begin()->first);  // (their REVOKEs went out already)
  for (auto& [reply, conn] : connections_)
    if (conn.ep) closeEndpoint(conn.ep, true);
  for (ucp_ep_h ep : std::exchange(endpointsToClose_, {})) closeEndpoint(ep, true);
  connections_.clear();
  connectionByOwnEp_.clear();
  dropStagingWaits(nullptr, worker_);
  handshakes_.clear();
  active_.clear();
  inbound_.clear();
  openWrites_.clear();
  for (auto& [req, op] : std::unordered_map<void*, RequestContext*>(requests_)) ucp_request_cancel(worker_, req);
}

UcxBackendImpl::~UcxBackendImpl() {
  copyPool_.reset();  // finishes copies in flight; they touch only memory this backend still maps
  copyJobs_.clear();
  cudaQueues_.clear();  // likewise: waits for the GPU copies, then the memory they used may go
  cudaJobs_.clear();
  shutdown();
  const uint64_t deadline = monotonicNs() + 500'000'000ull;
  while ((!requests_.empty() || !closing_.empty()) && monotonicNs() < deadline) progress();
  // What is still unfinished now never will be (a peer died mid-rendezvous: UCX keeps its receive
  // forever). It goes with the worker; it used to keep the worker and its context alive for good.
  std::vector<RequestContext*> unfinished;
  for (auto& [req, op] : requests_) unfinished.push_back(op);
  requests_.clear();
  for (void* req : closing_) ucp_request_free(req);  // UCX frees them when done, or with the worker
  closing_.clear();
  inbound_.clear();
  openWrites_.clear();
  if (worker_) dropStagingWaits(nullptr, worker_);
  closeCanaryEndpoint();
  if (canary_) ucp_worker_destroy(canary_);
  if (worker_) releaseWorker(worker_, unfinished);
  for (Abandoned& a : abandoned_) releaseWorker(a.worker, a.requests);
  // ctx_ is released last, after every UcxMemory that shares it.
}

void UcxBackendImpl::releaseWorker(ucp_worker_h worker, std::vector<RequestContext*>& requests) {
  for (RequestContext* op : requests) {
    op->orphaned = true;
    orphans_.insert(op);
  }
  requests.clear();
  ucp_worker_destroy(worker);
  for (RequestContext* op : orphans_) freeOrphan(op);
  orphans_.clear();
}

void UcxBackendImpl::freeOrphan(RequestContext* op) {
  if (op->remote) {  // see releaseWorker; agents may close at once on several threads
    static std::mutex* keptMutex = new std::mutex;
    static std::vector<RemoteRegionRef>* kept = new std::vector<RemoteRegionRef>;
    std::lock_guard<std::mutex> lock(*keptMutex);
    kept->push_back(std::move(op->remote));
  }
  delete op;
}

Result<std::unique_ptr<BackendMemory>> UcxBackendImpl::map(uint8_t* ptr, uint64_t length, bool allocate) {
  ucp_mem_map_params_t mp{};
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_FLAGS;
  mp.address = ptr;
  mp.length = length;
  mp.flags = allocate ? UCP_MEM_MAP_ALLOCATE : 0;
  ucp_mem_h memh = nullptr;
  ucs_status_t st = ucp_mem_map(ctx_->context, &mp, &memh);
  if (st != UCS_OK)
    return Status(allocate ? Code::Unavailable : Code::Backend,
                  ucsMessage(allocate ? "ucp_mem_map (allocate)" : "ucp_mem_map (register)", st));
  auto mem = std::make_unique<UcxMemory>(ctx_, memh);
  ucp_mem_attr_t attr{};
  attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
  st = ucp_mem_query(memh, &attr);
  if (st != UCS_OK) return Status(Code::Backend, ucsMessage("ucp_mem_query", st));
  mem->ptr = static_cast<uint8_t*>(attr.address);
  mem->length = length;
  mem->allocated = allocate;
  void* rkey = nullptr;
  size_t rkeyLength = 0;
  st = ucp_rkey_pack(ctx_->context, memh, &rkey, &rkeyLength);
  if (st != UCS_OK) return Status(Code::Backend, ucsMessage("ucp_rkey_pack", st));
  mem->rkey.assign(static_cast<uint8_t*>(rkey), static_cast<uint8_t*>(rkey) + rkeyLength);
  ucp_rkey_buffer_release(rkey);
  return std::unique_ptr<BackendMemory>(std::move(mem));
}

Result<std::unique_ptr<BackendMemory>> UcxBackendImpl::allocate(uint64_t length) {
  auto r = map(nullptr, length, true);
  // Touch every page now so the first transfer does not pay for page faults (and memory is zeroed).
  if (r.isOk()) std::memset(r.value()->ptr, 0, length);
  return r;
}

Result<std::unique_ptr<BackendMemory>> UcxBackendImpl::registerMemory(uint8_t* ptr, uint64_t length) {
  return map(ptr, length, false);
}

// ---------------------------------------------------------------------------------------------
// Peers

// Bytes from `p` to the end of the shared mapping that contains it (0 if `p` lies in none), from
// /proc/self/maps: what the kernel has mapped here, whatever a peer claims.
uint64_t sharedMappingBytesFrom(const void* p) {
  const auto at = reinterpret_cast<uintptr_t>(p);
  FILE* maps = std::fopen("/proc/self/maps", "r");
  if (maps == nullptr) return 0;
  char line[4096];
  uint64_t bytes = 0;
  unsigned long long reach = 0, inode = 0, offset = 0;  // the run of mappings of one object we are in
  while (std::fgets(line, sizeof line, maps)) {
    unsigned long long start = 0, end = 0, off = 0, ino = 0;
    char perms[8] = {}, dev[32] = {};
    if (std::sscanf(line, "%llx-%llx %7s %llx %31s %llu", &start, &end, perms, &off, dev, &ino) != 6) continue;
    if (reach != 0) {
      // The kernel may split one shared object into adjacent mappings (e.g. after madvise): a
      // mapping that continues the same object at the next offset extends the run.
      if (start != reach || ino != inode || off != offset || perms[3] != 's') break;
      bytes += end - start;
      reach = end;
      offset += end - start;
      continue;
    }
    if (at < start || at >= end) continue;
    if (perms[3] != 's') break;
    bytes = end - at;
    reach = end;
    inode = ino;
    offset = off + (end - start);
  }
  std::fclose(maps);
  return bytes;
}

Result<RemoteRegionRef> UcxBackendImpl::unpackRegion(UcxPeer& peer, const RegionInfo& info) {
  auto rr = std::make_shared<RemoteRegion>();
  rr->info = info;
  // VRAM has no UCX key (this UCX may have no CUDA support): a same-host peer opens it through its
  // CUDA IPC handle, when a transfer first needs it (openVram).
  if (info.kind == MemKind::Vram) return rr;
  ucp_rkey_h rkey = nullptr;
  ucs_status_t st = ucp_ep_rkey_unpack(peer.ep_, info.rkey.data(), &rkey);
  if (st != UCS_OK)
    return Status(Code::InvalidParam, "region '" + info.name + "' of peer '" + peer.name_ +
                                          "' has a key this UCX cannot unpack: " + ucs_status_string(st));
  rr->rkey.reset(rkey);
  void* mapped = nullptr;
  if (info.backendAllocated && ucp_rkey_ptr(rkey, info.base, &mapped) == UCS_OK) {
    // ucp_rkey_ptr does no bounds check: the peer's claimed length must fit the shared mapping this
    // process actually holds at that address, or a copy would run past it.
    const uint64_t have = sharedMappingBytesFrom(mapped);
    if (have < info.length)
      return Status(Code::InvalidParam, "region '" + info.name + "' of peer '" + peer.name_ + "' claims " +
                                            std::to_string(info.length) + " bytes, but only " + std::to_string(have) +
                                            " are mapped at its address in this process");
    rr->mapped = static_cast<uint8_t*>(mapped);
  }
  return rr;
}

Result<std::unique_ptr<BackendPeer>> UcxBackendImpl::connect(const AgentMetadata& md, uint64_t peerKey) {
  if (md.backend != "ucx")
    return Status(Code::Mismatch, "peer '" + md.name + "' uses backend '" + md.backend + "', this agent speaks 'ucx'");
  // Checked even when the blob verified: a well-formed blob can carry an address that aborts UCX.
  if (const std::string bad = addressChecker_.check(md.workerAddress.data(), md.workerAddress.size());
      !bad.empty() && addressChecker_.ok()) {
    ++counters_.refusedAddresses;
    return Status(Code::InvalidParam, "metadata of peer '" + md.name + "': its UCX worker address is malformed (" + bad + ")");
  }
  auto peer = std::make_unique<UcxPeer>(this, peerKey, md.name);
  peer->agentId_ = md.agentId;
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER;
  std::vector<uint8_t> padded(md.workerAddress);  // see kAddressPadding
  padded.resize(padded.size() + ucx::kAddressPadding);
  ep.address = reinterpret_cast<const ucp_address_t*>(padded.data());
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = &UcxBackendImpl::onEndpointError;
  ep.err_handler.arg = this;
  ucs_status_t st = ucp_ep_create(worker_, &ep, &peer->ep_);
  if (st != UCS_OK) return Status(fromUcs(("connecting to peer '" + md.name + "'").c_str(), st).code(),
                                  ucsMessage(("connecting to peer '" + md.name + "'").c_str(), st));
  peersByEp_[peer->ep_] = peer.get();
  Status us = peer->updateRegions(md);
  if (!us) return us;
  if (getrandom(peer->nonce_, sizeof peer->nonce_, 0) != sizeof peer->nonce_)
    return Status(Code::Backend, "getrandom failed: no nonce for the connection handshake");
  // With a secret, nothing goes to the peer until it proved it holds the secret too and serves us.
  peer->authenticated_ = secret_.empty();
  sendHello(peer->ep_, false, peer->nonce_, std::string(reinterpret_cast<const char*>(address_.data()), address_.size()));
  return std::unique_ptr<BackendPeer>(std::move(peer));
}

void UcxBackendImpl::sendHello(ucp_ep_h ep, bool isReply, const uint8_t* nonce, const std::string& extra) {
  auto op = std::make_unique<RequestContext>();
  op->kind = RequestContext::kControl;
  ucx::HelloHeader h{ucx::kWireVersion, static_cast<uint32_t>(agentName_.size()), isReply ? 1u : 0u, agentId_, {}, secret_.empty() ? 0u : 1u};
  std::memcpy(h.nonce, nonce, sizeof h.nonce);
  op->setHeader(h);
  op->payload = agentName_ + extra;
  const std::string& hello = op->payload;
  send(ep, ucx::kAmHello, std::move(op), hello.data(), hello.size(), true);
}

UcxPeer::~UcxPeer() {
  regions_.clear();  // rkeys go before their endpoint
  if (cmaToken_ != 0) backend_->forgetGrant(cmaToken_);
  if (cmaPidfd_ >= 0) close(cmaPidfd_);
  if (ep_) {
    backend_->forgetPeer(this);
    backend_->closeEndpoint(ep_, failed_ || backend_->shuttingDown());
  }
}

Status UcxPeer::updateRegions(const AgentMetadata& md) {
  if (ep_ == nullptr) return {Code::RemoteDisconnect, "peer '" + name_ + "': its connection belonged to a UCX worker this agent replaced"};
  std::unordered_map<uint32_t, RemoteRegionRef> next;
  for (const auto& info : md.regions) {
    auto it = regions_.find(info.id);
    if (it != regions_.end() && it->second->info.base == info.base && it->second->info.length == info.length &&
        it->second->info.rkey == info.rkey && it->second->info.kind == info.kind &&
        [&] {  // a VRAM region reopened elsewhere has a new IPC handle
          const auto* was = it->second->info.section(cuda::kIpcSection);
          const auto* now = info.section(cuda::kIpcSection);
          return (was == nullptr) == (now == nullptr) && (was == nullptr || *was == *now);
        }()) {
      it->second->info = info;  // access or name may have changed; the key is the same
      next.emplace(info.id, it->second);
      continue;
    }
    auto rr = backend_->unpackRegion(*this, info);
    if (!rr.isOk()) return rr.status();
    next.emplace(info.id, rr.value());
  }
  regions_.swap(next);  // regions dropped here stay alive while a transfer still holds them
  return Status::ok();
}

Status UcxPeer::cudaIpcReady(const LocalRegion& local, const RemoteRegion& rr) const {
  const std::string region = "region '" + rr.info.name + "' of peer '" + name_ + "'";
  if (rr.info.kind == MemKind::Dram) {
    if (rr.mapped == nullptr)
      return {Code::Unavailable, "VRAM moves to and from " + region + " (host memory) only when it is mapped into this "
                                 "process: allocated by kvwire on this host, with a shared-memory transport"};
    return Status::ok();
  }
  const std::vector<uint8_t>* section = rr.info.section(cuda::kIpcSection);
  if (section == nullptr)
    return {Code::Unavailable, region + " (VRAM) publishes no CUDA IPC handle: its owner exports only regions that are a "
                               "whole CUDA allocation of whole 2 MiB granules (the handle opens all of it), from memory "
                               "the driver can export"};
  if (!cuda::ipcSectionFromThisHost(*section))
    return {Code::Unavailable, region + " (VRAM) is on another host (its boot id differs from this host's): use path 'am'"};
  if (!rr.ipcFailed.empty()) return {rr.ipcFailedCode, rr.ipcFailed};
  return Status::ok();
}

Result<std::shared_ptr<cuda::IpcMapping>> UcxPeer::openVram(RemoteRegion& rr, int device) {
  auto& mapping = rr.vram[device];
  if (mapping) return mapping;
  auto opened = cuda::IpcMapping::open(device, *rr.info.section(cuda::kIpcSection), rr.info.length);
  if (!opened.isOk()) {
    rr.vram.erase(device);
    rr.ipcFailed = "region '" + rr.info.name + "' of peer '" + name_ + "': " + opened.status().message();
    rr.ipcFailedCode = opened.status().code();
    return Status(rr.ipcFailedCode, rr.ipcFailed);
  }
  mapping = std::move(opened.value());
  return mapping;
}

Path UcxPeer::choosePath(uint32_t remoteRegionId, const LocalRegion& local, Path requested, uint64_t bytes,
                         size_t segments, Status* why) {
  auto it = regions_.find(remoteRegionId);
  if (it == regions_.end()) {
    *why = Status(Code::NotFound, "peer '" + name_ + "' has no region " + std::to_string(remoteRegionId));
    return Path::Auto;
  }
  // VRAM on either side: this process's own CUDA copies where the peer's memory opens here
  // (cuda_ipc), else active messages, whose ends each move their own VRAM (through UCX with its
  // memory type, or staged through host memory). None of the host paths may touch a device address.
  if (local.info.kind == MemKind::Vram || it->second->info.kind == MemKind::Vram) {
    switch (requested) {
      case Path::Auto:
        return cudaIpcReady(local, *it->second).isOk() ? Path::CudaIpc : Path::ActiveMessage;
      case Path::CudaIpc:
        *why = cudaIpcReady(local, *it->second);  // opened when posted, after the region is checked
        return Path::CudaIpc;
      case Path::ActiveMessage:
        return Path::ActiveMessage;
      default:
        *why = Status(Code::Unavailable, std::string("path '") + pathName(requested) +
                                             "' moves host memory only; VRAM moves by path 'cuda_ipc' (peers on one host) "
                                             "or 'am'");
        return requested;
    }
  }
  if (requested == Path::CudaIpc) {
    *why = Status(Code::Unavailable, "path 'cuda_ipc' moves VRAM; both regions are host memory");
    return requested;
  }
  const bool mapped = it->second->mapped != nullptr;
  switch (requested) {
    case Path::Auto:
      // Mapped peer memory is one memcpy. A registered region of a proven same-host peer is copied
      // by this process alone with process_vm_writev/readv (path 'cma'): the target's event loop
      // is not needed, so a busy or late target does not stall it. Measured (bench/path-choice.cjs,
      // shm, registered, 2 cores, paths interleaved, batches of ~16 MiB): from 16 KiB segments cma
      // moves as much as rendezvous active messages or more, quiet (1.06-1.66x on UCX 1.13 and
      // 1.22), and next to one busy process it keeps 65-106% where active messages keep 14-50%
      // (UCX's own tag_bw over shm keeps 41% at 64 KiB). Below that the kernel's per-iovec cost
      // wins (1 KiB: 0.46-0.53x; 64 B: 3.4x slower per descriptor than packed messages; 4 KiB:
      // 0.75-0.97x), so smaller segments go by active messages. Batches under kCmaBatchMin stay on
      // active messages as before (small-batch cma, with its grant lookups, was not measured).
      // Everywhere else UCX 1.13 would emulate RMA in software (user memory, tcp), so rendezvous
      // active messages are the path that does not collapse.
      if (mapped) return Path::Direct;
      if (cmaUsable(*it->second) && segments != 0 && bytes / segments >= kCmaSegmentMin && bytes >= kCmaBatchMin)
        return Path::Cma;
      return Path::ActiveMessage;
    case Path::Cma:
      if (!cmaUsable(*it->second))
        *why = Status(Code::Unavailable, "path 'cma' needs a peer on this host that granted it: both agents with a "
                                         "shared-memory transport and cma not turned off, the peer's proof of its "
                                         "process checked (after the handshake), and region '" + it->second->info.name +
                                         "' not deregistered");
      return Path::Cma;
    case Path::Rma:
      if (!backend_->secret_.empty())
        *why = Status(Code::Unavailable, "path 'rma' is off on an agent with a secret (UCX's software RMA would let any "
                                         "connected process write anywhere in it); use 'am' or 'direct'");
      return Path::Rma;
    case Path::Direct:
      if (!mapped)
        *why = Status(Code::Unavailable, "path 'direct' needs the peer's region '" + it->second->info.name +
                                             "' mapped into this process (kvwire-allocated memory on the same host "
                                             "with a shared-memory transport)");
      return Path::Direct;
    default:
      return requested;
  }
}

void UcxBackendImpl::closeEndpoint(ucp_ep_h ep, bool force) {
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  void* req = ucp_ep_close_nbx(ep, &p);
  if (req != nullptr && !UCS_PTR_IS_ERR(req)) closing_.push_back(req);
}

void UcxBackendImpl::onEndpointError(void* arg, ucp_ep_h ep, ucs_status_t st) {
  auto* self = static_cast<UcxBackendImpl*>(arg);
  auto it = self->peersByEp_.find(ep);
  if (it == self->peersByEp_.end()) {
    if (self->connectionByOwnEp_.count(ep)) self->failedConnections_.push_back(ep);
    return;
  }
  it->second->failed_ = true;
  self->failedPeers_.emplace_back(it->second->key_, Status(Code::RemoteDisconnect, ucsMessage("peer connection failed", st)));
}

// ---------------------------------------------------------------------------------------------
// Sending

ucp_request_param_t UcxBackendImpl::callbackParam(RequestContext* op, bool recv) {
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  if (recv)
    p.cb.recv_am = &UcxBackendImpl::onRecvDone;
  else
    p.cb.send = &UcxBackendImpl::onSendDone;
  p.user_data = op;
  op->posting = true;  // every caller passes the result of the UCX call straight to track()
  return p;
}

void UcxBackendImpl::track(void* req, RequestContext* op) {
  op->posting = false;
  if (op->completedInline)  // its callback ran inside the call: req, if any, is already freed
    completeOp(std::unique_ptr<RequestContext>(op), op->inlineStatus);
  else if (req == nullptr)
    completeOp(std::unique_ptr<RequestContext>(op), UCS_OK);
  else if (UCS_PTR_IS_ERR(req))
    completeOp(std::unique_ptr<RequestContext>(op), UCS_PTR_STATUS(req));
  else
    requests_.emplace(req, op);  // UCX 1.13 skips the callback of a request freed early, so it is freed there
}

bool UcxBackendImpl::send(ucp_ep_h ep, AmId id, std::unique_ptr<RequestContext> op, const void* data, size_t length, bool reply,
                          bool device) {
  op->backend = this;
  RequestContext* raw = op.release();
  ucp_request_param_t p = callbackParam(raw, false);
  p.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = reply ? UCP_AM_SEND_FLAG_REPLY : 0;
  if (device) {
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMORY_TYPE;
    p.memory_type = UCS_MEMORY_TYPE_CUDA;
  }
  void* req = ucp_am_send_nbx(ep, id, raw->header, raw->headerLength, data, length, &p);
  const bool failed = UCS_PTR_IS_ERR(req);
  track(req, raw);
  return !failed;
}

void UcxBackendImpl::receive(void* data, void* dst, size_t length, std::unique_ptr<RequestContext> op, bool device) {
  op->backend = this;
  RequestContext* raw = op.release();
  ucp_request_param_t p = callbackParam(raw, true);
  if (device) {
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMORY_TYPE;
    p.memory_type = UCS_MEMORY_TYPE_CUDA;
  }
  track(ucp_am_recv_data_nbx(worker_, data, dst, length, &p), raw);
}

Result<cuda::CopyQueue*> UcxBackendImpl::queueFor(int device) {
  auto& queue = cudaQueues_[device];
  if (!queue) {
    auto created = cuda::CopyQueue::create(device);
    if (!created.isOk()) {
      cudaQueues_.erase(device);
      return created.status();
    }
    queue = std::move(created.value());
  }
  return queue.get();
}

Status UcxBackendImpl::copyStaged(int device, const std::vector<cuda::CopyRun>& runs, bool toHost) {
  if (runs.empty()) return Status::ok();
  auto queue = queueFor(device);
  Status st = queue.isOk() ? queue.value()->stageNow(runs, toHost) : queue.status();
  if (!st) {
    if (gpuFault_.empty()) gpuFault_ = st.message();
    return st;
  }
  for (const cuda::CopyRun& r : runs) vramStagedBytes_ += r.bytes;
  return st;
}

Status UcxBackendImpl::stageOut(const TransferRef& t, StagingRef* staging, std::vector<Segment>* segments) {
  const auto staged = [&](const Segment& s) { return !ucxCuda_ || s.length <= ucx::kPackSegmentMax; };
  uint64_t bytes = 0;
  for (const Segment& s : t->segments)
    if (staged(s)) bytes += s.length;
  if (bytes > kMaxOwnStaging)
    return {Code::Unavailable, "this WRITE would stage " + std::to_string(bytes) + " bytes of VRAM through host memory at once "
                               "(path 'am' without UCX CUDA support), more than " + std::to_string(kMaxOwnStaging >> 30) +
                               " GiB: split the batch"};
  auto taken = Staging::take(staging_, nullptr, bytes);
  if (!taken.isOk()) return taken.status();
  *staging = std::move(taken.value());
  *segments = t->segments;
  std::vector<cuda::CopyRun> runs;
  uint64_t at = 0;
  for (Segment& s : *segments) {
    if (!staged(s)) continue;
    uint8_t* host = (*staging)->data() + at;
    runs.push_back({addressOf(host), addressOf(s.local), s.length});
    s.local = host;
    at += s.length;
  }
  return copyStaged(static_cast<int>(t->local->info.deviceId), runs, true);
}

void UcxBackendImpl::onSendDone(void* request, ucs_status_t st, void* user) {
  auto* op = static_cast<RequestContext*>(user);
  UcxBackendImpl* self = op->backend;
  if (op->orphaned) {  // called back from ucp_worker_destroy (releaseWorker)
    self->orphans_.erase(op);
    ucp_request_free(request);
    freeOrphan(op);
    return;
  }
  if (op->posting) {  // inside the UCX call that took it (see RequestContext::posting)
    op->completedInline = true;
    op->inlineStatus = st;
    ucp_request_free(request);
    return;
  }
  self->requests_.erase(request);
  ucp_request_free(request);
  self->completeOp(std::unique_ptr<RequestContext>(op), st);
}

void UcxBackendImpl::onRecvDone(void* request, ucs_status_t st, size_t, void* user) {
  onSendDone(request, st, user);
}

void UcxBackendImpl::completeOp(std::unique_ptr<RequestContext> op, ucs_status_t st) {
  switch (op->kind) {
    case RequestContext::kControl:
    case RequestContext::kWriteData:
    case RequestContext::kNotify:
      if (st != UCS_OK && op->transfer) endTransfer(op->transfer, fromUcs("sending to the peer", st));
      else if (op->transfer) {
        // Data of a long transfer leaving counts as the peer being there (it is pulling it).
        auto it = active_.find(op->transfer->wireId);
        if (it != active_.end()) heardFrom(it->second.ep);
      }
      break;
    case RequestContext::kReadDataSend: {
      auto it = readSends_.find(op->servedOn);  // the initiator learns of a failure from its own side
      if (it != readSends_.end() && --it->second == 0) readSends_.erase(it);
      break;
    }
    case RequestContext::kBye:
      --byesPending_;
      break;
    case RequestContext::kControlRecv:
      controlRecvBytes_ -= op->payload.size();
      if (st == UCS_OK) handleControl(op->amId, op->header, op->headerLength,
                                      reinterpret_cast<const uint8_t*>(op->payload.data()), op->payload.size(), op->reply);
      break;
    case RequestContext::kInboundWrite: {
      auto it = inbound_.find(op->inbound);
      if (it == inbound_.end()) break;
      if (st != UCS_OK && it->second.error.isOk())
        it->second.error = fromUcs("receiving written data", st);
      if (st == UCS_OK && op->staging) {  // landed in host memory: now to the device, if the region is still there
        if (!op->hold->live) {
          if (it->second.error.isOk())
            it->second.error = Status(Code::NotFound, "region '" + op->hold->info.name + "' was deregistered while the data arrived",
                                      op->stagedIndex);
        } else {
          Status copied = copyStaged(op->stagedDevice, {{op->stagedTo, addressOf(op->staging->data()), op->stagedBytes}}, false);
          if (!copied && it->second.error.isOk()) it->second.error = Status(copied.code(), copied.message(), op->stagedIndex);
        }
      }
      ++it->second.landed;
      maybeFinishInbound(op->inbound);
      break;
    }
    case RequestContext::kInboundRead: {
      const TransferRef& t = op->transfer;
      --t->landingReceives;
      if (t->ending) {
        settleIfQuiet(t);
        break;
      }
      if (st != UCS_OK) {
        endTransfer(t, fromUcs("receiving read data", st));
        break;
      }
      if (t->settled) break;  // rejected meanwhile (e.g. another segment failed): nothing more lands
      if (op->staging) {  // landed in host memory: now to the device
        Status copied = copyStaged(op->stagedDevice, {{op->stagedTo, addressOf(op->staging->data()), op->stagedBytes}}, false);
        if (!copied) {
          endTransfer(t, copied);
          break;
        }
      }
      ++t->landed;
      finishRead(t);
      break;
    }
    case RequestContext::kFlush: {
      const TransferRef& t = op->transfer;
      --t->landingReceives;  // every put/get of the transfer is complete
      if (st != UCS_OK) {
        endTransfer(t, fromUcs("flushing RMA operations", st));
        break;
      }
      if (!t->settled && !t->ending) notifyAfter(t);
      endTransfer(t, Status::ok());
      break;
    }
  }
}

void UcxBackendImpl::notifyAfter(const TransferRef& t) {
  if (!t->hasNotify) return;
  for (auto& [ep, peer] : peersByEp_)
    if (peer->key_ == t->peerKey) {
      notify(*peer, t->notify);
      return;
    }
}

TransferRef UcxBackendImpl::replyTarget(uint64_t wireId, ucp_ep_h reply) {
  auto it = active_.find(wireId);
  if (it == active_.end()) return nullptr;  // settled already, or an id nobody was given: 64 random bits are not guessed
  const ActiveTransfer& a = it->second;
  heardFrom(a.ep);
  // Replies travel without UCX's reply endpoint (measured: with it, replies on tcp vanished after
  // endpoint churn), so the unguessable id is what binds them. A reply that does name a connection
  // must name one of this peer instance.
  if (reply == nullptr || reply == a.ep) return a.t;
  auto c = connections_.find(reply);
  if (c == connections_.end() || (c->second.name == a.peer && c->second.agentId == a.peerAgentId)) return a.t;
  return nullptr;
}

void UcxBackendImpl::endTransfer(const TransferRef& t, const Status& st) {
  active_.erase(t->wireId);
  if (t->ending) {
    settleIfQuiet(t);  // it settles with its end status once nothing lands any more
    return;
  }
  host_->transferFinished(t, st);
}

void UcxBackendImpl::sendStatus(ucp_ep_h ep, AmId id, uint64_t transferId, const Status& st) {
  auto op = std::make_unique<RequestContext>();
  op->kind = RequestContext::kControl;
  ucx::StatusHeader h{transferId, static_cast<uint32_t>(st.code()), st.index()};
  op->setHeader(h);
  op->payload = st.message();
  const std::string& msg = op->payload;
  send(ep, id, std::move(op), msg.data(), msg.size(), false);
}

// ---------------------------------------------------------------------------------------------
// Posting

Status UcxBackendImpl::post(BackendPeer& base, const TransferRef& t) {
  auto& peer = static_cast<UcxPeer&>(base);
  if (peer.failed_ || peer.ep_ == nullptr)
    return {Code::RemoteDisconnect, "peer '" + peer.name_ + "' is disconnected"};
  while (t->wireId == 0 || active_.count(t->wireId))
    if (getrandom(&t->wireId, sizeof t->wireId, 0) != sizeof t->wireId)
      return {Code::Backend, "getrandom failed: no unguessable transfer id"};
  auto it = peer.regions_.find(t->remoteRegionId);
  if (it == peer.regions_.end())
    return {Code::NotFound, "peer '" + peer.name_ + "' has no region " + std::to_string(t->remoteRegionId)};
  if (!peer.authenticated_ || (t->path == Path::CudaIpc && !peer.named_)) return waitForHandshake(peer, t, {});
  return postNow(peer, t, it->second);
}

Status UcxBackendImpl::waitForHandshake(UcxPeer& peer, TransferRef t, std::string note) {
  if (peer.waiting_.size() >= kMaxWaiting)
    return {Code::Unavailable, "peer '" + peer.name_ + "': " + std::to_string(kMaxWaiting) +
                                   " transfers and notifications already wait for its handshake (or HELLO reply)"};
  if (peer.waiting_.empty()) peer.waitingSinceNs_ = monotonicNs();
  peer.waiting_.push_back({std::move(t), std::move(note)});
  return Status::ok();
}

Status UcxBackendImpl::postNow(UcxPeer& peer, const TransferRef& t, const RemoteRegionRef& rr) {
  const uint64_t now = monotonicNs();
  if (peer.pingSentNs_ == 0 && now - peer.lastHeardNs_ > kProbeAfterNs) peer.lastHeardNs_ = now;  // a quiet window starts now
  switch (t->path) {
    case Path::Direct: return postDirect(peer, t, rr);
    case Path::Cma: return postCma(peer, t, rr);
    case Path::CudaIpc: return postCudaIpc(peer, t, rr);
    case Path::Rma: return postRma(peer, t, rr);
    default: return postActiveMessage(peer, t);
  }
}

void UcxBackendImpl::releaseWaiting(UcxPeer& peer) {
  for (auto& w : std::exchange(peer.waiting_, {})) {
    if (!w.t) {
      sendNotify(peer, w.note);
      continue;
    }
    if (w.t->settled || w.t->ending) continue;  // canceled (or timed out) while it waited
    auto it = peer.regions_.find(w.t->remoteRegionId);
    Status st = it == peer.regions_.end()
                    ? Status(Code::NotFound, "peer '" + peer.name_ + "' has no region " + std::to_string(w.t->remoteRegionId))
                    : postNow(peer, w.t, it->second);
    if (!st) endTransfer(w.t, st);
  }
}

void UcxBackendImpl::failPeer(UcxPeer& peer, Status why) {
  if (peer.failed_) return;
  peer.failed_ = true;
  peer.dropMappings();
  peer.waiting_.clear();  // the host fails every transfer of this peer
  failedPeers_.emplace_back(peer.key_, std::move(why));
}

Status UcxBackendImpl::postDirect(UcxPeer& peer, const TransferRef& t, const RemoteRegionRef& rr) {
  if (t->stats.bytes >= kBackgroundCopyBytes) {
    copyInBackground(t, rr);
    return Status::ok();
  }
  for (const Segment& s : t->segments) {
    uint8_t* remote = rr->mapped + s.remoteOffset;
    if (t->op == kvwire::Op::Write)
      std::memcpy(remote, s.local, s.length);
    else
      std::memcpy(s.local, remote, s.length);
  }
  // The peer must see the bytes before the notification that announces them.
  std::atomic_thread_fence(std::memory_order_release);
  if (t->hasNotify) {
    Status st = notify(peer, t->notify);
    if (!st) return st;
  }
  host_->transferFinished(t, Status::ok());
  return Status::ok();
}

// Splits the batch into one byte-balanced share per pool thread. The last share to finish queues
// the transfer and wakes the worker's event fd; progress() then notifies the peer and settles it.
void UcxBackendImpl::copyInBackground(const TransferRef& t, const RemoteRegionRef& rr, pid_t pid, uint64_t cmaToken,
                                      uint64_t cmaBase) {
  if (!copyPool_) copyPool_ = std::make_unique<CopyPool>(std::max(1u, std::min(2u, std::thread::hardware_concurrency())));
  struct Piece {
    uint8_t* dst;
    const uint8_t* src;
    uint64_t length;
  };
  // A cma copy's remote side is an address in the peer process (pid), not a pointer of this one.
  uint8_t* const remoteBase = pid != 0 ? reinterpret_cast<uint8_t*>(cmaBase) : rr->mapped;
  const size_t shares = copyPool_->size();
  const uint64_t target = (t->stats.bytes + shares - 1) / shares;
  std::vector<std::vector<Piece>> work(shares);
  size_t share = 0;
  uint64_t filled = 0;
  for (const Segment& s : t->segments) {
    for (uint64_t done = 0; done < s.length;) {
      const uint64_t n = std::min(s.length - done, std::max<uint64_t>(target - filled, 1));
      uint8_t* remote = remoteBase + s.remoteOffset + done;
      uint8_t* local = s.local + done;
      work[share].push_back(t->op == kvwire::Op::Write ? Piece{remote, local, n} : Piece{local, remote, n});
      done += n;
      filled += n;
      if (filled >= target && share + 1 < shares) {
        ++share;
        filled = 0;
      }
    }
  }
  // The job (and through it the memory on both sides) is owned here, on the progress thread, so
  // no reference is ever dropped on a pool thread; a canceled transfer's copy still completes.
  auto job = std::make_unique<CopyJob>();
  job->transfer = t;
  job->remote = rr;
  job->cmaToken = cmaToken;
  job->regionId = t->remoteRegionId;
  for (auto& w : work) job->pending += w.empty() ? 0 : 1;
  CopyJob* raw = job.get();
  copyJobs_[t->id] = std::move(job);
  const bool write = t->op == kvwire::Op::Write;
  for (auto& w : work) {
    if (w.empty()) continue;
    copyPool_->submit([this, raw, id = t->id, pieces = std::move(w), pid, write] {
      if (pid == 0) {
        for (const Piece& p : pieces) std::memcpy(p.dst, p.src, p.length);
      } else {
        std::vector<ucx::CmaSpan> spans;
        spans.reserve(pieces.size());
        for (const Piece& p : pieces)  // a WRITE's destination is remote, a READ's source
          spans.push_back(write ? ucx::CmaSpan{const_cast<uint8_t*>(p.src), p.dst, p.length}
                                : ucx::CmaSpan{p.dst, const_cast<uint8_t*>(p.src), p.length});
        Status st = ucx::cmaCopy(pid, write, spans.data(), spans.size(), &raw->revoked);
        if (!st) {
          std::lock_guard<std::mutex> lock(raw->errorMutex);
          if (raw->error.isOk()) raw->error = std::move(st);
        }
      }
      if (raw->pending.fetch_sub(1) != 1) return;  // the job may be freed from here on
      std::atomic_thread_fence(std::memory_order_release);
      {
        std::lock_guard<std::mutex> lock(copiedMutex_);
        copied_.push_back(id);
      }
      ucp_worker_signal(signalWorker_.load());  // thread-safe: wakes the event loop (the current worker)
    });
  }
}

Status UcxBackendImpl::postCudaIpc(UcxPeer& peer, const TransferRef& t, const RemoteRegionRef& rr) {
  // Withdrawn by its owner since this metadata was loaded: its VRAM may belong to something else by now.
  if (rr->revoked)
    return {Code::NotFound, "region '" + rr->info.name + "' of peer '" + peer.name_ +
                                "' was deregistered by its owner; load its current metadata"};
  // Where 'auto' took cuda_ipc but the region cannot be reached that way (its handle does not open
  // here: another container, this same process, ...; or that became known after the choice, e.g.
  // for transfers queued behind the handshake), active messages reach it all the same (and are
  // chosen from now on: RemoteRegion::ipcFailed). A path asked for by name fails with the reason.
  const auto unreachable = [&](Status why) {
    if (!t->pathChosen) return why;
    t->path = t->stats.path = Path::ActiveMessage;
    return postActiveMessage(peer, t);
  };
  if (Status st = peer.cudaIpcReady(*t->local, *rr); !st) return unreachable(st);  // (reloaded since the choice?)
  // The copies run on the local region's device (a host region's on device 0), where the peer's VRAM
  // is opened too.
  const int device = t->local->info.kind == MemKind::Vram ? static_cast<int>(t->local->info.deviceId) : 0;
  std::shared_ptr<cuda::IpcMapping> mapping;
  if (rr->info.kind == MemKind::Vram) {
    auto opened = peer.openVram(*rr, device);
    if (!opened.isOk()) return unreachable(opened.status());
    mapping = std::move(opened.value());
  }
  // Host memory kvwire allocated (here, or the peer's mapped here) is page-locked with the driver
  // once: copies from pageable memory block the calling thread and run below PCIe rate. Not a
  // registered Buffer: regions may overlap there, and one region's unpinning would pull the pages
  // from under another's copy. Where the driver refuses (locked-memory limits), copies run pageable.
  if (t->local->info.kind == MemKind::Dram && t->local->info.backendAllocated && !t->local->pinTried) {
    t->local->pinTried = true;
    auto pinned = cuda::pinHost(device, t->local->ptr(), t->local->info.length);
    if (pinned.isOk()) t->local->pinned = std::move(pinned.value());
  }
  if (rr->info.kind == MemKind::Dram && !rr->pinTried) {
    rr->pinTried = true;
    auto pinned = cuda::pinHost(device, rr->mapped, rr->info.length);
    if (pinned.isOk()) rr->pinned = std::move(pinned.value());
  }
  auto queue = queueFor(device);
  if (!queue.isOk()) return queue.status();
  const uint64_t remoteBase = mapping ? mapping->address() : reinterpret_cast<uint64_t>(rr->mapped);
  std::vector<cuda::CopyRun> runs;
  runs.reserve(t->segments.size());
  const bool write = t->op == kvwire::Op::Write;
  for (const Segment& s : t->segments) {
    const uint64_t local = reinterpret_cast<uint64_t>(s.local);
    const uint64_t remote = remoteBase + s.remoteOffset;
    runs.push_back(write ? cuda::CopyRun{remote, local, s.length} : cuda::CopyRun{local, remote, s.length});
  }
  const bool deviceToDevice = t->local->info.kind == MemKind::Vram && mapping != nullptr;
  if (Status st = queue.value()->submit(t->id, runs, deviceToDevice); !st) return st;
  cudaJobs_[t->id] = {t, rr, std::move(mapping)};
  return Status::ok();
}

// Copies finished on the GPU: the peer is told (after the data, as every path does), the transfer settles.
bool UcxBackendImpl::pollCuda() {
  if (cudaJobs_.empty()) return false;
  std::vector<std::pair<uint64_t, Status>> done;
  for (auto& [device, queue] : cudaQueues_) queue->poll(done);
  for (auto& [id, st] : done) {
    auto it = cudaJobs_.find(id);
    if (it == cudaJobs_.end()) continue;
    TransferRef t = std::move(it->second.transfer);
    cudaJobs_.erase(it);  // (its IPC mapping closes here if a REVOKE or new metadata dropped it)
    if (!vramAcks_.empty()) ackVramRevokes();
    if (t->ending) {
      settleIfQuiet(t);
      continue;
    }
    if (!st) {
      // A fault in a GPU copy (e.g. an illegal address) poisons the whole CUDA context, the
      // application's too: reported in health, not only to this transfer.
      if (gpuFault_.empty()) gpuFault_ = st.message();
      endTransfer(t, st);
      continue;
    }
    if (!t->settled) notifyAfter(t);
    endTransfer(t, Status::ok());
  }
  return !done.empty();
}

Status UcxBackendImpl::postCma(UcxPeer& peer, const TransferRef& t, const RemoteRegionRef& rr) {
  // Bounds and rights from the target's own table, not from its metadata: a copy must land where
  // the process copied into registered memory now, with the access it gives.
  ucx::CmaEntry e{};
  uint64_t epoch = 0;
  ucx::CmaLookup found =
      ucx::cmaLookup(peer.cmaPid_, peer.cmaGrant_, peer.cmaTableAddr_, peer.cmaNonce_, t->remoteRegionId, &e, &epoch);
  // After the lookup: if the proven process still lives, the lookup read its memory (its pid cannot
  // have been given to another process yet).
  if (ucx::cmaGone(peer.cmaPidfd_)) found = ucx::CmaLookup::GrantGone;
  const uint32_t need = t->op == kvwire::Op::Write ? kAccessWrite : kAccessRead;
  bool fits = found == ucx::CmaLookup::Ok && (e.access & need) == need && e.base + e.length >= e.base;
  for (size_t i = 0; fits && i < t->segments.size(); ++i) {
    const Segment& s = t->segments[i];
    fits = s.remoteOffset <= e.length && s.length <= e.length - s.remoteOffset;
  }
  if (!fits) {
    // Withdrawn, resized, not published or the grant ended: the target decides (active messages).
    if (found == ucx::CmaLookup::GrantGone) peer.cma_ = UcxPeer::Cma::Off;
    t->path = t->stats.path = Path::ActiveMessage;
    return postActiveMessage(peer, t);
  }
  if (t->stats.bytes >= kBackgroundCopyBytes) {
    copyInBackground(t, rr, peer.cmaPid_, peer.cmaToken_, e.base);
    copyJobs_[t->id]->epoch = epoch;
    return Status::ok();
  }
  // Inline: done before this thread can hear a REVOKE, so nothing to publish for it.
  std::vector<ucx::CmaSpan> spans;
  spans.reserve(t->segments.size());
  for (const Segment& s : t->segments)
    spans.push_back({s.local, reinterpret_cast<uint8_t*>(e.base + s.remoteOffset), s.length});
  Status st = ucx::cmaCopy(peer.cmaPid_, t->op == kvwire::Op::Write, spans.data(), spans.size());
  if (!st) return st;
  if (t->hasNotify) {  // after the data: the kernel has copied it by now
    st = notify(peer, t->notify);
    if (!st) return st;
  }
  host_->transferFinished(t, Status::ok());
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------
// Path 'cma': the grant (wire.h)

void UcxBackendImpl::probeCma(UcxPeer& peer) {
  if (!cmaAllowed_ || peer.cma_ != UcxPeer::Cma::Off || peer.ep_ == nullptr) return;
  if (getrandom(&peer.cmaToken_, sizeof peer.cmaToken_, 0) != sizeof peer.cmaToken_ ||
      getrandom(peer.cmaNonce_, sizeof peer.cmaNonce_, 0) != sizeof peer.cmaNonce_ || peer.cmaToken_ == 0)
    return;  // the path stays off; active messages serve
  peer.cma_ = UcxPeer::Cma::Probing;
  auto op = std::make_unique<RequestContext>();
  op->kind = RequestContext::kControl;
  ucx::CmaProbeHeader h{peer.cmaToken_, static_cast<uint64_t>(getpid()), {}};
  std::memcpy(h.nonce, peer.cmaNonce_, sizeof h.nonce);
  op->setHeader(h);
  send(peer.ep_, ucx::kAmCmaProbe, std::move(op), nullptr, 0, true);
}

void UcxBackendImpl::handleCmaProbe(ucp_ep_h reply, const ucx::CmaProbeHeader& h) {
  ucx::CmaProofHeader proof{h.token, 0, 0};
  // Only a named connection (after HELLO; with a secret, after AUTH) is granted, once per token,
  // a few times per connection (a peer reloaded), and never to a pid that cannot be a process.
  auto conn = connections_.find(reply);
  if (cmaAllowed_ && cmaTable_.ok() && conn != connections_.end() && conn->second.cmaGrants < kMaxGrantsPerConnection &&
      h.token != 0 && !grantees_.count(h.token) && h.pid != 0 && h.pid <= static_cast<uint64_t>(INT32_MAX)) {
    const int slot = cmaTable_.grant(h.nonce, monotonicNs());
    if (slot >= 0) {
      ++conn->second.cmaGrants;
      grantees_.emplace(h.token, Grantee{reply, slot});
      proof.pid = static_cast<uint64_t>(getpid());
      proof.address = cmaTable_.grantAddress(slot);
    }
  }
  auto op = std::make_unique<RequestContext>();
  op->kind = RequestContext::kControl;
  op->setHeader(proof);
  send(replyPath(reply), ucx::kAmCmaProof, std::move(op), nullptr, 0, false);
}

void UcxBackendImpl::handleCmaProof(const ucx::CmaProofHeader& h) {
  for (auto& [ep, peer] : peersByEp_) {
    if (peer->cma_ != UcxPeer::Cma::Probing || peer->cmaToken_ != h.token || h.token == 0) continue;
    // Our nonce, in a grant slot of the kvwire table mapping of process P (a memfd no peer can
    // write into): the agent that owns that table granted it, and its table says what a copy may
    // reach. (The target could have relayed our nonce to a third agent's PROBE: then we reach what
    // that agent grants the relaying target, which the target could reach through it directly.)
    uint64_t table = 0;
    const bool plausible = h.pid != 0 && h.pid <= static_cast<uint64_t>(INT32_MAX) && static_cast<pid_t>(h.pid) != getpid();
    // The pidfd first: it then names the process verified below (or one already gone).
    const int pidfd = plausible ? ucx::cmaWatch(static_cast<pid_t>(h.pid)) : -1;
    const bool proven = plausible && ucx::cmaVerifyGrant(static_cast<pid_t>(h.pid), h.address, peer->cmaNonce_, &table).empty();
    if (!proven && pidfd >= 0) close(pidfd);
    if (peer->cmaPidfd_ >= 0) close(peer->cmaPidfd_);
    peer->cmaPidfd_ = proven ? pidfd : -1;
    peer->cma_ = proven ? UcxPeer::Cma::Ready : UcxPeer::Cma::Off;
    peer->cmaPid_ = proven ? static_cast<pid_t>(h.pid) : 0;
    peer->cmaGrant_ = proven ? h.address : 0;
    peer->cmaTableAddr_ = proven ? table : 0;
    if (proven) {
      HeldGrant& held = heldGrants_[peer->cmaToken_];
      held.pid = peer->cmaPid_;
      held.grant = h.address;
      held.table = table;
    }
    return;
  }
}

void UcxBackendImpl::endGrant(uint64_t token) {
  auto it = grantees_.find(token);
  if (it == grantees_.end()) return;
  // Its initiator's next lookup fails (active messages again); the slot is not given to anyone else
  // for kRetiredNs, so a copy it started before can still be waited for there.
  cmaTable_.endGrant(it->second.slot, monotonicNs(), kRetiredNs);
  auto conn = connections_.find(it->second.reply);
  if (conn != connections_.end() && conn->second.cmaGrants > 0) --conn->second.cmaGrants;
  grantees_.erase(it);
}

void UcxBackendImpl::regionRegistered(const LocalRegionRef& region) {
  if (cmaAllowed_ && region->info.kind == MemKind::Dram)  // cma copies host memory only
    cmaTable_.publish(region->info.id, region->info.access, reinterpret_cast<uint64_t>(region->ptr()), region->info.length);
}

void UcxBackendImpl::regionDeregistered(const LocalRegionRef& region) {
  if (region->info.kind == MemKind::Vram && !region->info.backendAllocated) {
    heldVram_.erase(std::remove_if(heldVram_.begin(), heldVram_.end(), [](const auto& w) { return w.expired(); }), heldVram_.end());
    heldVram_.push_back(region);
  }
  if (region->info.kind == MemKind::Vram) {
    withdrawVram(region);
    return;
  }
  if (!cmaTable_.ok()) return;
  const uint64_t now = monotonicNs();
  Retired r;
  r.region = region;
  r.epoch = cmaTable_.withdraw(region->info.id);  // no copy that starts from now on reaches it
  r.deadlineNs = now + kRetiredNs;
  cmaTable_.coolingSlots(now, &r.slots);  // ended grants: their copies may still run
  for (auto& [token, g] : grantees_) {
    r.slots.push_back(g.slot);
    auto op = std::make_unique<RequestContext>();
    op->kind = RequestContext::kControl;
    op->setHeader(ucx::RevokeHeader{token, r.epoch, region->info.id});
    send(replyPath(g.reply), ucx::kAmRevoke, std::move(op), nullptr, 0, false);
  }
  if (r.slots.empty()) return;  // nobody was ever granted: the memory goes now
  retired_.push_back(std::move(r));
  releaseRetired();  // a grantee with nothing in flight may already be safe
}

// Initiator: every pool copy of this grant that is still running began at or after the epoch
// written here (the table's current epoch when none runs), in the target's grant slot.
void UcxBackendImpl::publishSafeEpoch(uint64_t token) {
  auto it = heldGrants_.find(token);
  if (it == heldGrants_.end()) return;
  HeldGrant& g = it->second;
  const uint64_t oldest = oldestCopy(token);
  const uint64_t safe = oldest == 0 ? ucx::cmaEpoch(g.pid, g.table) : oldest;
  if (safe != 0) ucx::cmaWriteSafeEpoch(g.pid, g.grant, safe);
  if (oldest != 0) return;
  g.revokePending = false;
  sendRevokeAck(ucx::RevokeHeader{token, safe, 0});  // "look now"
}

void UcxBackendImpl::handleRevoke(const ucx::RevokeHeader& h) {
  auto held = heldGrants_.find(h.token);
  if (h.token == 0 || held == heldGrants_.end()) return;
  // This grant's pool copies into that region, all posted before the REVOKE (later ones find the
  // region withdrawn), stop at their next system call; the safe epoch follows as they end.
  for (const auto& [id, job] : copyJobs_)
    if (job->cmaToken == h.token && job->regionId == h.regionId) job->revoked.store(true, std::memory_order_release);
  held->second.revokePending = true;
  publishSafeEpoch(h.token);
}

void UcxBackendImpl::sendRevokeAck(const ucx::RevokeHeader& h) {
  for (auto& [ep, peer] : peersByEp_) {
    if (peer->cmaToken_ != h.token || h.token == 0 || peer->ep_ == nullptr) continue;  // (a peer that said BYE still hears it)
    auto op = std::make_unique<RequestContext>();
    op->kind = RequestContext::kControl;
    op->setHeader(h);
    send(ep, ucx::kAmRevokeAck, std::move(op), nullptr, 0, false);
    return;
  }
}

// Releases retired regions no grantee can still be copying into: each slot it waits on shows a
// safe epoch at or past its withdrawal, or the deadline passed.
void UcxBackendImpl::releaseRetired() {
  const uint64_t now = monotonicNs();
  for (auto it = retired_.begin(); it != retired_.end();) {
    auto& slots = it->slots;
    slots.erase(std::remove_if(slots.begin(), slots.end(), [&](int slot) { return cmaTable_.safeEpoch(slot) >= it->epoch; }),
                slots.end());
    it = (slots.empty() && it->vramAcks.empty()) || now > it->deadlineNs ? retired_.erase(it) : std::next(it);
  }
}

void UcxBackendImpl::withdrawVram(const LocalRegionRef& region) {
  Retired r;
  r.region = region;
  r.deadlineNs = monotonicNs() + kRetiredNs;
  // Every connection served may have opened it: each is told, and each answers for itself.
  for (auto& [reply, conn] : connections_) {
    if (!conn.hasNonce) continue;
    ucx::VramRevokeHeader h{};
    std::memcpy(h.nonce, conn.nonce, sizeof h.nonce);
    h.regionId = region->info.id;
    while (h.seq == 0)
      if (getrandom(&h.seq, sizeof h.seq, 0) != sizeof h.seq) break;
    if (h.seq == 0) continue;
    auto op = std::make_unique<RequestContext>();
    op->kind = RequestContext::kControl;
    op->setHeader(h);
    if (send(replyPath(reply), ucx::kAmVramRevoke, std::move(op), nullptr, 0, false)) r.vramAcks.emplace_back(h.seq, reply);
  }
  if (r.vramAcks.empty()) return;  // nobody connected could have opened it: the memory goes now
  retired_.push_back(std::move(r));
}

void UcxBackendImpl::handleVramRevoke(const ucx::VramRevokeHeader& h) {
  UcxPeer* peer = peerByNonce(h.nonce);  // the one connection it names; a revoke naming none is dropped
  if (peer == nullptr || vramAcks_.size() >= kMaxWaiting) return;
  for (const PendingVramAck& a : vramAcks_)
    if (a.header.seq == h.seq) return;  // said twice
  if (auto it = peer->regions_.find(h.regionId); it != peer->regions_.end() && it->second->info.kind == MemKind::Vram) {
    it->second->revoked = true;
    it->second->vram.clear();  // closed once the copies that hold a mapping end
  }
  vramAcks_.push_back({peer->key_, h});
  ackVramRevokes();
}

// Acknowledges each revocation once no copy of that peer into that region runs (whichever
// RemoteRegion it was posted through: a reload may have replaced it since).
void UcxBackendImpl::ackVramRevokes(bool copiesEnded) {
  for (size_t i = 0; i < vramAcks_.size();) {
    const PendingVramAck& a = vramAcks_[i];
    bool copying = false;
    if (!copiesEnded)
      for (const auto& [id, job] : cudaJobs_)
        copying = copying || (job.transfer->peerKey == a.peerKey && job.transfer->remoteRegionId == a.header.regionId);
    if (copying) {
      ++i;
      continue;
    }
    for (auto& [ep, peer] : peersByEp_) {
      if (peer->key_ != a.peerKey || peer->ep_ == nullptr) continue;
      auto op = std::make_unique<RequestContext>();
      op->kind = RequestContext::kControl;
      op->setHeader(a.header);
      // Without UCX's reply endpoint: a closing target has closed its endpoints, and UCX dropped
      // replies that named one (measured); the sequence number is what binds the ACK.
      send(peer->ep_, ucx::kAmVramRevokeAck, std::move(op), nullptr, 0, false);
      break;
    }
    vramAcks_[i] = vramAcks_.back();  // (a peer gone meanwhile: its mappings went with it)
    vramAcks_.pop_back();
  }
}

Status UcxBackendImpl::postActiveMessage(UcxPeer& peer, const TransferRef& t) {
  // VRAM leaving: its bytes are copied to host memory before anything is sent (all of them, or the
  // small ones host code packs where UCX takes device addresses), so a failed copy sends nothing.
  const bool fromVram = t->op == kvwire::Op::Write && t->local->info.kind == MemKind::Vram;
  StagingRef staging;
  std::vector<Segment> stagedSegments;
  if (fromVram)
    if (Status st = stageOut(t, &staging, &stagedSegments); !st) return st;
  const std::vector<Segment>& segments = fromVram ? stagedSegments : t->segments;
  activate(peer, t);
  if (t->op == kvwire::Op::Write) {
    uint64_t messages = 0;
    std::string entries, bytes;  // the pack being built
    auto sendPack = [&]() -> bool {
      if (entries.empty()) return true;
      auto op = std::make_unique<RequestContext>();
      op->kind = RequestContext::kWriteData;
      op->transfer = t;
      ucx::PackedWriteHeader h{t->wireId, t->remoteRegionId, static_cast<uint32_t>(entries.size() / sizeof(ucx::PackedEntry))};
      op->setHeader(h);
      op->payload = std::move(entries);
      op->payload += bytes;
      entries.clear();
      bytes.clear();
      ++messages;
      const std::string& payload = op->payload;
      return send(peer.ep_, ucx::kAmWritePacked, std::move(op), payload.data(), payload.size(), true);
    };
    for (const Segment& s : segments) {
      if (s.length <= ucx::kPackSegmentMax) {
        if (bytes.size() + entries.size() + s.length + sizeof(ucx::PackedEntry) > ucx::kPackBytesMax && !sendPack())
          return Status::ok();
        ucx::PackedEntry e{s.remoteOffset, static_cast<uint32_t>(s.length), s.firstIndex};
        entries.append(reinterpret_cast<const char*>(&e), sizeof e);
        bytes.append(reinterpret_cast<const char*>(s.local), s.length);
        continue;
      }
      auto op = std::make_unique<RequestContext>();
      op->kind = RequestContext::kWriteData;
      op->transfer = t;
      op->hold = t->local;
      op->staging = staging;
      ucx::WriteHeader h{t->wireId, t->remoteRegionId, s.firstIndex, s.remoteOffset, s.length};
      op->setHeader(h);
      ++messages;
      const bool device = fromVram && ucxCuda_;  // (else s.local points into the staging copy)
      if (!send(peer.ep_, ucx::kAmWrite, std::move(op), s.local, s.length, true, device)) return Status::ok();
    }
    if (!sendPack()) return Status::ok();
    auto op = std::make_unique<RequestContext>();
    op->kind = RequestContext::kControl;
    op->transfer = t;
    ucx::CommitHeader h{t->wireId, messages, t->hasNotify ? 1u : 0u};
    op->setHeader(h);
    op->payload = t->notify;
    const std::string& msg = op->payload;
    send(peer.ep_, ucx::kAmWriteCommit, std::move(op), msg.data(), msg.size(), true);
    return Status::ok();
  }
  // READ: ask the target to send each segment back; it checks every one against its own registry.
  auto op = std::make_unique<RequestContext>();
  op->kind = RequestContext::kControl;
  op->transfer = t;
  ucx::ReadRequestHeader h{t->wireId, t->remoteRegionId, static_cast<uint32_t>(t->segments.size())};
  op->setHeader(h);
  op->payload.resize(t->segments.size() * sizeof(ucx::ReadSegment));
  auto* out = reinterpret_cast<uint8_t*>(op->payload.data());
  for (size_t i = 0; i < t->segments.size(); ++i) {
    ucx::ReadSegment rs{t->segments[i].remoteOffset, t->segments[i].length, t->segments[i].firstIndex};
    std::memcpy(out + i * sizeof rs, &rs, sizeof rs);
  }
  const std::string& payload = op->payload;
  send(peer.ep_, ucx::kAmReadRequest, std::move(op), payload.data(), payload.size(), true);
  return Status::ok();
}

Status UcxBackendImpl::postRma(UcxPeer& peer, const TransferRef& t, const RemoteRegionRef& rr) {
  t->backendHold = rr;  // the rkey lives until the transfer is released
  ucp_request_param_t p{};
  for (const Segment& s : t->segments) {
    const uint64_t raddr = rr->info.base + s.remoteOffset;
    void* req = t->op == kvwire::Op::Write ? ucp_put_nbx(peer.ep_, s.local, s.length, raddr, rr->rkey.get(), &p)
                                   : ucp_get_nbx(peer.ep_, s.local, s.length, raddr, rr->rkey.get(), &p);
    if (UCS_PTR_IS_ERR(req)) return fromUcs(t->op == kvwire::Op::Write ? "ucp_put_nbx" : "ucp_get_nbx", UCS_PTR_STATUS(req));
    if (req != nullptr) ucp_request_free(req);  // completion is observed through the flush below
  }
  activate(peer, t);
  auto op = std::make_unique<RequestContext>();
  op->kind = RequestContext::kFlush;
  op->backend = this;
  op->transfer = t;
  op->hold = t->local;
  op->remote = rr;
  ++t->landingReceives;  // gets may write local memory until the flush completes
  RequestContext* raw = op.release();
  ucp_request_param_t fp = callbackParam(raw, false);
  track(ucp_ep_flush_nbx(peer.ep_, &fp), raw);
  return Status::ok();
}

Status UcxBackendImpl::notify(BackendPeer& base, const std::string& message) {
  auto& peer = static_cast<UcxPeer&>(base);
  if (peer.failed_ || peer.ep_ == nullptr)
    return {Code::RemoteDisconnect, "peer '" + peer.name_ + "' is disconnected"};
  if (!peer.authenticated_) return waitForHandshake(peer, nullptr, message);
  return sendNotify(peer, message);
}

Status UcxBackendImpl::sendNotify(UcxPeer& peer, const std::string& message) {
  auto op = std::make_unique<RequestContext>();
  op->kind = RequestContext::kNotify;
  op->payload = message;
  const std::string& msg = op->payload;
  send(peer.ep_, ucx::kAmNotify, std::move(op), msg.data(), msg.size(), true);
  return Status::ok();
}

// A notification to an agent that connected to us (it loaded our metadata; we did not load its).
Status UcxBackendImpl::notifyConnection(const std::string& name, const std::string& message) {
  for (auto& [reply, conn] : connections_) {
    if (conn.name != name || conn.ep == nullptr) continue;
    auto op = std::make_unique<RequestContext>();
    op->kind = RequestContext::kNotify;
    op->payload = message;
    const std::string& msg = op->payload;
    send(conn.ep, ucx::kAmNotify, std::move(op), msg.data(), msg.size(), true);
    return Status::ok();
  }
  return {Code::NotFound, "unknown peer '" + name + "' (neither loaded nor connected to this agent)"};
}

bool UcxBackendImpl::abandon(const TransferRef& t, bool peerGone) {
  // Messages that arrive for this transfer from now on are dropped. Receives already started and
  // background copies still write into memory, so the transfer settles only after them — unless
  // its peer is gone: then nothing more arrives, and a rendezvous receive UCX started from it may
  // never complete (measured: 1 READ in 12 stuck after a SIGKILL on shm). Those are not waited
  // for (their completion, if it comes, finds the transfer settled); background copies (local
  // memcpy) still are. They are not canceled either: ucp_request_cancel on such a receive over tcp
  // made UCX 1.13 complete it twice and abort (uct_iface.h: comp->count > 0) in the soak test.
  active_.erase(t->wireId);
  // GPU copies cannot be stopped once queued: the transfer settles when they have finished.
  if (!peerGone) return t->landingReceives == 0 && copyJobs_.count(t->id) == 0 && cudaJobs_.count(t->id) == 0;
  return copyJobs_.count(t->id) == 0 && cudaJobs_.count(t->id) == 0;
}

void UcxBackendImpl::checkLiveness() {
  const uint64_t now = monotonicNs();
  if (now - lastLivenessCheckNs_ < kLivenessTickNs) return;
  lastLivenessCheckNs_ = now;
  if (canaryToken_ != 0 && ++canaryTicks_ >= 3 && now - canarySentNs_ > kCanaryNs && !shuttingDown_) {
    canaryToken_ = 0;
    if (receivedSinceCanary_ == 0) {  // a queue that delivers anything is not blocked (only busy)
      idleRebuilds_ = rebuilds_ > 0 && receivedOnWorker_ == 0 ? idleRebuilds_ + 1 : 0;
      if (idleRebuilds_ >= kMaxIdleRebuilds) {
        if (!receiveBlocked_)
          fprintf(stderr, "kvwire: agent '%s': %d new UCX workers in a row received nothing before their queue looked "
                  "blocked; it stops opening new ones: close it and create a new agent\n", agentName_.c_str(), idleRebuilds_);
        receiveBlocked_ = true;
      } else if (onNativeProgressThread) {
        rebuildWanted_ = true;  // progress() reports it, so the JS thread is woken to do it
        return;
      } else {
        rebuildWorker();
        return;  // everything checked here belonged to the old worker
      }
    }
  }
  std::unordered_set<ucp_ep_h> waiting;  // peers with transfers awaiting the wire
  for (auto& [id, a] : active_) waiting.insert(a.ep);
  for (auto& [ep, peer] : peersByEp_) {
    // Work waits for the handshake (with a secret) or, for cuda_ipc, for the target's HELLO reply.
    const uint64_t handshakeWaitNs =
        !peer->failed_ && (!peer->authenticated_ || !peer->named_) && !peer->waiting_.empty() ? now - peer->waitingSinceNs_ : 0;
    if (handshakeWaitNs > kProbeAfterNs) sendCanary(now);  // the handshake's answers may be stuck in a blocked queue
    if (handshakeWaitNs > kHandshakeNs)
      failPeer(*peer, Status(Code::RemoteDisconnect,
                             peer->authenticated_
                                 ? "it did not answer this agent's HELLO within " + std::to_string(kHandshakeNs / 1'000'000'000ull) +
                                       " s (gone or stalled)"
                                 : "it did not complete the authenticated handshake within " +
                                       std::to_string(kHandshakeNs / 1'000'000'000ull) +
                                       " s (gone, or it does not hold this agent's secret)"));
    if (peer->failed_ || !waiting.count(ep)) continue;
    if (peer->pingSentNs_ != 0) {
      if (now - peer->pingSentNs_ > kLivenessNs) {
        // No answer at all: the peer died before its endpoint was even connected (UCX keepalive
        // never starts then), or stopped answering. Its transfers fail like a lost connection.
        failPeer(*peer, receiveBlocked_
                            ? Status(Code::RemoteDisconnect,
                                     "no answer: this agent's shared-memory receive queue is blocked (a peer died while "
                                     "writing into it, and UCX delivers nothing after that); close this agent and create a new one")
                            : Status(Code::RemoteDisconnect, ucsMessage("peer connection failed", UCS_ERR_ENDPOINT_TIMEOUT)));
      }
      continue;
    }
    if (now - peer->lastHeardNs_ < kProbeAfterNs) continue;
    ucx::PingHeader h{};
    while (h.token == 0) getrandom(&h.token, sizeof h.token, 0);
    peer->pingToken_ = h.token;
    peer->pingSentNs_ = now;
    sendCanary(now);
    auto op = std::make_unique<RequestContext>();
    op->kind = RequestContext::kControl;
    op->setHeader(h);
    send(ep, ucx::kAmPing, std::move(op), nullptr, 0, true);
  }
}

void UcxBackendImpl::heardFrom(ucp_ep_h ep) {
  auto it = peersByEp_.find(ep);
  if (it == peersByEp_.end()) return;
  it->second->lastHeardNs_ = monotonicNs();
  it->second->pingSentNs_ = 0;
}

void UcxBackendImpl::closeCanaryEndpoint() {
  if (canaryEp_ == nullptr) return;
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = UCP_EP_CLOSE_FLAG_FORCE;  // it needs nothing from the other side
  void* req = ucp_ep_close_nbx(canaryEp_, &p);
  canaryEp_ = nullptr;
  if (!UCS_PTR_IS_PTR(req)) return;
  const uint64_t deadline = monotonicNs() + 100'000'000ull;
  while (ucp_request_check_status(req) == UCS_INPROGRESS && monotonicNs() < deadline) ucp_worker_progress(canary_);
  ucp_request_free(req);  // if still closing, UCX finishes it on its own
}

void UcxBackendImpl::sendCanary(uint64_t now) {
  if (!sharedMemory_ || receiveBlocked_ || canaryToken_ != 0) return;
  // Creating a worker reads UCX_* variables from the environment, which the JS thread may be
  // changing (another agent opening its worker): only the JS thread creates the canary's.
  if (canary_ == nullptr && onNativeProgressThread) return;
  if (canary_ == nullptr) {
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;  // the JS thread and the progress thread, one at a time (addon lock)
    if (ucp_worker_create(ctx_->context, &wp, &canary_) != UCS_OK) {
      canary_ = nullptr;
      sharedMemory_ = false;  // no self-check then
      return;
    }
  }
  if (canaryEp_ == nullptr) {
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = reinterpret_cast<const ucp_address_t*>(address_.data());
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // a force close (in a rebuild, at the end) needs it
    ep.err_handler.cb = [](void*, ucp_ep_h, ucs_status_t) {};
    ep.err_handler.arg = nullptr;
    if (ucp_ep_create(canary_, &ep, &canaryEp_) != UCS_OK) {
      canaryEp_ = nullptr;
      sharedMemory_ = false;
      return;
    }
  }
  while (canaryToken_ == 0) getrandom(&canaryToken_, sizeof canaryToken_, 0);
  canarySentNs_ = now;
  canaryTicks_ = 0;
  canaryHeader_ = canaryToken_;  // UCX reads it until the send completes; one canary is in flight at a time
  receivedSinceCanary_ = 0;
  ucp_request_param_t p{};
  void* req = ucp_am_send_nbx(canaryEp_, kAmCanary, &canaryHeader_, sizeof canaryHeader_, nullptr, 0, &p);
  if (UCS_PTR_IS_PTR(req)) ucp_request_free(req);  // completes on its own; progress() drives the canary worker
  else if (UCS_PTR_IS_ERR(req)) canaryToken_ = 0;
}

ucs_status_t UcxBackendImpl::onCanary(void* arg, const void* header, size_t headerLength, void*, size_t,
                                      const ucp_am_recv_param_t*) {
  auto* self = static_cast<UcxBackendImpl*>(arg);
  uint64_t token = 0;
  if (ucx::readHeader(header, headerLength, &token) && token == self->canaryToken_) self->canaryToken_ = 0;
  return UCS_OK;
}

void UcxBackendImpl::rebuildWorker() {
  ucp_worker_h old = worker_;
  const int oldEfd = efd_;
  const std::vector<uint8_t> oldAddress = address_;
  if (Status st = openWorker(); !st) {
    if (worker_ != nullptr && worker_ != old) ucp_worker_destroy(worker_);
    worker_ = old;
    signalWorker_ = old;
    efd_ = oldEfd;
    address_ = oldAddress;
    receiveBlocked_ = true;  // stuck for good: said by health() and by the failures
    fprintf(stderr, "kvwire: agent '%s' can no longer receive over shared memory (a peer died while writing into its "
            "UCX queue) and could not open a new UCX worker (%s); close it and create a new agent\n",
            agentName_.c_str(), st.message().c_str());
    return;
  }
  fprintf(stderr, "kvwire: agent '%s': a peer died while writing into its UCX shared-memory queue, which then delivers "
          "nothing; it opened a new UCX worker (new address: agents that load it must load its new metadata)\n",
          agentName_.c_str());
  // The old worker can still send (only its receive queue is blocked): the agents it served hear
  // goodbye now instead of after their liveness probe.
  std::swap(worker_, old);
  sayGoodbye(20'000'000ull, true);
  std::swap(worker_, old);
  // Nothing of the old worker is touched again until the agent closes (UCX may hold requests on it
  // that never complete): it is left open, with the state that pointed into it (releaseWorker).
  Abandoned gone{old, {}};
  for (auto& [req, op] : requests_) gone.requests.push_back(op);
  abandoned_.push_back(std::move(gone));
  requests_.clear();
  for (void* req : closing_) ucp_request_free(req);  // freed by UCX when done, or with the old worker
  closing_.clear();
  endpointsToClose_.clear();
  goodbyes_.clear();
  failedConnections_.clear();
  failedPeers_.clear();
  handshakes_.clear();
  inbound_.clear();
  openWrites_.clear();
  readSends_.clear();
  refusedWrites_.clear();
  dropStagingWaits(nullptr, old);
  staging_ = std::make_shared<StagingLedger>(stagingLimit_);  // what the old worker's requests hold is theirs
  controlRecvBytes_ = 0;
  byesPending_ = 0;
  std::vector<std::string> lost;  // connections served on the old worker: over (their agents hear BYE)
  for (auto& [reply, c] : connections_)
    if (c.ep != nullptr && std::find(lost.begin(), lost.end(), c.name) == lost.end()) lost.push_back(c.name);
  connections_.clear();
  connectionByOwnEp_.clear();
  while (!grantees_.empty()) endGrant(grantees_.begin()->first);
  for (auto& [ep, peer] : peersByEp_) {  // the host reconnects them on the new worker
    peer->ep_ = nullptr;
    peer->failed_ = true;
    peer->waiting_.clear();
  }
  peersByEp_.clear();
  closeCanaryEndpoint();  // it led to the old address
  canaryToken_ = 0;
  receiveBlocked_ = false;
  receivedOnWorker_ = 0;
  ++rebuilds_;
  host_->workerRebuilt(lost, Status(Code::RemoteDisconnect,
                              "this agent's UCX shared-memory receive queue was blocked by a peer that died while writing "
                              "into it; the agent opened a new UCX worker, and what was in flight on the old one failed"));
}

void UcxBackendImpl::settleIfQuiet(const TransferRef& t) {
  if (t->ending && !t->settled && t->landingReceives == 0 && copyJobs_.count(t->id) == 0 && cudaJobs_.count(t->id) == 0)
    host_->transferFinished(t, t->endStatus);
}

// ---------------------------------------------------------------------------------------------
// Receiving

// How a handler refuses a message: an error status is only allowed for rendezvous data (it fails
// the sender's request); an eager message is simply not used.
ucs_status_t refuse(const ucp_am_recv_param_t* param, ucs_status_t why) {
  return (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) ? why : UCS_OK;
}

ucs_status_t UcxBackendImpl::handleAm(AmId id, const void* header, size_t headerLength, void* data, size_t length,
                                      const ucp_am_recv_param_t* param) {
  ucp_ep_h reply = (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) ? param->reply_ep : nullptr;
  ++receivedSinceCanary_;
  ++receivedOnWorker_;
  // A closing agent serves nothing new (a late HELLO would open an endpoint nobody closes).
  // (REVOKE_ACKs still count: the regions withdrawn at close are kept until their grantees answer.)
  if (shuttingDown_ && id != ucx::kAmRevokeAck && id != ucx::kAmVramRevokeAck) return refuse(param, UCS_ERR_CANCELED);
  // With a secret, only a connection that completed the handshake is served. Replies (ACK, read
  // data, READ_DONE, PONG, CHALLENGE) are bound to what they answer by unguessable ids instead.
  const bool servedOnly = id == ucx::kAmWrite || id == ucx::kAmWritePacked || id == ucx::kAmWriteCommit ||
                          id == ucx::kAmReadRequest || id == ucx::kAmNotify || id == ucx::kAmBye || id == ucx::kAmPing ||
                          id == ucx::kAmCmaProbe;
  if (servedOnly && !secret_.empty() && (reply == nullptr || !connections_.count(reply))) {
    ++counters_.droppedUnauthenticated;
    return refuse(param, UCS_ERR_REJECTED);
  }
  if (id == ucx::kAmWrite) return handleWrite(header, headerLength, data, length, param, reply);
  if (id == ucx::kAmReadData) return handleReadData(header, headerLength, data, length, param);
  if (headerLength > sizeof(RequestContext::header)) return refuse(param, UCS_ERR_INVALID_PARAM);
  if (!(param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
    handleControl(id, header, headerLength, static_cast<const uint8_t*>(data), length, reply);
    return UCS_OK;
  }
  // A control message too large for eager (a long notification or read list): receive it first —
  // if its kind may be that long, it answers a live transfer where it is a reply, and the control
  // messages being received stay within kMaxControlRecvBytes in all.
  if (length > maxControlLength(id) || controlRecvBytes_ + length > kMaxControlRecvBytes) return UCS_ERR_MESSAGE_TRUNCATED;
  if (id == ucx::kAmAck || id == ucx::kAmReadDone || id == ucx::kAmReadPacked) {
    uint64_t transferId = 0;
    if (headerLength < sizeof transferId) return UCS_ERR_INVALID_PARAM;
    std::memcpy(&transferId, header, sizeof transferId);  // every reply header starts with it
    if (!replyTarget(transferId, reply)) return UCS_ERR_CANCELED;
  }
  controlRecvBytes_ += length;
  auto op = std::make_unique<RequestContext>();
  op->kind = RequestContext::kControlRecv;
  op->backend = this;
  op->amId = id;
  op->reply = reply;
  if (headerLength != 0) std::memcpy(op->header, header, headerLength);  // a NOTIFY has no header (null)
  op->headerLength = headerLength;
  op->payload.resize(length);
  RequestContext* raw = op.release();
  ucp_request_param_t p = callbackParam(raw, true);
  track(ucp_am_recv_data_nbx(worker_, data, raw->payload.data(), length, &p), raw);
  return UCS_INPROGRESS;
}

size_t UcxBackendImpl::maxControlLength(AmId id) {
  switch (id) {
    case ucx::kAmHello: return kMaxNameBytes + kMaxAddressBytes + ucx::kMacBytes;
    case ucx::kAmChallenge:
    case ucx::kAmAuth: return ucx::kMacBytes;
    case ucx::kAmPing:
    case ucx::kAmPong:
    case ucx::kAmBye:
    case ucx::kAmCmaProbe:
    case ucx::kAmCmaProof:
    case ucx::kAmRevoke:
    case ucx::kAmRevokeAck:
    case ucx::kAmVramRevoke:
    case ucx::kAmVramRevokeAck: return 0;
    case ucx::kAmAck:
    case ucx::kAmReadDone: return 64u << 10;  // an error's text
    case ucx::kAmReadPacked:
    case ucx::kAmWritePacked: return ucx::kPackBytesMax + (ucx::kPackBytesMax / sizeof(ucx::PackedEntry) + 1) * sizeof(ucx::PackedEntry);
    case ucx::kAmNotify:
    case ucx::kAmWriteCommit: return kMaxNotifyBytes;
    default: return kMaxControlBytes;  // a READ request's segment list
  }
}

void UcxBackendImpl::handleControl(AmId id, const void* header, size_t headerLength, const uint8_t* data, size_t length,
                                   ucp_ep_h reply) {
  const auto text = [&] { return std::string(reinterpret_cast<const char*>(data), length); };
  switch (id) {
    case ucx::kAmHello: {
      ucx::HelloHeader h{};
      if (!readHeader(header, headerLength, &h) || reply == nullptr || h.version != ucx::kWireVersion ||
          h.nameLength == 0 || h.nameLength > kMaxNameBytes || h.nameLength > length)
        return;
      std::string name(reinterpret_cast<const char*>(data), h.nameLength);
      const uint8_t* rest = data + h.nameLength;  // a worker address, or (a reply) the bind MAC
      const size_t restLength = length - h.nameLength;
      if (h.isReply) {
        handleHelloReply(reply, h, name, rest, restLength);
        return;
      }
      if (restLength == 0 || restLength > kMaxAddressBytes) return;
      if (!secret_.empty()) {
        challenge(reply, h, std::move(name), rest, restLength);  // the address waits until AUTH verifies
        return;
      }
      acceptConnection(reply, name, h.agentId, rest, restLength, h.nonce, nullptr);
      return;
    }
    case ucx::kAmChallenge: {
      ucx::ChallengeHeader c{};
      if (readHeader(header, headerLength, &c)) handleChallenge(reply, c, data, length);
      return;
    }
    case ucx::kAmAuth: {
      ucx::AuthHeader a{};
      if (readHeader(header, headerLength, &a)) handleAuth(reply, a, data, length);
      return;
    }
    case ucx::kAmNotify: {
      if (length > kMaxNotifyBytes) return;  // the sender's kvwire refuses these: not ours
      host_->notificationArrived(connectionName(reply), text());
      return;
    }
    case ucx::kAmCmaProbe: {
      ucx::CmaProbeHeader h{};
      if (readHeader(header, headerLength, &h) && reply != nullptr) handleCmaProbe(reply, h);
      return;
    }
    case ucx::kAmCmaProof: {
      ucx::CmaProofHeader h{};
      if (readHeader(header, headerLength, &h)) handleCmaProof(h);
      return;
    }
    case ucx::kAmRevoke: {
      ucx::RevokeHeader h{};
      if (readHeader(header, headerLength, &h)) handleRevoke(h);
      return;
    }
    case ucx::kAmRevokeAck: {
      ucx::RevokeHeader h{};
      if (readHeader(header, headerLength, &h)) releaseRetired();  // a hint only: the table says who is safe
      return;
    }
    case ucx::kAmVramRevoke: {
      ucx::VramRevokeHeader h{};
      if (readHeader(header, headerLength, &h)) handleVramRevoke(h);
      return;
    }
    case ucx::kAmVramRevokeAck: {
      // The sequence number is random per connection and withdrawal: only the connection told can
      // answer it. (One whose agent said BYE as it closed is no longer waited for: see dropConnection.)
      ucx::VramRevokeHeader h{};
      if (!readHeader(header, headerLength, &h)) return;
      for (Retired& r : retired_)
        r.vramAcks.erase(std::remove_if(r.vramAcks.begin(), r.vramAcks.end(), [&](const auto& a) { return a.first == h.seq; }),
                         r.vramAcks.end());
      releaseRetired();
      return;
    }
    case ucx::kAmPing: {
      ucx::PingHeader h{};
      if (!readHeader(header, headerLength, &h) || reply == nullptr) return;
      auto op = std::make_unique<RequestContext>();
      op->kind = RequestContext::kControl;
      op->setHeader(h);
      send(replyPath(reply), ucx::kAmPong, std::move(op), nullptr, 0, false);
      return;
    }
    case ucx::kAmPong: {
      ucx::PingHeader h{};
      if (!readHeader(header, headerLength, &h) || h.token == 0) return;
      for (auto& [ep, peer] : peersByEp_)
        if (peer->pingToken_ == h.token) {
          peer->pingToken_ = 0;
          heardFrom(ep);
        }
      return;
    }
    case ucx::kAmBye: {
      ucx::ByeHeader h{};
      if (!readHeader(header, headerLength, &h) || reply == nullptr || shuttingDown_) return;
      auto it = connections_.find(reply);
      // Only the instance that said HELLO on this connection can say goodbye on it.
      if (it == connections_.end() || it->second.agentId != h.agentId) return;
      goodbyes_.push_back({reply, h.agentId, h.moved != 0});  // endpoints are closed outside UCX's callbacks
      return;
    }
    case ucx::kAmWriteCommit: {
      ucx::CommitHeader h{};
      if (!readHeader(header, headerLength, &h) || reply == nullptr || length > kMaxNotifyBytes) return;
      auto key = std::make_pair(reply, h.transferId);
      // Some of this WRITE's data was refused for the bound: answer now, or it would wait forever.
      InboundWrite* open = refusedWrites_.erase(key) ? nullptr : openInbound(key);
      if (open == nullptr) {
        refusedWrites_.erase(key);
        sendStatus(replyPath(reply), ucx::kAmAck, h.transferId, Status(Code::Unavailable, "too many WRITEs in progress on this connection"));
        return;
      }
      InboundWrite& in = *open;
      in.expected = static_cast<int64_t>(h.segments);
      in.hasNotify = h.hasNotify != 0;
      in.notify = text();
      maybeFinishInbound(key);
      return;
    }
    case ucx::kAmAck:
    case ucx::kAmReadDone: {
      ucx::StatusHeader h{};
      if (!readHeader(header, headerLength, &h)) return;
      TransferRef t = replyTarget(h.transferId, reply);
      if (!t) return;  // settled already, or not from the connection it was posted on
      if (h.code != 0) {
        // The code comes off the wire: anything this build does not know is reported as ERR_BACKEND.
        const Code code = h.code <= static_cast<uint32_t>(Code::Closed) ? static_cast<Code>(h.code) : Code::Backend;
        endTransfer(t, Status(code, "peer refused: " + text(), h.index));
        return;
      }
      if (id == ucx::kAmAck) {
        endTransfer(t, Status::ok());  // WRITE acknowledged: every byte is in place at the peer
        return;
      }
      t->remoteDone = true;
      finishRead(t);
      return;
    }
    case ucx::kAmWritePacked: {
      ucx::PackedWriteHeader h{};
      if (!readHeader(header, headerLength, &h) || reply == nullptr) return;
      auto key = std::make_pair(reply, h.transferId);
      InboundWrite* open = openInbound(key);
      if (open == nullptr) return;  // dropped: its commit is answered with the reason
      InboundWrite& in = *open;
      const size_t table = static_cast<size_t>(h.count) * sizeof(ucx::PackedEntry);
      const uint8_t* bytes = data + table;
      size_t left = table <= length ? length - table : 0;
      std::vector<cuda::CopyRun> runs;  // entries into VRAM (one region: one device), copied together
      int vramDevice = 0;
      for (uint32_t i = 0; i < h.count && table <= length; ++i) {
        ucx::PackedEntry e{};
        std::memcpy(&e, data + i * sizeof e, sizeof e);
        if (e.length > left) {
          left = SIZE_MAX;
          break;
        }
        LocalRegionRef hold;
        Result<uint8_t*> dst = host_->resolveInbound(h.regionId, e.offset, e.length, kAccessWrite, &hold, true);
        if (!dst.isOk()) {
          if (in.error.isOk()) in.error = Status(dst.status().code(), dst.status().message(), e.firstIndex);
        } else if (hold->info.kind == MemKind::Vram) {
          vramDevice = static_cast<int>(hold->info.deviceId);
          runs.push_back({addressOf(dst.value()), addressOf(bytes), e.length});
        } else {
          copyBytes(dst.value(), bytes, e.length);
        }
        bytes += e.length;
        left -= e.length;
      }
      if (Status st = copyStaged(vramDevice, runs, false); !st && in.error.isOk()) in.error = st;
      if ((table > length || left != 0) && in.error.isOk())
        in.error = Status(Code::InvalidParam, "malformed packed write");
      ++in.landed;
      maybeFinishInbound(key);
      return;
    }
    case ucx::kAmReadPacked: {
      ucx::PackedReadHeader h{};
      if (!readHeader(header, headerLength, &h)) return;
      TransferRef t = replyTarget(h.transferId, reply);
      if (!t) return;  // settled already, or not from the connection it was posted on: drop
      // Destinations and lengths come from our own plan; the message must match it exactly.
      uint64_t expected = 0;
      const bool inRange = h.firstSegment <= t->segments.size() && h.count <= t->segments.size() - h.firstSegment;
      for (uint32_t i = 0; inRange && i < h.count; ++i) expected += t->segments[h.firstSegment + i].length;
      if (!inRange || expected != length) {
        endTransfer(t, Status(Code::Backend, "peer sent packed read data that does not match the request"));
        return;
      }
      const bool toVram = t->local->info.kind == MemKind::Vram;
      std::vector<cuda::CopyRun> runs;
      for (uint32_t i = 0; i < h.count; ++i) {
        const Segment& seg = t->segments[h.firstSegment + i];
        if (toVram)
          runs.push_back({addressOf(seg.local), addressOf(data), seg.length});
        else
          copyBytes(seg.local, data, seg.length);
        data += seg.length;
      }
      if (Status st = copyStaged(static_cast<int>(t->local->info.deviceId), runs, false); !st) {
        endTransfer(t, st);
        return;
      }
      t->landed += h.count;
      finishRead(t);
      return;
    }
    case ucx::kAmReadRequest: {
      ucx::ReadRequestHeader h{};
      if (!readHeader(header, headerLength, &h) || reply == nullptr) return;
      if (length != static_cast<size_t>(h.segments) * sizeof(ucx::ReadSegment)) {
        sendStatus(replyPath(reply), ucx::kAmReadDone, h.transferId, Status(Code::InvalidParam, "malformed read request"));
        return;
      }
      serveRead(reply, replyPath(reply), h, reinterpret_cast<const ucx::ReadSegment*>(data));
      return;
    }
    default:
      return;
  }
}

// ---------------------------------------------------------------------------------------------
// Connections and the authenticated handshake (wire.h)

Digest UcxBackendImpl::mac(const char* label, const uint8_t* initiatorNonce, const uint8_t* targetNonce,
                           uint64_t initiatorId, uint64_t targetId, const std::string& initiatorName,
                           const std::string& targetName, const std::vector<uint8_t>* address) const {
  std::string m(label);
  m.push_back('\0');
  m.append(reinterpret_cast<const char*>(initiatorNonce), ucx::kNonceBytes);
  m.append(reinterpret_cast<const char*>(targetNonce), ucx::kNonceBytes);
  m.append(reinterpret_cast<const char*>(&initiatorId), sizeof initiatorId);  // the wire is little-endian
  m.append(reinterpret_cast<const char*>(&targetId), sizeof targetId);
  for (const std::string* name : {&initiatorName, &targetName}) {
    const uint32_t n = static_cast<uint32_t>(name->size());
    m.append(reinterpret_cast<const char*>(&n), sizeof n);
    m += *name;
  }
  if (address != nullptr) {
    const Digest d = Sha256().update(address->data(), address->size()).finish();
    m.append(reinterpret_cast<const char*>(d.data()), d.size());
  }
  return hmacSha256(secret_, m);
}

UcxPeer* UcxBackendImpl::peerByNonce(const uint8_t* nonce) {
  for (auto& [ep, peer] : peersByEp_)
    if (std::memcmp(peer->nonce_, nonce, ucx::kNonceBytes) == 0) return peer;
  return nullptr;
}

// Target, with a secret: a HELLO is answered with a challenge on the endpoint it came on; nothing
// of it is parsed or served yet.
void UcxBackendImpl::challenge(ucp_ep_h reply, const ucx::HelloHeader& h, std::string name, const uint8_t* address,
                               size_t addressLength) {
  // A connection already named on this reply endpoint stays as it is until AUTH verifies (then
  // nameConnection decides whether it ended): an unproven HELLO changes nothing that is served.
  // A HELLO on an endpoint with a pending handshake starts over (UCX may have reused the endpoint
  // of one that went away mid-handshake).
  handshakes_.erase(reply);
  const uint64_t now = monotonicNs();
  size_t bytes = 0;  // the addresses pending handshakes hold
  for (auto it = handshakes_.begin(); it != handshakes_.end();) {  // expired: their AUTH is refused anyway
    if (now - it->second.startedNs > kHandshakeNs) {
      it = handshakes_.erase(it);
    } else {
      bytes += it->second.address.size();
      ++it;
    }
  }
  while (!handshakes_.empty() && (handshakes_.size() >= kMaxHandshakes || bytes + addressLength > kMaxHandshakeBytes)) {
    auto oldest = std::min_element(handshakes_.begin(), handshakes_.end(), [](const auto& a, const auto& b) {
      return a.second.startedNs < b.second.startedNs;
    });
    bytes -= oldest->second.address.size();
    handshakes_.erase(oldest);
  }
  Handshake& hs = handshakes_[reply];
  if (getrandom(hs.targetNonce, sizeof hs.targetNonce, 0) != sizeof hs.targetNonce) {
    handshakes_.erase(reply);
    return;
  }
  hs.name = std::move(name);
  hs.agentId = h.agentId;
  std::memcpy(hs.initiatorNonce, h.nonce, sizeof hs.initiatorNonce);
  hs.address.assign(address, address + addressLength);
  hs.startedNs = now;
  auto op = std::make_unique<RequestContext>();
  op->kind = RequestContext::kControl;
  ucx::ChallengeHeader c{};
  std::memcpy(c.initiatorNonce, hs.initiatorNonce, sizeof c.initiatorNonce);
  std::memcpy(c.targetNonce, hs.targetNonce, sizeof c.targetNonce);
  op->setHeader(c);
  const Digest proof = mac("kvwire/3 challenge", hs.initiatorNonce, hs.targetNonce, hs.agentId, agentId_, hs.name, agentName_);
  op->payload.assign(proof.begin(), proof.end());
  const std::string& payload = op->payload;
  // With UCX's reply endpoint, so the initiator can check it arrived on the connection it opened
  // (a CHALLENGE relayed from another connection must not be answered).
  send(reply, ucx::kAmChallenge, std::move(op), payload.data(), payload.size(), true);
}

// Initiator: the target proved it holds the secret (and saw our nonce); we prove it back.
void UcxBackendImpl::handleChallenge(ucp_ep_h reply, const ucx::ChallengeHeader& c, const uint8_t* proof, size_t length) {
  UcxPeer* peer = peerByNonce(c.initiatorNonce);
  if (peer == nullptr || peer->failed_ || peer->proved_ || length != ucx::kMacBytes || reply != peer->ep_) {
    ++counters_.droppedUnauthenticated;
    return;
  }
  if (secret_.empty()) {
    failPeer(*peer, Status(Code::NotAllowed, "it serves only authenticated connections (it has a secret); this agent has none"));
    return;
  }
  const Digest want = mac("kvwire/3 challenge", peer->nonce_, c.targetNonce, agentId_, peer->agentId_, agentName_, peer->name_);
  if (!digestsEqual(want.data(), proof)) {
    ++counters_.failedHandshakes;  // not from the peer we loaded: its own answer may still come
    return;
  }
  std::memcpy(peer->targetNonce_, c.targetNonce, sizeof peer->targetNonce_);
  peer->proved_ = true;
  auto op = std::make_unique<RequestContext>();
  op->kind = RequestContext::kControl;
  ucx::AuthHeader a{};
  std::memcpy(a.targetNonce, c.targetNonce, sizeof a.targetNonce);
  op->setHeader(a);
  const Digest mine = mac("kvwire/3 auth", peer->nonce_, peer->targetNonce_, agentId_, peer->agentId_, agentName_, peer->name_, &address_);
  op->payload.assign(mine.begin(), mine.end());
  const std::string& payload = op->payload;
  send(peer->ep_, ucx::kAmAuth, std::move(op), payload.data(), payload.size(), true);
}

// Target: the initiator's proof. One try per HELLO: a wrong proof ends the handshake.
void UcxBackendImpl::handleAuth(ucp_ep_h reply, const ucx::AuthHeader& a, const uint8_t* proof, size_t length) {
  auto it = reply == nullptr ? handshakes_.end() : handshakes_.find(reply);
  if (it == handshakes_.end() || length != ucx::kMacBytes ||
      std::memcmp(it->second.targetNonce, a.targetNonce, sizeof a.targetNonce) != 0) {
    ++counters_.droppedUnauthenticated;
    return;
  }
  Handshake hs = std::move(it->second);
  handshakes_.erase(it);
  const Digest want = mac("kvwire/3 auth", hs.initiatorNonce, hs.targetNonce, hs.agentId, agentId_, hs.name, agentName_, &hs.address);
  if (!digestsEqual(want.data(), proof)) {
    ++counters_.failedHandshakes;
    return;
  }
  acceptConnection(reply, hs.name, hs.agentId, hs.address.data(), hs.address.size(), hs.initiatorNonce, hs.targetNonce);
}

void UcxBackendImpl::acceptConnection(ucp_ep_h reply, const std::string& name, uint64_t agentId, const uint8_t* address,
                                      size_t addressLength, const uint8_t* initiatorNonce, const uint8_t* targetNonce) {
  // UCX's parser aborts the process on some malformed addresses (address_check.h): a HELLO whose
  // address fails the check is refused whole (a real kvwire's address passes, unless it is truly
  // incompatible, e.g. a UCX 1.13 peer's smaller shared-memory FIFO seen from UCX 1.22). Where this
  // UCX's addresses cannot be checked, one that only the HELLO vouches for (no secret) is never
  // parsed: the connection is served on the endpoint its messages arrive on.
  const std::string bad = addressChecker_.check(address, addressLength);
  if (!bad.empty() && addressChecker_.ok()) {
    if (counters_.refusedAddresses++ == 0) {
      std::string who = name.substr(0, 64);  // the sender's claim: printable characters only
      for (char& c : who) c = (c >= 0x20 && c < 0x7f) ? c : '?';
      fprintf(stderr, "kvwire: agent '%s' refused a HELLO from '%s' whose UCX worker address is malformed (%s); "
              "further ones are only counted (agent.security.refusedAddresses)\n",
              agentName_.c_str(), who.c_str(), bad.c_str());
    }
    return;
  }
  const bool parse = bad.empty() || !secret_.empty();
  Connection& conn = nameConnection(reply, name, agentId);
  const bool repeated = conn.hasNonce && std::memcmp(conn.nonce, initiatorNonce, sizeof conn.nonce) == 0;
  std::memcpy(conn.nonce, initiatorNonce, sizeof conn.nonce);
  conn.hasNonce = true;
  std::string bind;
  if (!secret_.empty()) {
    const Digest d = mac("kvwire/3 bind", initiatorNonce, targetNonce, agentId, agentId_, name, agentName_);
    bind.assign(d.begin(), d.end());
  }
  if (conn.ep != nullptr) {
    // Already served on this reply endpoint. The same HELLO again needs nothing; a new connection of
    // the same instance (UCX reused the endpoint's address after it forgot and reloaded us) must
    // still be answered, or it waits for its handshake forever.
    if (!repeated) sendHello(conn.ep, true, initiatorNonce, bind);
    return;
  }
  if (!parse) {
    sendHello(reply, true, initiatorNonce, std::string());
    return;
  }
  std::vector<uint8_t> padded(address, address + addressLength);  // see kAddressPadding
  padded.resize(addressLength + ucx::kAddressPadding);
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.address = reinterpret_cast<const ucp_address_t*>(padded.data());
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = &UcxBackendImpl::onEndpointError;
  ep.err_handler.arg = this;
  if (ucp_ep_create(worker_, &ep, &conn.ep) == UCS_OK)
    connectionByOwnEp_[conn.ep] = reply;
  else
    conn.ep = nullptr;  // replies fall back to the reply ep
  sendHello(conn.ep != nullptr ? conn.ep : reply, true, initiatorNonce, bind);
}

// Initiator: the target names itself on its own endpoint. With a secret this is where the
// handshake ends: the bind MAC proves the endpoint is the target's, and the waiting work goes out.
void UcxBackendImpl::handleHelloReply(ucp_ep_h reply, const ucx::HelloHeader& h, const std::string& name,
                                      const uint8_t* rest, size_t restLength) {
  if (secret_.empty()) {
    nameConnection(reply, name, h.agentId);
    // The target has named our connection (it answers on its own endpoint): it can grant now, and
    // cuda_ipc transfers waiting for that go out.
    if (UcxPeer* peer = peerByNonce(h.nonce); peer != nullptr && !peer->failed_ && peer->agentId_ == h.agentId) {
      peer->named_ = true;
      releaseWaiting(*peer);
      probeCma(*peer);
    }
    return;
  }
  UcxPeer* peer = peerByNonce(h.nonce);
  if (peer == nullptr || peer->failed_ || peer->authenticated_ || peer->name_ != name || peer->agentId_ != h.agentId) {
    ++counters_.droppedUnauthenticated;
    return;
  }
  if (!h.auth) {
    failPeer(*peer, Status(Code::NotAllowed, "it does not authenticate connections (it has no secret); this agent requires it"));
    return;
  }
  if (!peer->proved_ || restLength != ucx::kMacBytes) {
    ++counters_.droppedUnauthenticated;
    return;
  }
  const Digest want = mac("kvwire/3 bind", peer->nonce_, peer->targetNonce_, agentId_, peer->agentId_, agentName_, peer->name_);
  if (!digestsEqual(want.data(), rest)) {
    ++counters_.failedHandshakes;
    return;
  }
  nameConnection(reply, name, h.agentId);
  peer->authenticated_ = true;
  peer->named_ = true;
  releaseWaiting(*peer);
  probeCma(*peer);
}

UcxBackendImpl::Connection& UcxBackendImpl::nameConnection(ucp_ep_h reply, const std::string& name, uint64_t agentId) {
  if (auto known = connections_.find(reply); known != connections_.end()) {
    if (known->second.name == name && known->second.agentId == agentId) return known->second;  // said twice
    // UCX reuses the memory of endpoints it destroyed: a HELLO of someone else on a known reply
    // endpoint means the connection we knew there is over (its peer went away unnoticed).
    // Keeping it made every reply of the newcomer look like a stranger's (measured: an agent
    // that outlived ~7 killed peers on shm could no longer talk to any new one).
    const bool served = known->second.ep != nullptr;
    const auto [oldName, oldId] = dropConnection(reply);
    if (served) reportLost(oldName, oldId, "connection gone (its endpoint was reused)");
  }
  // A new instance of a known name: the old instance's connections are over (it was restarted,
  // and its death may not have been noticed yet). Said now, in order, before any message of the
  // new instance is handled, so nothing of the new one is mistaken for the old one's.
  std::vector<std::pair<ucp_ep_h, uint64_t>> replaced;
  for (auto& [r, c] : connections_)
    if (c.name == name && c.agentId != agentId) replaced.emplace_back(r, c.agentId);
  for (auto& [r, oldId] : replaced) {
    const bool served = connections_[r].ep != nullptr;
    dropConnection(r);
    if (served) host_->connectionLost(name, oldId, Status(Code::RemoteDisconnect, "replaced by a new instance"));
  }
  Connection& conn = connections_[reply];
  conn.name = name;
  conn.agentId = agentId;
  return conn;
}

ucs_status_t UcxBackendImpl::handleWrite(const void* header, size_t headerLength, void* data, size_t length,
                                         const ucp_am_recv_param_t* param, ucp_ep_h reply) {
  ucx::WriteHeader h{};
  if (!readHeader(header, headerLength, &h) || reply == nullptr) return refuse(param, UCS_ERR_INVALID_PARAM);
  auto key = std::make_pair(reply, h.transferId);
  InboundWrite* open = openInbound(key);
  if (open == nullptr) return refuse(param, UCS_ERR_NO_RESOURCE);  // its commit is answered with the reason
  InboundWrite& in = *open;
  LocalRegionRef hold;
  Result<uint8_t*> dst = h.length == length
                             ? host_->resolveInbound(h.regionId, h.offset, h.length, kAccessWrite, &hold, true)
                             : Result<uint8_t*>(Status(Code::InvalidParam, "segment length disagrees with its data"));
  const bool toVram = dst.isOk() && hold->info.kind == MemKind::Vram;
  const int device = toVram ? static_cast<int>(hold->info.deviceId) : 0;
  const bool rndv = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
  if (dst.isOk() && toVram && rndv && !ucxCuda_) {  // lands in host memory first (counted for this connection)
    if (length > staging_->perConnection) {
      dst = Result<uint8_t*>(staging_->tooLarge(length));
    } else {
      StagingWait w;
      w.conn = reply;
      w.data = data;
      w.length = length;
      w.key = key;
      w.hold = hold;
      w.dst = addressOf(dst.value());
      w.device = device;
      w.firstIndex = h.firstIndex;
      // Received now if its staging fits, else when enough is released (the sender waits meanwhile).
      if (staging_->fits(reply, length) && stagingWaitsByConn_.count(reply) == 0) {
        auto taken = Staging::take(staging_, reply, length);
        if (taken.isOk()) {
          receiveStaged(std::move(w), std::move(taken.value()));
          return UCS_INPROGRESS;
        }
        dst = Result<uint8_t*>(taken.status());
      } else if (waitForStaging(std::move(w))) {
        return UCS_INPROGRESS;
      } else {
        dst = Result<uint8_t*>(Status(Code::Unavailable, "VRAM staging at this agent is full and this connection may not wait "
                                                          "for it (too many of its segments wait already, or it never said HELLO)"));
      }
    }
  }
  if (!dst.isOk()) {
    if (in.error.isOk()) in.error = Status(dst.status().code(), dst.status().message(), h.firstIndex);
    ++in.landed;
    maybeFinishInbound(key);
    return UCS_OK;  // the data is dropped; the ACK tells the initiator why
  }
  if (!rndv) {
    if (!toVram) {
      copyBytes(dst.value(), data, length);
    } else if (Status st = copyStaged(device, {{addressOf(dst.value()), addressOf(data), length}}, false); !st && in.error.isOk()) {
      in.error = Status(st.code(), st.message(), h.firstIndex);
    }
    ++in.landed;
    maybeFinishInbound(key);
    return UCS_OK;
  }
  auto op = std::make_unique<RequestContext>();
  op->kind = RequestContext::kInboundWrite;
  op->hold = std::move(hold);
  op->inbound = key;
  receive(data, dst.value(), length, std::move(op), toVram && ucxCuda_);
  return UCS_INPROGRESS;
}

void UcxBackendImpl::startStagedWrite(StagingWait w) {
  auto in = inbound_.find(w.key);
  if (in == inbound_.end()) {  // its WRITE is over (its connection ended): nobody wants the bytes
    ucp_am_data_release(worker_, w.data);
    return;
  }
  Result<StagingRef> taken = w.hold->live ? Staging::take(staging_, w.conn, w.length)
                                           : Result<StagingRef>(Status(Code::NotFound, "region '" + w.hold->info.name +
                                                                                           "' was deregistered while the data arrived"));
  if (!taken.isOk()) {
    ucp_am_data_release(worker_, w.data);
    if (in->second.error.isOk()) in->second.error = Status(taken.status().code(), taken.status().message(), w.firstIndex);
    ++in->second.landed;
    maybeFinishInbound(w.key);
    return;
  }
  receiveStaged(std::move(w), std::move(taken.value()));
}

void UcxBackendImpl::receiveStaged(StagingWait w, StagingRef staging) {
  auto op = std::make_unique<RequestContext>();
  op->kind = RequestContext::kInboundWrite;
  op->hold = std::move(w.hold);
  op->inbound = w.key;
  op->staging = std::move(staging);
  op->stagedTo = w.dst;
  op->stagedBytes = w.length;
  op->stagedDevice = w.device;
  op->stagedIndex = w.firstIndex;
  void* landing = op->staging->data();
  receive(w.data, landing, w.length, std::move(op), false);
}

bool UcxBackendImpl::waitForStaging(StagingWait w) {
  // Only a connection that ends when its peer does (an endpoint of ours, failed by UCX) may wait:
  // the waits of any other could outlive it, and its reply endpoint be reused by someone else.
  auto known = connections_.find(w.conn);
  if (known == connections_.end() || known->second.ep == nullptr) return false;
  auto counted = stagingWaitsByConn_.find(w.conn);
  const WaitCount now = counted == stagingWaitsByConn_.end() ? WaitCount{} : counted->second;
  if (now.waits >= kMaxStagingWaitsPerConnection || now.bytes + waitBytes(w) > kMaxStagingWaitBytesPerConnection ||
      stagingWaitBytes_ + waitBytes(w) > kMaxStagingWaitBytes)
    return false;
  countWait(w);
  stagingWaits_.push_back(std::move(w));
  return true;
}

void UcxBackendImpl::retryStagingWaits() {
  staging_->released = false;
  // In order: a connection's waits start in the order they came (a READ never overtakes a WRITE
  // segment of the same connection that waits before it).
  std::deque<StagingWait> waits;
  waits.swap(stagingWaits_);
  stagingWaitsByConn_.clear();
  stagingWaitBytes_ = 0;
  std::set<ucp_ep_h> blocked;  // connections whose first wait does not fit yet: the rest of theirs wait too
  for (StagingWait& w : waits) {
    if (connections_.count(w.conn) == 0) {  // (dropped meanwhile: not served)
      if (!w.read) ucp_am_data_release(worker_, w.data);
      continue;
    }
    if (blocked.count(w.conn) || (!w.read && !staging_->fits(w.conn, w.length))) {
      blocked.insert(w.conn);
      countWait(w);
      stagingWaits_.push_back(std::move(w));
      continue;
    }
    if (w.read) {  // (serveRead checks whether its staging fits)
      const size_t before = stagingWaits_.size();
      serveRead(w.conn, w.sendOn, w.header, w.segments.data());  // it waits again if it still does not fit
      if (stagingWaits_.size() != before) blocked.insert(w.conn);
      continue;
    }
    startStagedWrite(std::move(w));
  }
}

void UcxBackendImpl::dropStagingWaits(ucp_ep_h conn, ucp_worker_h worker) {
  for (auto it = stagingWaits_.begin(); it != stagingWaits_.end();) {
    if (conn != nullptr && it->conn != conn) {
      ++it;
      continue;
    }
    if (!it->read) ucp_am_data_release(worker, it->data);
    stagingWaitBytes_ -= waitBytes(*it);
    it = stagingWaits_.erase(it);
  }
  if (conn == nullptr) {
    stagingWaitsByConn_.clear();
    stagingWaitBytes_ = 0;
  } else {
    stagingWaitsByConn_.erase(conn);
  }
}

InboundWrite* UcxBackendImpl::openInbound(const std::pair<ucp_ep_h, uint64_t>& key) {
  auto it = inbound_.find(key);
  if (it != inbound_.end()) return &it->second;
  size_t& open = openWrites_[key.first];
  if (open >= kMaxOpenWritesPerConnection) {
    if (refusedWrites_.size() >= kMaxOpenWritesPerConnection) refusedWrites_.erase(refusedWrites_.begin());
    refusedWrites_.insert(key);
    return nullptr;
  }
  ++open;
  return &inbound_[key];
}

void UcxBackendImpl::closeInbound(std::map<std::pair<ucp_ep_h, uint64_t>, InboundWrite>::iterator it) {
  auto open = openWrites_.find(it->first.first);
  if (open != openWrites_.end() && --open->second == 0) openWrites_.erase(open);
  inbound_.erase(it);
}

void UcxBackendImpl::maybeFinishInbound(std::pair<ucp_ep_h, uint64_t> key) {
  auto it = inbound_.find(key);
  if (it == inbound_.end()) return;
  InboundWrite& in = it->second;
  if (in.expected < 0 || in.landed < static_cast<uint64_t>(in.expected)) return;
  // Every segment is in place: acknowledge first, then tell the application.
  Status st = in.error;
  bool deliver = st.isOk() && in.hasNotify;
  std::string message = std::move(in.notify);
  closeInbound(it);
  sendStatus(replyPath(key.first), ucx::kAmAck, key.second, st);
  if (deliver) {
    host_->notificationArrived(connectionName(key.first), std::move(message));
  }
}

void UcxBackendImpl::serveRead(ucp_ep_h conn, ucp_ep_h sendOn, const ucx::ReadRequestHeader& h, const ucx::ReadSegment* segs) {
  // Check every segment before sending any byte, so a bad request moves nothing.
  std::vector<std::pair<uint8_t*, uint64_t>> sources(h.segments);
  LocalRegionRef hold;
  for (uint32_t i = 0; i < h.segments; ++i) {
    ucx::ReadSegment s{};
    std::memcpy(&s, segs + i, sizeof s);
    Result<uint8_t*> src = host_->resolveInbound(h.regionId, s.offset, s.length, kAccessRead, &hold, true);
    if (!src.isOk()) {
      sendStatus(sendOn, ucx::kAmReadDone, h.transferId,
                 Status(src.status().code(), src.status().message(), s.firstIndex));
      return;
    }
    sources[i] = {src.value(), s.length};
  }
  // The message that starts at segment i ends before the returned one: a large segment alone, or a
  // run of small segments packed up to kPackBytesMax.
  const auto messageEnd = [&](uint32_t i) {
    if (sources[i].second > ucx::kPackSegmentMax) return i + 1;
    for (size_t packed = 0; i < h.segments && sources[i].second <= ucx::kPackSegmentMax &&
                            packed + sources[i].second <= ucx::kPackBytesMax;
         ++i)
      packed += sources[i].second;
    return i;
  };
  size_t messages = 0;
  for (uint32_t i = 0; i < h.segments; i = messageEnd(i)) ++messages;
  auto sending = readSends_.find(sendOn);
  if ((sending == readSends_.end() ? 0 : sending->second) + messages > kMaxReadSendsPerConnection) {
    sendStatus(sendOn, ucx::kAmReadDone, h.transferId, Status(Code::Unavailable, "too many reads in flight on this connection"));
    return;
  }
  // VRAM: copied to host memory first (every segment, or the small ones packed here where UCX takes
  // device addresses), counted against this connection's staging: served now if that fits, else
  // when enough is released.
  const bool fromVram = hold && hold->info.kind == MemKind::Vram;
  const auto staged = [&](uint64_t length) { return !ucxCuda_ || length <= ucx::kPackSegmentMax; };
  StagingRef staging;
  if (fromVram) {
    uint64_t bytes = 0;
    for (auto& [p, length] : sources)
      if (staged(length)) bytes += length;
    if (bytes > staging_->perConnection) {
      sendStatus(sendOn, ucx::kAmReadDone, h.transferId, staging_->tooLarge(bytes));
      return;
    }
    if (!staging_->fits(conn, bytes) || stagingWaitsByConn_.count(conn) != 0) {
      StagingWait w;
      w.conn = conn;
      w.read = true;
      w.sendOn = sendOn;
      w.header = h;
      w.segments.assign(segs, segs + h.segments);
      if (!waitForStaging(std::move(w)))
        sendStatus(sendOn, ucx::kAmReadDone, h.transferId,
                   Status(Code::Unavailable, "VRAM staging at this agent is full and this READ may not wait for it (too "
                                             "many reads of this connection wait already, or it never said HELLO)"));
      return;
    }
    auto taken = Staging::take(staging_, conn, bytes);
    if (!taken.isOk()) {
      sendStatus(sendOn, ucx::kAmReadDone, h.transferId, taken.status());
      return;
    }
    staging = std::move(taken.value());
    std::vector<cuda::CopyRun> runs;
    uint64_t at = 0;
    for (auto& [p, length] : sources) {
      if (!staged(length)) continue;
      runs.push_back({addressOf(staging->data() + at), addressOf(p), length});
      p = staging->data() + at;
      at += length;
    }
    if (Status st = copyStaged(static_cast<int>(hold->info.deviceId), runs, true); !st) {
      sendStatus(sendOn, ucx::kAmReadDone, h.transferId, st);
      return;
    }
  }
  for (uint32_t i = 0; i < h.segments;) {
    const uint32_t end = messageEnd(i);
    auto op = std::make_unique<RequestContext>();
    op->kind = RequestContext::kReadDataSend;
    op->hold = hold;
    op->servedOn = sendOn;
    ++readSends_[sendOn];
    if (sources[i].second <= ucx::kPackSegmentMax) {  // a run of small segments goes back as one message
      for (uint32_t j = i; j < end; ++j) op->payload.append(reinterpret_cast<const char*>(sources[j].first), sources[j].second);
      ucx::PackedReadHeader ph{h.transferId, i, end - i};
      op->setHeader(ph);
      const std::string& payload = op->payload;
      if (!send(sendOn, ucx::kAmReadPacked, std::move(op), payload.data(), payload.size(), false)) return;
    } else {
      ucx::ReadDataHeader rh{h.transferId, i};
      op->setHeader(rh);
      const bool device = fromVram && !staged(sources[i].second);
      if (!device) op->staging = staging;  // (sent from it; a packed payload is a copy)
      if (!send(sendOn, ucx::kAmReadData, std::move(op), sources[i].first, sources[i].second, false, device)) return;
    }
    i = end;
  }
  sendStatus(sendOn, ucx::kAmReadDone, h.transferId, Status::ok());
}

ucs_status_t UcxBackendImpl::handleReadData(const void* header, size_t headerLength, void* data, size_t length,
                                            const ucp_am_recv_param_t* param) {
  ucx::ReadDataHeader h{};
  if (!readHeader(header, headerLength, &h)) return refuse(param, UCS_ERR_INVALID_PARAM);
  ucp_ep_h reply = (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) ? param->reply_ep : nullptr;
  TransferRef t = replyTarget(h.transferId, reply);
  if (!t) return refuse(param, UCS_ERR_CANCELED);  // settled already, or a third party's: drop the data
  // The destination comes from our own plan, never from the wire.
  if (h.segment >= t->segments.size() || t->segments[h.segment].length != length) {
    endTransfer(t, Status(Code::Backend, "peer sent a read segment that does not match the request"));
    return refuse(param, UCS_ERR_INVALID_PARAM);
  }
  uint8_t* dst = t->segments[h.segment].local;
  const bool toVram = t->local->info.kind == MemKind::Vram;
  const int device = static_cast<int>(t->local->info.deviceId);
  if (!(param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
    if (!toVram) {
      copyBytes(dst, data, length);
    } else if (Status st = copyStaged(device, {{addressOf(dst), addressOf(data), length}}, false); !st) {
      endTransfer(t, st);
      return UCS_OK;
    }
    ++t->landed;
    finishRead(t);
    return UCS_OK;
  }
  auto op = std::make_unique<RequestContext>();
  op->kind = RequestContext::kInboundRead;
  op->transfer = t;
  op->hold = t->local;
  if (toVram && !ucxCuda_) {  // lands in host memory first, then is copied to the device (completeOp)
    auto taken = Staging::take(staging_, nullptr, length);
    if (!taken.isOk()) {
      endTransfer(t, taken.status());
      return refuse(param, UCS_ERR_NO_MEMORY);
    }
    op->staging = std::move(taken.value());
    op->stagedTo = addressOf(dst);
    op->stagedBytes = length;
    op->stagedDevice = device;
    dst = op->staging->data();
  }
  ++t->landingReceives;
  receive(data, dst, length, std::move(op), toVram && ucxCuda_);
  return UCS_INPROGRESS;
}

void UcxBackendImpl::finishRead(const TransferRef& t) {
  if (t->settled || !t->remoteDone || t->landed < t->segments.size()) return;
  notifyAfter(t);  // the bytes are in our memory; now the target may learn the read is over
  endTransfer(t, Status::ok());
}

// ---------------------------------------------------------------------------------------------
// Progress

// An initiator went away: forget its half-finished WRITEs and close our endpoint to it.
void UcxBackendImpl::connectionFailed(ucp_ep_h own) {
  auto it = connectionByOwnEp_.find(own);
  if (it == connectionByOwnEp_.end()) return;
  const auto [name, agentId] = dropConnection(it->second);
  reportLost(name, agentId, "connection failed");
}

void UcxBackendImpl::reportLost(const std::string& name, uint64_t agentId, const char* why) {
  if (!name.empty() && !connectedTo(name)) host_->connectionLost(name, agentId, Status(Code::RemoteDisconnect, why));
}

bool UcxBackendImpl::connectedTo(const std::string& name) const {
  for (auto& [reply, conn] : connections_)
    if (conn.ep != nullptr && conn.name == name) return true;
  return false;
}

std::pair<std::string, uint64_t> UcxBackendImpl::dropConnection(ucp_ep_h reply, bool closed) {
  auto it = connections_.find(reply);
  if (it == connections_.end()) return {};
  std::string name = std::move(it->second.name);
  const uint64_t agentId = it->second.agentId;
  ucp_ep_h own = it->second.ep;
  connections_.erase(it);
  for (auto g = grantees_.begin(); g != grantees_.end();)  // copies it started are waited for by retired_
    if (g->second.reply == reply) {
      const uint64_t token = (g++)->first;
      endGrant(token);
    } else {
      ++g;
    }
  for (auto in = inbound_.begin(); in != inbound_.end();)
    in = in->first.first == reply ? inbound_.erase(in) : std::next(in);
  openWrites_.erase(reply);
  dropStagingWaits(reply, worker_);
  if (closed) {  // its agent closed: its copies ended and its IPC mappings went with it
    for (Retired& r : retired_)
      r.vramAcks.erase(std::remove_if(r.vramAcks.begin(), r.vramAcks.end(), [&](const auto& a) { return a.second == reply; }),
                       r.vramAcks.end());
    releaseRetired();
  }
  for (auto r = refusedWrites_.lower_bound({reply, 0}); r != refusedWrites_.end() && r->first == reply;) r = refusedWrites_.erase(r);
  if (own) {
    connectionByOwnEp_.erase(own);
    endpointsToClose_.push_back(own);
  }
  return {name, agentId};
}

bool UcxBackendImpl::progress() {
  bool any = false;
  if (rebuildWanted_) {
    if (shuttingDown_) {
      rebuildWanted_ = false;  // closing: no new worker
    } else if (onNativeProgressThread) {
      return false;  // the old worker is over: the JS thread rebuilds (woken when this was decided)
    } else {
      rebuildWanted_ = false;
      rebuildWorker();
      any = true;
    }
  }
  // Bounded: a peer that floods us must not keep this loop (and the JS thread) busy forever; the
  // caller comes back at once when anything happened.
  for (int round = 0; round < 4096 && ucp_worker_progress(worker_) != 0; ++round) any = true;
  if (canary_ != nullptr) ucp_worker_progress(canary_);
  if (pollCuda()) any = true;
  if (!copyJobs_.empty()) {
    std::vector<uint64_t> copied;
    {
      std::lock_guard<std::mutex> lock(copiedMutex_);
      copied.swap(copied_);
    }
    for (uint64_t id : copied) {
      auto it = copyJobs_.find(id);
      if (it == copyJobs_.end()) continue;
      TransferRef t = std::move(it->second->transfer);
      Status error = std::move(it->second->error);  // every share has finished: no lock needed
      const uint64_t token = it->second->cmaToken;
      copyJobs_.erase(it);
      any = true;
      copyEnded(token);
      if (t->ending) {
        settleIfQuiet(t);
        continue;
      }
      if (!error.isOk()) {
        endTransfer(t, error);
        continue;
      }
      if (!t->settled) notifyAfter(t);
      endTransfer(t, Status::ok());
    }
  }
  if (staging_->released && !stagingWaits_.empty()) {
    retryStagingWaits();
    any = true;
  }
  checkLiveness();
  if (rebuildWanted_) return true;  // just decided on the progress thread: wake the JS thread for it
  if (!retired_.empty()) {
    const uint64_t now = monotonicNs();
    if (now - retiredCheckNs_ > 10'000'000ull) {  // the slots are plain memory: a look every 10 ms
      retiredCheckNs_ = now;
      releaseRetired();
    }
  }
  if (!failedPeers_.empty()) {
    auto failed = std::move(failedPeers_);
    failedPeers_.clear();
    for (auto& [key, st] : failed) host_->peerFailed(key, st);
    any = true;
  }
  for (ucp_ep_h own : std::exchange(failedConnections_, {})) connectionFailed(own);
  for (const Goodbye& bye : std::exchange(goodbyes_, {})) {
    // UCX may have reused the endpoint for a newcomer since: only the instance that said BYE goes.
    auto it = connections_.find(bye.reply);
    if (it == connections_.end() || it->second.agentId != bye.agentId) continue;
    const auto [name, known] = dropConnection(bye.reply, !bye.moved);
    if (bye.moved)  // its new worker may already have said HELLO: the old address is over all the same
      host_->connectionLost(name, known, Status(Code::RemoteDisconnect, "it moved to a new UCX worker (load its new metadata)"));
    else
      reportLost(name, known, "it closed");
    any = true;
  }
  for (ucp_ep_h ep : std::exchange(endpointsToClose_, {})) closeEndpoint(ep, true);
  for (size_t i = 0; i < closing_.size();) {
    if (ucp_request_check_status(closing_[i]) != UCS_INPROGRESS) {
      ucp_request_free(closing_[i]);
      closing_[i] = closing_.back();
      closing_.pop_back();
      any = true;
    } else {
      ++i;
    }
  }
  return any;
}

bool UcxBackendImpl::arm() {
  if (staging_->released && !stagingWaits_.empty()) return false;  // waits to try again first
  return ucp_worker_arm(worker_) == UCS_OK;
}

}  // namespace

std::string ucxVersion() {
  unsigned major = 0, minor = 0, release = 0;
  ucp_get_version(&major, &minor, &release);
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(release);
}

// What one of UCX's print functions (they write to a FILE*) writes, as a string; empty if no stream opens.
template <typename Print>
static std::string printed(Print print) {
  char* text = nullptr;
  size_t size = 0;
  FILE* out = open_memstream(&text, &size);
  if (!out) return {};
  print(out);
  std::fclose(out);
  std::string s(text ? text : "", size);
  std::free(text);
  return s;
}

UcxInfo ucxInfo() {
  UcxInfo info;
  ucp_config_t* config = nullptr;
  if (ucs_status_t st = ucp_config_read(nullptr, nullptr, &config); st != UCS_OK) {
    info.error = ucsMessage("ucp_config_read", st);
    return info;
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_RMA;
  ucp_context_h context = nullptr;
  ucs_status_t st = ucp_init(&params, config, &context);
  ucp_config_release(config);
  if (st != UCS_OK) {
    info.error = ucsMessage("ucp_init", st);
    return info;
  }
  // The transports: UCX's own listing ("#      resource 0  :  md 0  dev 0  flags -- tcp/lo").
  const std::string text = printed([&](FILE* out) { ucp_context_print_info(context, out); });
  for (size_t from = 0; from < text.size();) {
    const size_t end = std::min(text.find('\n', from), text.size());
    const std::string l = text.substr(from, end - from);
    if (l.find("resource") != std::string::npos) {
      const size_t at = l.find_last_of(' ');
      if (at != std::string::npos && l.find('/', at) != std::string::npos) info.transports.push_back(l.substr(at + 1));
    }
    from = end + 1;
  }
  ucp_context_attr_t attr{};
  attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  if (ucp_context_query(context, &attr) == UCS_OK)
    for (int t = 0; t < UCS_MEMORY_TYPE_LAST; ++t)
      if (attr.memory_types & (1ull << t)) info.memoryTypes.push_back(ucs_memory_type_names[t]);
  ucp_cleanup(context);
  return info;
}

// UCX's own description of an endpoint: its lanes and, per operation and message size, the protocol
// it selected for the endpoint's configuration (UCX >= 1.16: the protocol tables UCX_PROTO_INFO=y prints;
// 1.13: the v1 thresholds).
static std::string endpointText(ucp_ep_h ep) {
  return printed([ep](FILE* out) { ucp_ep_print_info(ep, out); });
}

std::vector<Backend::ConnectionInfo> UcxBackendImpl::describeConnections() {
  std::vector<ConnectionInfo> out;
  for (const auto& [ep, peer] : peersByEp_)
    if (ep && !peer->failed_) out.push_back({peer->name_, true, endpointText(ep)});
  for (const auto& [reply, c] : connections_)
    if (c.ep && !c.name.empty()) out.push_back({c.name, false, endpointText(c.ep)});
  std::sort(out.begin(), out.end(), [](const ConnectionInfo& a, const ConnectionInfo& b) {
    return a.outbound != b.outbound ? a.outbound : a.peer < b.peer;
  });
  return out;
}

Result<std::unique_ptr<Backend>> createUcxBackend(const BackendOptions& options, BackendHost* host) {
  auto backend = std::make_unique<UcxBackendImpl>(host);
  Status st = backend->init(options);
  if (!st) return st;
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace kvwire
