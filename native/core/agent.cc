#include "agent.h"

#include <sys/mman.h>
#include <sys/statvfs.h>

#include <cerrno>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>

#include "../cuda/vram.h"
#include "backend_registry.h"
#include "memory_ops.h"

namespace kvwire {

uint64_t monotonicNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

const char* pathName(Path path) {
  switch (path) {
    case Path::Auto: return "auto";
    case Path::Direct: return "direct";
    case Path::ActiveMessage: return "am";
    case Path::Rma: return "rma";
    case Path::Cma: return "cma";
    case Path::CudaIpc: return "cuda_ipc";
  }
  return "unknown";
}

namespace {
uint64_t randomId() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ monotonicNs();
}
// Bytes of host memory a new allocation may take: MemAvailable, and for the shared memory UCX
// allocates from, what /dev/shm still has. Touching pages beyond either kills the process (OOM or
// SIGBUS), so an allocation larger than this is refused up front. 0 when unknown (no check).
uint64_t hostAllocatable() {
  uint64_t limit = 0;
  if (FILE* f = std::fopen("/proc/meminfo", "r")) {
    char line[256];
    unsigned long long kb = 0;
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "MemAvailable: %llu kB", &kb) == 1) {
        limit = static_cast<uint64_t>(kb) * 1024;
        break;
      }
    std::fclose(f);
  }
  struct statvfs vfs {};
  if (statvfs("/dev/shm", &vfs) == 0) {
    const uint64_t shm = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    if (limit == 0 || shm < limit) limit = shm;
  }
  return limit;
}

const char* accessName(uint8_t access) {
  return access == kAccessRead ? "read" : access == kAccessWrite ? "write" : "readwrite";
}
}  // namespace

Agent::Agent(std::string name, AgentCallbacks callbacks)
    : name_(std::move(name)), agentId_(randomId()), callbacks_(std::move(callbacks)) {}

Result<std::unique_ptr<Agent>> Agent::create(const std::string& name, const BackendOptions& options,
                                             AgentCallbacks callbacks) {
  if (name.empty() || name.size() > kMaxNameBytes)
    return Status(Code::InvalidParam, "name must be 1.." + std::to_string(kMaxNameBytes) + " bytes");
  std::unique_ptr<Agent> agent(new Agent(name, std::move(callbacks)));
  BackendOptions opts = options;
  opts.agentName = name;
  opts.agentId = agent->agentId_;
  auto backend = createBackend(opts.backend, opts, agent.get());
  if (!backend.isOk()) return backend.status();
  agent->backend_ = std::move(backend.value());
  return agent;
}

Agent::~Agent() { close(); }

void Agent::beginClose() {
  if (closing_) return;
  // Copies this process runs itself (GPU streams, the copy pool) cannot be stopped: they finish
  // before the transfers settle, so no byte lands in memory after its transfer was rejected.
  if (backend_) backend_->finishLocalCopies();
  std::vector<TransferRef> all;
  for (auto& [id, t] : transfers_) all.push_back(t);
  // Closing settles everything now, landing bytes or not: the connections are about to go.
  for (auto& t : all) {
    endEarly(t, Status(Code::Canceled, "agent closed"));
    transferFinished(t, t->endStatus);
  }
  closing_ = true;
  if (backend_)
    for (auto& [id, r] : regions_) backend_->regionDeregistered(r);  // before the goodbyes
  if (backend_) backend_->shutdown();
  peers_.clear();
  regions_.clear();
}

bool Agent::drained() const { return !backend_ || !backend_->busy(); }

void Agent::close() {
  beginClose();
  backend_.reset();
}

