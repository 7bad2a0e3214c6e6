// The Agent: one kvwire endpoint. Owns the backend, the registry of local regions, the loaded
// peers and the transfers in flight. No Node headers: a C++ program can drive it directly.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend.h"
#include "descriptors.h"
#include "metadata.h"
#include "status.h"
#include "transfer.h"

namespace kvwire {

struct AgentCallbacks {
  // Called exactly once per transfer id, on the progress thread.
  std::function<void(uint64_t id, const Status& status, const TransferStats& stats)> settled;
  std::function<void(const std::string& from, std::string message)> notification;
  // A peer's connection ended (closed, failed, or dropped); may repeat for one peer.
  std::function<void(const std::string& peer, const std::string& reason)> disconnected;
  // The agent replaced its transport endpoint: its metadata changed (peers must load it again).
  std::function<void(const std::string& reason)> rebuilt;
};

struct PeerView {
  std::string name;
  uint64_t agentId = 0;
  uint64_t generation = 0;
  std::vector<RegionInfo> regions;
};

struct TransferRequest {
  Op op = Op::Write;
  Path path = Path::Auto;
  uint32_t localRegion = 0;
  DescriptorSpan local;
  std::string peer;
  uint64_t peerAgentId = 0;  // the peer instance the remote list was built for
  uint32_t remoteRegion = 0;
  DescriptorSpan remote;
  bool hasNotify = false;
  std::string notify;
};

class Agent : public BackendHost {
 public:
  static Result<std::unique_ptr<Agent>> create(const std::string& name, const BackendOptions& options,
                                               AgentCallbacks callbacks);
  ~Agent() override;

  const std::string& name() const { return name_; }
  uint64_t agentId() const { return agentId_; }
  uint64_t generation() const { return generation_; }

  Result<RegionInfo> allocate(const std::string& name, uint64_t length, uint8_t access);
  // hugePages: advise transparent huge pages for the whole 2 MiB pages inside [ptr, ptr + length).
  Result<RegionInfo> registerMemory(const std::string& name, uint8_t* ptr, uint64_t length, uint8_t access,
                                    std::shared_ptr<void> keeper, bool hugePages = false);
  // GPU memory (VRAM) on CUDA device `device`: allocated by kvwire, or memory another library in
  // this process owns at `address` (checked with the driver: device memory of that device, inside
  // one allocation). ERR_UNAVAILABLE, with the reason, where there is no CUDA driver or device.
  Result<RegionInfo> allocateVram(const std::string& name, uint64_t length, uint8_t access, uint32_t device);
  Result<RegionInfo> registerVram(const std::string& name, uint64_t address, uint64_t length, uint8_t access,
                                  uint32_t device);
  // Copies between host memory and a region (any kind) at `offset`, inside its bounds.
  Status writeRegion(uint32_t regionId, uint64_t offset, const uint8_t* src, uint64_t length);
  Status readRegion(uint32_t regionId, uint64_t offset, uint8_t* dst, uint64_t length);
  Status deregister(uint32_t regionId);
  LocalRegionRef regionRef(uint32_t regionId) const;

  Result<std::vector<uint8_t>> metadata() const;
  Result<PeerView> loadPeer(const uint8_t* blob, size_t size);
  Status forgetPeer(const std::string& name);

  Result<uint64_t> post(const TransferRequest& request);
  // Settles a transfer early with `code` (ERR_CANCELED or ERR_TIMEOUT). False if already settled.
  bool cancel(uint64_t id, Code code, const std::string& why);
  Status notify(const std::string& peer, const std::string& message);

  int eventFd() const;
  bool progress();
  bool arm();
  bool busy() const;
  bool needsPolling() const { return backend_ && backend_->needsPolling(); }
  SecurityCounters securityCounters() const { return backend_ ? backend_->securityCounters() : SecurityCounters{}; }
  bool receiveBlocked() const { return backend_ && backend_->receiveBlocked(); }
  std::vector<Backend::ConnectionInfo> describeConnections() {
    return backend_ && !closing_ ? backend_->describeConnections() : std::vector<Backend::ConnectionInfo>{};
  }
  uint64_t rebuilds() const { return backend_ ? backend_->rebuilds() : 0; }
  uint64_t retiredRegions() const { return backend_ ? backend_->retiredRegions() : 0; }
  uint64_t gpuKernelBatches() const { return backend_ ? backend_->gpuKernelBatches() : 0; }
  uint64_t vramStagedBytes() const { return backend_ ? backend_->vramStagedBytes() : 0; }
  std::string gpuFault() const { return backend_ ? backend_->gpuFault() : std::string(); }
  void rebuildTransport() {  // tests: the path a blocked shared-memory queue takes, on demand
    if (backend_ && !closing_) backend_->rebuild();
  }
  size_t inFlight() const { return transfers_.size(); }
  // Closing in two steps, so the caller can keep progressing (on its event loop) while UCX
  // finishes what it owns: beginClose settles every transfer with ERR_CANCELED, drops peers and
  // regions and closes connections; drained() says UCX is done; close() releases the backend
  // (blocking briefly if it is not drained).
  void beginClose();
  bool drained() const;
  void close();
  bool closed() const { return closing_; }

  // BackendHost
  void transferFinished(const TransferRef& t, Status status) override;
  void notificationArrived(const std::string& from, std::string message) override;
  void peerFailed(uint64_t peerKey, Status status) override;
  void connectionLost(const std::string& name, uint64_t agentId, Status status) override;
  void workerRebuilt(const std::vector<std::string>& lost, const Status& why) override;
  Result<uint8_t*> resolveInbound(uint32_t regionId, uint64_t offset, uint64_t length, Access need,
                                  LocalRegionRef* hold, bool vram) override;

 private:
  struct PeerEntry {
    AgentMetadata md;
    uint64_t key = 0;
    bool failed = false;
    Status failure;
    std::unique_ptr<BackendPeer> conn;
    std::unordered_map<uint32_t, size_t> regionIndex;  // region id -> md.regions index
  };
  Agent(std::string name, AgentCallbacks callbacks);
  static void indexRegions(PeerEntry& p);  // region id -> md.regions index
  void failPeerTransfers(uint64_t peerKey, const Status& status);
  static Status failedPeerStatus(const std::string& name, const Status& failure);
  // Ends a transfer with `status`, as soon as none of its bytes can land any more.
  void endEarly(const TransferRef& t, Status status, bool peerGone = false);
  PeerView viewOf(const PeerEntry& p) const;
  Result<RegionInfo> addVramRegion(const std::string& name, std::unique_ptr<BackendMemory> memory, uint8_t access,
                                   uint32_t device, uint64_t length);
  Result<LocalRegionRef> regionRange(const char* what, uint32_t regionId, uint64_t offset, uint64_t length) const;

  std::string name_;
  uint64_t agentId_;
  uint64_t generation_ = 1;
  AgentCallbacks callbacks_;
  std::unique_ptr<Backend> backend_;
  bool closing_ = false;
  uint32_t nextRegionId_ = 1;
  uint64_t nextTransferId_ = 1;
  uint64_t nextPeerKey_ = 1;
  std::unordered_map<uint32_t, LocalRegionRef> regions_;
  std::vector<std::weak_ptr<LocalRegion>> vramAllocations_;  // VRAM this agent allocated, while it exists
  std::unordered_map<std::string, std::unique_ptr<PeerEntry>> peers_;
  std::unordered_map<uint64_t, TransferRef> transfers_;
};

}  // namespace kvwire
