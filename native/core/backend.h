// The Backend interface: the only way the core talks to a transport. Backends never include each other.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "metadata.h"
#include "status.h"
#include "transfer.h"

namespace kvwire {

// True on an agent's native progress thread (the addon's helper), false on the JS thread. A backend
// keeps what must not run there (changing the process environment, which Node reads on the JS
// thread without a lock of ours) for the JS thread's next step.
inline thread_local bool onNativeProgressThread = false;

// What a backend may ask of the agent that owns it. Called on the progress thread only.
class BackendHost {
 public:
  virtual ~BackendHost() = default;
  // A transfer reached its end; the host settles it (only the first call per transfer counts).
  virtual void transferFinished(const TransferRef& t, Status status) = 0;
  // A notification arrived from the peer bound to the connection it came on.
  virtual void notificationArrived(const std::string& from, std::string message) = 0;
  // A peer's connection failed; every transfer to it must fail.
  virtual void peerFailed(uint64_t peerKey, Status status) = 0;
  // The connection with the agent `name` ended (it said goodbye, or our endpoint to it failed).
  // `agentId` is the instance that said goodbye (0 when unknown); a loaded peer of that instance
  // fails its transfers at once instead of waiting for UCX to notice.
  virtual void connectionLost(const std::string& name, uint64_t agentId, Status status) = 0;
  // The backend replaced its transport endpoint (new address): every transfer in flight fails with
  // `why`, every loaded peer must be connected again (Backend::connect), and the connections other
  // agents had opened to it (`lost`, by name) are over (they must load the new metadata).
  virtual void workerRebuilt(const std::vector<std::string>& lost, const Status& why) = 0;
  // Resolve a peer's access to this agent's memory: region id, bounds and access rights are all
  // checked here, never trusted from the wire. `hold` keeps the region alive while data moves. A
  // VRAM region is refused unless the caller moves device memory (`vram`): then the address returned
  // for one (hold->info.kind) is a device address, which host code must never touch.
  virtual Result<uint8_t*> resolveInbound(uint32_t regionId, uint64_t offset, uint64_t length, Access need,
                                          LocalRegionRef* hold, bool vram = false) = 0;
};

// One peer connection as a backend keeps it; prepared once per peer generation.
class BackendPeer {
 public:
  virtual ~BackendPeer() = default;
  // Refresh the per-region state (keys, mappings) from newer metadata of the same peer instance.
  virtual Status updateRegions(const AgentMetadata& md) = 0;
  // The path Auto resolves to for this remote region and `local` region (their memory kinds).
  // `segments` of `bytes` in all: the shape of the batch, for a backend whose paths differ by size.
  virtual Path choosePath(uint32_t remoteRegionId, const LocalRegion& local, Path requested, uint64_t bytes,
                          size_t segments, Status* why) = 0;
  // The peer is gone (it said goodbye, or moved to a new endpoint): close without waiting on it.
  virtual void markGone() = 0;
};

struct BackendOptions {
  std::string backend = "ucx";  // which registered backend (backend_registry.h) the agent uses
  std::string transports;   // UCX_TLS
  std::string devices;      // UCX_NET_DEVICES
  std::string agentName;
  uint64_t agentId = 0;     // this instance, as the metadata publishes it
  // With a secret, a connection is served only after a mutual HMAC challenge-response (wire.h).
  std::string secret;
  // Same-host peers may copy into and out of this agent's registered regions themselves (Linux CMA).
  bool cma = true;
};

// What the trust boundary refused (cumulative).
struct SecurityCounters {
  uint64_t droppedUnauthenticated = 0;  // messages on a connection that had not authenticated
  uint64_t failedHandshakes = 0;        // handshake proofs that did not verify
  uint64_t refusedAddresses = 0;        // peer worker addresses that failed the check before UCX (HELLO, metadata)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual Result<std::unique_ptr<BackendMemory>> allocate(uint64_t length) = 0;
  virtual Result<std::unique_ptr<BackendMemory>> registerMemory(uint8_t* ptr, uint64_t length) = 0;
  virtual std::vector<uint8_t> address() const = 0;
  virtual Result<std::unique_ptr<BackendPeer>> connect(const AgentMetadata& md, uint64_t peerKey) = 0;
  // Starts moving a planned transfer; completion arrives through BackendHost::transferFinished.
  virtual Status post(BackendPeer& peer, const TransferRef& t) = 0;
  // A region was registered (its id is set), or deregistered (also each one at close). A backend
  // whose peers reach regions without this agent (one-sided copies) publishes them, and keeps a
  // deregistered one (and so its memory) until those peers have stopped.
  virtual void regionRegistered(const LocalRegionRef& region) { (void)region; }
  virtual void regionDeregistered(const LocalRegionRef& region) { (void)region; }
  // Deregistered regions still kept for such peers.
  virtual uint64_t retiredRegions() const { return 0; }
  // Batches moved by one launch of a GPU copy kernel.
  virtual uint64_t gpuKernelBatches() const { return 0; }
  // VRAM bytes this agent copied between host memory and the device for a transport that moves host
  // memory (staging).
  virtual uint64_t vramStagedBytes() const { return 0; }
  // Why the first GPU copy that failed did (empty: none has). CUDA faults are sticky for the context.
  virtual std::string gpuFault() const { return {}; }
  virtual Status notify(BackendPeer& peer, const std::string& message) = 0;
  // Notifies an agent that connected to this one by name (one whose metadata we never loaded).
  virtual Status notifyConnection(const std::string& name, const std::string& message) = 0;
  // The transfer is ending early (cancel, deadline, peer failure): stop what can be stopped. Returns
  // true if no byte of it can land any more; otherwise the backend calls transferFinished with
  // t->endStatus once the last one has. `peerGone`: its peer failed, so nothing more can arrive
  // from it (receives UCX still holds for it may never complete, and are not waited for).
  virtual bool abandon(const TransferRef& t, bool peerGone) = 0;

  // Progress: a file descriptor that becomes readable when progress is needed.
  virtual int eventFd() const = 0;
  virtual bool progress() = 0;     // true if anything happened
  virtual bool arm() = 0;          // true if armed (safe to sleep on the fd); false if events are pending
  virtual bool busy() const = 0;   // operations in flight that need progress to finish
  // Work whose completion no event fd signals (CUDA copies): the caller keeps calling progress()
  // instead of sleeping while this is true.
  virtual bool needsPolling() const { return false; }
  virtual SecurityCounters securityCounters() const = 0;
  // What the transport does on each open connection, in its own words (UCX: ucp_ep_print_info, the
  // lanes and, per operation and message size, the protocol it selected). `outbound`: our connection
  // to a loaded peer; otherwise one a peer opened to us (the one we answer READs on).
  struct ConnectionInfo {
    std::string peer;
    bool outbound = true;
    std::string text;
  };
  virtual std::vector<ConnectionInfo> describeConnections() { return {}; }
  // This agent can no longer receive (its shared-memory queue is blocked by a peer that died
  // writing into it): only a new agent recovers.
  virtual bool receiveBlocked() const = 0;
  virtual uint64_t rebuilds() const = 0;  // times the transport endpoint was replaced (workerRebuilt)
  // Replaces the transport endpoint now, as a blocked receive queue does (tests of that path).
  virtual void rebuild() = 0;
  // Force-closes every connection and cancels what can be canceled; progress then drains the rest.
  virtual void shutdown() = 0;
  // Waits for the copies this process runs itself (GPU streams, copy threads) to finish.
  virtual void finishLocalCopies() {}
};

}  // namespace kvwire