// Pages of a cross-process copy (path 'cma', UCX's own cma) are pinned one by one in the kernel; with
// 2 MiB pages far fewer of them. Only pages faulted in after the advice are huge ones (khugepaged
// may merge older ones later), so a pool is best registered before it is filled.
static Status adviseHugePages(uint8_t* ptr, uint64_t length) {
  if (FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r")) {
    char mode[128] = {};
    const bool read = std::fgets(mode, sizeof mode, f) != nullptr;
    std::fclose(f);
    if (read && std::strstr(mode, "[never]"))
      return {Code::Unavailable, "hugePages: transparent huge pages are off on this machine "
                                 "(/sys/kernel/mm/transparent_hugepage/enabled: never)"};
  }
  const uintptr_t huge = 2u << 20;
  const uintptr_t from = (reinterpret_cast<uintptr_t>(ptr) + huge - 1) & ~(huge - 1);
  const uintptr_t to = (reinterpret_cast<uintptr_t>(ptr) + length) & ~(huge - 1);
  if (to <= from) return Status::ok();  // no whole huge page inside: nothing to advise
  if (madvise(reinterpret_cast<void*>(from), to - from, MADV_HUGEPAGE) != 0)
    return {errno == EINVAL ? Code::Unavailable : Code::Backend,  // EINVAL: a kernel without transparent huge pages
            std::string("hugePages: madvise(MADV_HUGEPAGE) failed: ") + std::strerror(errno)};
  return Status::ok();
}

Result<RegionInfo> Agent::allocate(const std::string& name, uint64_t length, uint8_t access) {
  if (closing_) return Status(Code::Closed, "agent is closed");
  if (length == 0) return Status(Code::InvalidParam, "allocate: bytes must be > 0");
  const uint64_t room = hostAllocatable();
  if (room != 0 && length > room)
    return Status(Code::Unavailable, "allocate: " + std::to_string(length) + " bytes requested, but this machine can hold " +
                                         std::to_string(room) + " more (available memory and /dev/shm)");
  auto mem = backend_->allocate(length);
  if (!mem.isOk()) return mem.status();
  auto region = std::make_shared<LocalRegion>();
  region->memory = std::move(mem.value());
  region->info = {nextRegionId_++, name, MemKind::Dram, access, 0,
                  reinterpret_cast<uint64_t>(region->memory->ptr), length, true, region->memory->rkey, {}};
  regions_[region->info.id] = region;
  backend_->regionRegistered(region);
  ++generation_;
  return region->info;
}

Result<RegionInfo> Agent::registerMemory(const std::string& name, uint8_t* ptr, uint64_t length, uint8_t access,
                                         std::shared_ptr<void> keeper, bool hugePages) {
  if (closing_) return Status(Code::Closed, "agent is closed");
  if (ptr == nullptr || length == 0) return Status(Code::InvalidParam, "register: memory must be non-empty");
  if (hugePages) {
    Status st = adviseHugePages(ptr, length);
    if (!st) return st;
  }
  auto mem = backend_->registerMemory(ptr, length);
  if (!mem.isOk()) return mem.status();
  auto region = std::make_shared<LocalRegion>();
  region->memory = std::move(mem.value());
  region->keeper = std::move(keeper);
  region->info = {nextRegionId_++, name, MemKind::Dram, access, 0, reinterpret_cast<uint64_t>(ptr), length, false,
                  region->memory->rkey, {}};
  regions_[region->info.id] = region;
  backend_->regionRegistered(region);
  ++generation_;
  return region->info;
}

Result<RegionInfo> Agent::allocateVram(const std::string& name, uint64_t length, uint8_t access, uint32_t device) {
  if (closing_) return Status(Code::Closed, "agent is closed");
  if (length == 0) return Status(Code::InvalidParam, "allocate: bytes must be > 0");
  auto mem = cuda::allocateVram(static_cast<int>(device), length);
  if (!mem.isOk()) return mem.status();
  return addVramRegion(name, std::move(mem.value()), access, device, length);
}

Result<RegionInfo> Agent::registerVram(const std::string& name, uint64_t address, uint64_t length, uint8_t access,
                                       uint32_t device) {
  if (closing_) return Status(Code::Closed, "agent is closed");
  if (address == 0 || length == 0) return Status(Code::InvalidParam, "register: address and bytes must be > 0");
  auto mem = cuda::adoptVram(static_cast<int>(device), address, length);
  if (!mem.isOk()) return mem.status();
  // Inside VRAM this agent allocated: that allocation stays until this region goes too (deregistering
  // the allocating region must not free memory another region still publishes).
  // (Also one deregistered but still held, by a transfer or for peers' acknowledgements.)
  LocalRegionRef owner;
  for (auto it = vramAllocations_.begin(); it != vramAllocations_.end();) {
    LocalRegionRef r = it->lock();
    if (!r) {
      it = vramAllocations_.erase(it);
      continue;
    }
    if (address >= r->info.base && address - r->info.base < r->memory->length) owner = r;
    ++it;
  }
  auto info = addVramRegion(name, std::move(mem.value()), access, device, length);
  if (info.isOk() && owner) regions_[info.value().id]->keeper = owner;
  return info;
}

// A same-host peer reaches VRAM through its CUDA IPC handle (metadata section "cuda-ipc"). A region
// that is not a whole allocation (the handle would open all of it), or memory the driver cannot
// export (e.g. from a stream-ordered pool), is still a region: used locally, and across hosts once
// that path lands, but not opened by same-host peers.
Result<RegionInfo> Agent::addVramRegion(const std::string& name, std::unique_ptr<BackendMemory> memory, uint8_t access,
                                        uint32_t device, uint64_t length) {
  auto region = std::make_shared<LocalRegion>();
  region->memory = std::move(memory);
  const uint64_t base = reinterpret_cast<uint64_t>(region->memory->ptr);
  region->info = {nextRegionId_++, name, MemKind::Vram, access, device, base, length,
                  region->memory->allocated, {}, {}};
  auto ipc = cuda::exportIpc(static_cast<int>(device), base, region->info.length, region->memory->allocated);
  if (ipc.isOk()) region->info.sections.push_back({cuda::kIpcSection, std::move(ipc.value())});
  regions_[region->info.id] = region;
  if (region->memory->allocated) vramAllocations_.push_back(region);
  backend_->regionRegistered(region);
  ++generation_;
  return region->info;
}

Result<LocalRegionRef> Agent::regionRange(const char* what, uint32_t regionId, uint64_t offset, uint64_t length) const {
  if (closing_) return Status(Code::Closed, "agent is closed");
  auto it = regions_.find(regionId);
  if (it == regions_.end()) return Status(Code::NotFound, std::string(what) + ": region " + std::to_string(regionId) + " is not registered");
  const LocalRegionRef& r = it->second;
  if (offset > r->info.length || length > r->info.length - offset)
    return Status(Code::InvalidParam, std::string(what) + ": [" + std::to_string(offset) + ", +" + std::to_string(length) +
                                          ") lies outside region '" + r->info.name + "' (" + std::to_string(r->info.length) + " bytes)");
  return r;
}

Status Agent::writeRegion(uint32_t regionId, uint64_t offset, const uint8_t* src, uint64_t length) {
  auto r = regionRange("write", regionId, offset, length);
  if (!r.isOk()) return r.status();
  return memoryOps(r.value()->info.kind).write(*r.value(), offset, src, length);
}

Status Agent::readRegion(uint32_t regionId, uint64_t offset, uint8_t* dst, uint64_t length) {
  auto r = regionRange("read", regionId, offset, length);
  if (!r.isOk()) return r.status();
  return memoryOps(r.value()->info.kind).read(*r.value(), offset, dst, length);
}

Status Agent::deregister(uint32_t regionId) {
  auto it = regions_.find(regionId);
  if (it == regions_.end()) return {Code::NotFound, "region " + std::to_string(regionId) + " is not registered"};
  it->second->live = false;  // transfers that hold it finish first; then the memory goes
  backend_->regionDeregistered(it->second);  // peers that copy one-sidedly may hold it a while longer
  regions_.erase(it);
  ++generation_;
  return Status::ok();
}

LocalRegionRef Agent::regionRef(uint32_t regionId) const {
  auto it = regions_.find(regionId);
  return it == regions_.end() ? nullptr : it->second;
}

Result<std::vector<uint8_t>> Agent::metadata() const {
  if (closing_) return Status(Code::Closed, "agent is closed");
  AgentMetadata md;
  md.name = name_;
  md.agentId = agentId_;
  md.generation = generation_;
  md.backend = backend_->name();
  md.workerAddress = backend_->address();
  md.regions.reserve(regions_.size());
  for (auto& [id, r] : regions_) md.regions.push_back(r->info);
  return encodeMetadata(md);
}

PeerView Agent::viewOf(const PeerEntry& p) const {
  return {p.md.name, p.md.agentId, p.md.generation, p.md.regions};
}

Result<PeerView> Agent::loadPeer(const uint8_t* blob, size_t size) {
  if (closing_) return Status(Code::Closed, "agent is closed");
  auto decoded = decodeMetadata(blob, size);
  if (!decoded.isOk()) return decoded.status();
  AgentMetadata& md = decoded.value();
  auto it = peers_.find(md.name);
  if (it != peers_.end() && it->second->md.agentId == md.agentId) {
    PeerEntry& p = *it->second;
    if (md.generation < p.md.generation)
      return Status(Code::Mismatch, "metadata of peer '" + md.name + "' is stale (generation " +
                                        std::to_string(md.generation) + ", loaded " +
                                        std::to_string(p.md.generation) + ")");
    if (md.generation > p.md.generation) {
      if (md.workerAddress != p.md.workerAddress || p.failed) {
        // The same instance on a new UCX worker (it rebuilt its worker), or after its connection
        // failed: a new connection; what was in flight on the old one fails (it cannot complete there).
        auto conn = backend_->connect(md, p.key);
        if (!conn.isOk()) return conn.status();
        p.conn->markGone();  // closed without waiting on a worker that may never answer again
        failPeerTransfers(p.key, Status(Code::RemoteDisconnect, "peer '" + md.name + "' moved to a new UCX worker"));
        p.conn = std::move(conn.value());
        p.failed = false;
        p.failure = Status::ok();
      } else {
        Status st = p.conn->updateRegions(md);
        if (!st) return st;
      }
      p.md = std::move(md);
      indexRegions(p);
    }
    return viewOf(p);
  }
  if (it != peers_.end()) {
    // Same name, new instance (the peer restarted): the old connection and its transfers are gone.
    failPeerTransfers(it->second->key, Status(Code::RemoteDisconnect, "peer '" + md.name + "' was replaced by a new instance"));
    peers_.erase(it);
  }
  auto entry = std::make_unique<PeerEntry>();
  entry->key = nextPeerKey_++;
  auto conn = backend_->connect(md, entry->key);
  if (!conn.isOk()) return conn.status();
  entry->conn = std::move(conn.value());
  entry->md = std::move(md);
  indexRegions(*entry);
  PeerView view = viewOf(*entry);
  peers_[view.name] = std::move(entry);
  return view;
}

Status Agent::forgetPeer(const std::string& name) {
  auto it = peers_.find(name);
  if (it == peers_.end()) return {Code::NotFound, "unknown peer '" + name + "'"};
  failPeerTransfers(it->second->key, Status(Code::RemoteDisconnect, "peer '" + name + "' was forgotten"));
  peers_.erase(it);
  return Status::ok();
}

Result<uint64_t> Agent::post(const TransferRequest& rq) {
  const uint64_t t0 = monotonicNs();
  if (closing_) return Status(Code::Closed, "agent is closed");
  if (rq.hasNotify && rq.notify.size() > kMaxNotifyBytes)
    return Status(Code::InvalidParam, "notify: is " + std::to_string(rq.notify.size()) + " bytes; at most " + std::to_string(kMaxNotifyBytes));
  auto lit = regions_.find(rq.localRegion);
  if (lit == regions_.end())
    return Status(Code::NotFound, "local region " + std::to_string(rq.localRegion) + " is not registered (deregistered?)");
  const LocalRegionRef& local = lit->second;
  auto pit = peers_.find(rq.peer);
  if (pit == peers_.end()) return Status(Code::NotFound, "unknown peer '" + rq.peer + "' (load its metadata first)");
  PeerEntry& peer = *pit->second;
  if (peer.md.agentId != rq.peerAgentId)
    return Status(Code::Mismatch, "the remote descriptor list was built for an earlier instance of peer '" + rq.peer +
                                      "'; rebuild it from the reloaded peer");
  if (peer.failed) return failedPeerStatus(rq.peer, peer.failure);
  auto rit = peer.regionIndex.find(rq.remoteRegion);
  if (rit == peer.regionIndex.end())
    return Status(Code::NotFound, "peer '" + rq.peer + "' no longer publishes region " + std::to_string(rq.remoteRegion) +
                                      " (generation " + std::to_string(peer.md.generation) + ")");
  const RegionInfo& remote = peer.md.regions[rit->second];
  const uint8_t need = rq.op == Op::Write ? kAccessWrite : kAccessRead;
  if ((remote.access & need) == 0)
    return Status(Code::NotAllowed, std::string(rq.op == Op::Write ? "writing" : "reading") + " region '" + remote.name +
                                        "' of peer '" + rq.peer + "' is not allowed (exported '" +
                                        accessName(remote.access) + "')");
  // Descriptor lists carry offsets from their region's start.
  RegionBounds lb{0, local->info.length, "local", &local->info.name};
  RegionBounds rb{0, remote.length, "remote", &remote.name};
  auto segs = planSegments(rq.local, lb, local->ptr(), rq.remote, rb);
  if (!segs.isOk()) return segs.status();
  Status why;
  uint64_t bytes = 0;
  for (const Segment& s : segs.value()) bytes += s.length;
  Path path = peer.conn->choosePath(rq.remoteRegion, *local, rq.path, bytes, segs.value().size(), &why);
  if (!why) return why;

  auto t = std::make_shared<TransferState>();
  t->id = nextTransferId_++;
  t->op = rq.op;
  t->path = path;
  t->pathChosen = rq.path == Path::Auto;
  t->peerKey = peer.key;
  t->remoteRegionId = rq.remoteRegion;
  t->segments = std::move(segs.value());
  t->local = local;
  t->hasNotify = rq.hasNotify;
  t->notify = rq.notify;
  t->stats.descriptors = static_cast<uint32_t>(rq.local.count);
  t->stats.segments = static_cast<uint32_t>(t->segments.size());
  t->stats.path = path;
  for (size_t i = 0; i < rq.local.count; ++i) t->stats.bytes += rq.local.lengths[i];
  t->startNs = t0;
  transfers_[t->id] = t;
  Status st = backend_->post(*peer.conn, t);
  t->stats.postNs = monotonicNs() - t0;
  if (!st) {
    if (!t->settled) {
      transfers_.erase(t->id);
      t->settled = true;
    }
    t->ending = true;
    backend_->abandon(t, false);
    return st;
  }
  return t->id;
}

void Agent::transferFinished(const TransferRef& ref, Status status) {
  // `ref` may be the very entry erased below (cancel passes transfers_'s own): hold it first.
  // (AddressSanitizer found the use after free: npm run test:asan.)
  const TransferRef t = ref;
  if (t->settled) return;
  t->settled = true;
  t->stats.transferNs = monotonicNs() - t->startNs;
  if (t->stats.postNs == 0) t->stats.postNs = t->stats.transferNs;  // settled while posting
  transfers_.erase(t->id);
  if (callbacks_.settled) callbacks_.settled(t->id, status, t->stats);
}

bool Agent::cancel(uint64_t id, Code code, const std::string& why) {
  auto it = transfers_.find(id);
  if (it == transfers_.end() || it->second->ending) return false;
  const TransferRef t = it->second;
  endEarly(t, Status(code, why));
  return true;
}

void Agent::endEarly(const TransferRef& t, Status status, bool peerGone) {
  if (t->settled) return;
  if (t->ending) {
    // Already ending (canceled, say) and waiting for receives; now its peer is gone too.
    if (peerGone && backend_ && backend_->abandon(t, true)) transferFinished(t, t->endStatus);
    return;
  }
  t->ending = true;
  t->endStatus = std::move(status);
  if (!backend_ || backend_->abandon(t, peerGone)) transferFinished(t, t->endStatus);
}

Status Agent::notify(const std::string& peer, const std::string& message) {
  if (closing_) return {Code::Closed, "agent is closed"};
  if (message.size() > kMaxNotifyBytes)
    return {Code::InvalidParam, "message: is " + std::to_string(message.size()) + " bytes; at most " + std::to_string(kMaxNotifyBytes)};
  auto it = peers_.find(peer);
  if (it == peers_.end()) return backend_->notifyConnection(peer, message);
  if (it->second->failed) return failedPeerStatus(peer, it->second->failure);
  return backend_->notify(*it->second->conn, message);
}

void Agent::notificationArrived(const std::string& from, std::string message) {
  if (callbacks_.notification) callbacks_.notification(from, std::move(message));
}

// What a transfer to a failed peer settles with: its connection ended (ERR_REMOTE_DISCONNECT), or it
// never proved it holds this agent's secret (ERR_NOT_ALLOWED).
Status Agent::failedPeerStatus(const std::string& name, const Status& failure) {
  if (failure.code() == Code::RemoteDisconnect || failure.isOk())
    return Status(Code::RemoteDisconnect, "peer '" + name + "' is disconnected: " + failure.message());
  return Status(failure.code(), "peer '" + name + "': " + failure.message());
}

void Agent::indexRegions(PeerEntry& p) {
  p.regionIndex.clear();
  for (size_t i = 0; i < p.md.regions.size(); ++i) p.regionIndex[p.md.regions[i].id] = i;
}

void Agent::failPeerTransfers(uint64_t peerKey, const Status& status) {
  std::vector<TransferRef> doomed;
  for (auto& [id, t] : transfers_)
    if (t->peerKey == peerKey) doomed.push_back(t);
  for (auto& t : doomed) endEarly(t, status, true);
}

void Agent::peerFailed(uint64_t peerKey, Status status) {
  std::string lost;
  for (auto& [name, p] : peers_)
    if (p->key == peerKey) {
      p->failed = true;
      p->failure = status;
      lost = name;
      status = failedPeerStatus(name, status);
    }
  failPeerTransfers(peerKey, status);
  if (!lost.empty() && callbacks_.disconnected) callbacks_.disconnected(lost, status.message());
}

void Agent::workerRebuilt(const std::vector<std::string>& lost, const Status& why) {
  ++generation_;  // the metadata now carries the new address
  std::vector<TransferRef> all;
  for (auto& [id, t] : transfers_) all.push_back(t);
  for (auto& t : all) endEarly(t, why, true);  // nothing lands any more: the old worker is never progressed
  for (auto& [name, p] : peers_) {
    if (p->failed) continue;
    auto conn = backend_->connect(p->md, p->key);
    if (conn.isOk()) {
      p->conn = std::move(conn.value());
    } else {
      p->failed = true;
      p->failure = conn.status();
    }
  }
  if (callbacks_.disconnected)  // loaded peers among them were connected again above: not failed
    for (const auto& name : lost) callbacks_.disconnected(name, "this agent opened a new UCX worker");
  if (callbacks_.rebuilt) callbacks_.rebuilt(why.message());
}

void Agent::connectionLost(const std::string& name, uint64_t agentId, Status status) {
  auto it = peers_.find(name);
  if (it != peers_.end()) {
    PeerEntry& p = *it->second;
    // Without an instance we cannot tell whether this was the loaded peer: its own endpoint reports
    // its own failure (peerFailed). With one, a loaded peer of that instance fails now; a loaded
    // newer instance is left alone, but the old one's end is still reported.
    if (agentId == 0) return;
    if (p.md.agentId == agentId && !p.failed) {
      p.failed = true;
      p.failure = status;
      p.conn->markGone();
      failPeerTransfers(p.key, Status(Code::RemoteDisconnect, "peer '" + name + "' disconnected: " + status.message()));
    }
  }
  if (callbacks_.disconnected) callbacks_.disconnected(name, status.message());
}

Result<uint8_t*> Agent::resolveInbound(uint32_t regionId, uint64_t offset, uint64_t length, Access need,
                                       LocalRegionRef* hold, bool vram) {
  auto it = regions_.find(regionId);
  if (it == regions_.end())
    return Status(Code::NotFound, "region " + std::to_string(regionId) + " is not registered at '" + name_ + "'");
  const LocalRegionRef& r = it->second;
  // A caller that copies with host instructions (or hands the pointer to UCX as host memory) must
  // never get a device address.
  if (r->info.kind != MemKind::Dram && !vram)
    return Status(Code::NotAllowed, "region '" + r->info.name + "' at '" + name_ + "' is VRAM: peers reach it by path "
                                        "'cuda_ipc' (same host) or 'am'; other paths move host memory only");
  if ((r->info.access & need) == 0)
    return Status(Code::NotAllowed, "region '" + r->info.name + "' at '" + name_ + "' is exported '" +
                                        accessName(r->info.access) + "'");
  if (length == 0 || offset > r->info.length || length > r->info.length - offset)
    return Status(Code::InvalidParam, "range [" + std::to_string(offset) + ", +" + std::to_string(length) +
                                          ") lies outside region '" + r->info.name + "' (" +
                                          std::to_string(r->info.length) + " bytes)");
  *hold = r;
  return r->ptr() + offset;
}

int Agent::eventFd() const { return backend_ ? backend_->eventFd() : -1; }
bool Agent::progress() { return backend_ ? backend_->progress() : false; }
bool Agent::arm() { return backend_ ? backend_->arm() : true; }
bool Agent::busy() const { return !transfers_.empty() || (backend_ && backend_->busy()); }

}  // namespace kvwire
