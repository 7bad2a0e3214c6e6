// node-addon-api glue only: argument conversion, buffer pinning, progress on the libuv loop,
// and batched delivery of completions and notifications to JS.
#include <napi.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <uv.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "../backends/ucx/ucx_backend.h"
#include "../core/agent.h"
#include "../core/backend_registry.h"
#include "../cuda/driver.h"
#include "../cuda/vram.h"

namespace {

using kvwire::Code;
using kvwire::Status;

struct AddonData {
  Napi::FunctionReference errorClass;  // KvwireError(code, message, index)
};

// Builds a KvwireError(code, message, index); returns an empty value if JS cannot run right now.
Napi::Value makeError(Napi::Env env, Code code, const std::string& message, int64_t index = kvwire::kNoIndex) {
  auto* data = env.GetInstanceData<AddonData>();
  napi_value argv[3] = {nullptr, nullptr, nullptr};
  napi_status st = napi_create_string_utf8(env, kvwire::codeName(code), NAPI_AUTO_LENGTH, &argv[0]);
  if (st == napi_ok) st = napi_create_string_utf8(env, message.data(), message.size(), &argv[1]);
  if (st == napi_ok)
    st = index == kvwire::kNoIndex ? napi_get_undefined(env, &argv[2])
                                   : napi_create_double(env, static_cast<double>(index), &argv[2]);
  napi_value error = nullptr;
  if (st == napi_ok && data && !data->errorClass.IsEmpty())
    st = napi_new_instance(env, data->errorClass.Value(), 3, argv, &error);
  else if (st == napi_ok)
    st = napi_create_error(env, argv[0], argv[1], &error);
  return st == napi_ok ? Napi::Value(env, error) : Napi::Value();
}

void throwStatus(Napi::Env env, const Status& st) {
  Napi::Value error = makeError(env, st.code(), st.message(), st.index());
  if (!error.IsEmpty()) napi_throw(env, error);
}

void throwInvalid(Napi::Env env, const std::string& message) { throwStatus(env, Status(Code::InvalidParam, message)); }

// Reads a Float64Array of byte offsets or lengths into `out` in one pass. Every value must be a
// non-negative integer below 2^53; the first that is not is reported with its index.
bool readOffsets(Napi::Env env, const Napi::Value& v, const char* what, std::vector<uint64_t>* out) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    throwInvalid(env, std::string("post: ") + what + " must be a Float64Array");
    return false;
  }
  auto arr = v.As<Napi::Float64Array>();
  const double* d = arr.Data();
  const size_t n = arr.ElementLength();
  out->resize(n);
  for (size_t i = 0; i < n; ++i) {
    const double x = d[i];
    if (!(x >= 0 && x <= 9007199254740992.0) || x != static_cast<double>(static_cast<uint64_t>(x))) {
      throwStatus(env, Status(Code::InvalidParam, std::string(what) + " " + std::to_string(i) +
                                                      " is not a non-negative integer", static_cast<int64_t>(i)));
      return false;
    }
    (*out)[i] = static_cast<uint64_t>(x);
  }
  return true;
}

// The libuv handles of one agent live in one heap block that is freed by the last close callback,
// so they never outlive or dangle from the JS object that owns the agent.
struct LoopHandles {
  uv_poll_t* poll = nullptr;  // replaced when the agent's event fd changes (a rebuilt UCX worker)
  int polledFd = -1;
  uint64_t polledRebuilds = 0;  // a rebuilt worker's fd may reuse the old number: compare both
  uv_idle_t idle;
  uv_timer_t timer;
  uv_async_t async;  // the progress thread's "results are waiting" (uv_async_send is thread-safe)
  int open = 0;
  napi_async_cleanup_hook_handle cleanupHook = nullptr;
};

// References to registered Buffers are N-API objects: only the JS thread may delete them. A region
// whose last holder lets go on the progress thread (a held region released, a transfer ended) hands
// its reference here, and the JS thread deletes it on its next step.
struct JsReleases {
  const std::thread::id js = std::this_thread::get_id();
  std::mutex mutex;
  std::vector<std::unique_ptr<Napi::ObjectReference>> refs;
  void release(std::unique_ptr<Napi::ObjectReference> ref) {
    if (std::this_thread::get_id() == js) return;  // deleted here, now
    std::lock_guard<std::mutex> lock(mutex);
    refs.push_back(std::move(ref));
  }
  bool pending() {
    std::lock_guard<std::mutex> lock(mutex);
    return !refs.empty();
  }
  void drain() {
    std::vector<std::unique_ptr<Napi::ObjectReference>> now;  // deleted after the lock is let go
    std::lock_guard<std::mutex> lock(mutex);
    now.swap(refs);
  }
};

// What allocate()'s Uint8Array keeps alive: its region, released under the agent lock (the view's
// finalizer runs whenever the GC decides, possibly while the progress thread is inside the agent).
struct ViewKeep {
  std::shared_ptr<void> region;
  std::shared_ptr<std::recursive_mutex> lock;
};

class AgentWrap : public Napi::ObjectWrap<AgentWrap> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit AgentWrap(const Napi::CallbackInfo& info);
  ~AgentWrap() override { shutdown(); }

 private:
  struct Settled {
    uint64_t seq;  // the order results happened in, across both kinds
    uint64_t id;
    Status status;
    kvwire::TransferStats stats;
  };
  struct Arrived {
    uint64_t seq;
    std::string from;
    std::string message;    // a notification's bytes, or why the connection ended
    bool disconnect = false;
  };
  // Whether settled[i] comes before arrived[j] in the order results happened (either may be past
  // its end, not both).
  static bool settledFirst(const std::vector<Settled>& settled, size_t i, const std::vector<Arrived>& arrived, size_t j) {
    return j == arrived.size() || (i < settled.size() && settled[i].seq < arrived[j].seq);
  }

  Napi::Value Allocate(const Napi::CallbackInfo& info);
  Napi::Value Register(const Napi::CallbackInfo& info);
  Napi::Value Deregister(const Napi::CallbackInfo& info);
  Napi::Value AllocateVram(const Napi::CallbackInfo& info);
  Napi::Value RegisterVram(const Napi::CallbackInfo& info);
  Napi::Value WriteRegion(const Napi::CallbackInfo& info);
  Napi::Value ReadRegion(const Napi::CallbackInfo& info);
  Napi::Value Metadata(const Napi::CallbackInfo& info);
  Napi::Value LoadPeer(const Napi::CallbackInfo& info);
  Napi::Value ForgetPeer(const Napi::CallbackInfo& info);
  Napi::Value Post(const Napi::CallbackInfo& info);
  Napi::Value Cancel(const Napi::CallbackInfo& info);
  Napi::Value Notify(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  Napi::Value SetRef(const Napi::CallbackInfo& info);
  Napi::Value SecurityCounters(const Napi::CallbackInfo& info);
  Napi::Value Connections(const Napi::CallbackInfo& info);
  Napi::Value RebuildTransport(const Napi::CallbackInfo& info);

  bool ensureOpen(Napi::Env env);
  Napi::Object regionObject(Napi::Env env, const kvwire::RegionInfo& r);
  // A new region for JS (progress scheduled: peers may now reach it), or the error thrown.
  Napi::Value newRegion(Napi::Env env, const kvwire::Result<kvwire::RegionInfo>& r);
  void startLoop(uv_loop_t* loop);
  void pollEventFd();
  void schedule();  // progress soon, on the loop, never re-entrantly inside a JS call
  void drive();
  // Hands waiting results to JS (a bounded batch, in order); true if more wait for a later turn.
  bool deliver();
  void updateRefs();
  void shutdown();
  void finishClose();
  // Results waiting for JS that the progress thread must not add to (bounded memory; UCX queues
  // and flow control hold the rest back meanwhile).
  bool backlogFull() const {
    return arrivedBytes_ >= kMaxArrivedBytes / 2 || arrived_.size() >= kMaxWaiting || settled_.size() >= kMaxWaiting;
  }
  static constexpr size_t kMaxWaiting = 65536;
  static constexpr size_t kMaxDeliver = 4096;  // results handed to JS in one turn of the loop
  uint64_t eventSeq_ = 0;
  uint64_t droppedArrivals_ = 0;  // notifications over kMaxArrivedBytes waiting for JS
  void startHelper();
  void stopHelper();
  void helperMain();
  void helperSleep(uint64_t ns) const;
  static void onAsyncCleanup(napi_async_cleanup_hook_handle handle, void* arg);

  // Every call into agent_ holds this lock: the JS thread's calls and progress steps, and the
  // progress thread's (below). Recursive, so a GC finalizer that runs inside a locked call can
  // take it again. Shared with allocate()'s views, which can outlive this wrapper.
  std::shared_ptr<std::recursive_mutex> lock_ = std::make_shared<std::recursive_mutex>();
  std::shared_ptr<JsReleases> releases_ = std::make_shared<JsReleases>();
  // The progress thread: it sleeps on the agent's event fd too and steps in only when the JS
  // thread has not progressed the agent for graceNs_ after an event (a JS thread busy with the
  // application, or descheduled), so UCX's protocols (rendezvous, acknowledgements, incoming
  // requests) go on while JS is late; results still reach JS only on its own thread.
  bool helperEnabled_ = true;
  uint64_t graceNs_ = 1'000'000;
  std::thread helper_;
  int wakeFd_ = -1;
  std::atomic<bool> stopHelper_{false};
  std::atomic<uint64_t> jsSteps_{0};
  std::atomic<uint64_t> lastJsStepNs_{0};  // when the JS thread last progressed the agent
  std::atomic<uint64_t> helperSteps_{0};  // progress steps the thread took (health.progressThreadSteps)

  std::unique_ptr<kvwire::Agent> agent_;
  LoopHandles* handles_ = nullptr;
  Napi::FunctionReference onSettled_;
  Napi::FunctionReference onNotification_;
  std::vector<Settled> settled_;
  std::vector<Arrived> arrived_;
  size_t arrivedBytes_ = 0;
  static constexpr size_t kMaxArrivedBytes = 256u << 20;
  bool pollMode_ = false;
  bool userRef_ = true;
  bool delivering_ = false;
  std::unique_ptr<Napi::Promise::Deferred> closeDeferred_;
  uint64_t closeDeadlineNs_ = 0;
  static constexpr uint64_t kCloseGraceNs = 2'000'000'000;
  uint64_t spinWindowNs_ = 200'000;  // keep polling this long after activity before sleeping
  uint64_t lastActivityNs_ = 0;
};

Napi::Function AgentWrap::Init(Napi::Env env) {
  return DefineClass(env, "NativeAgent",
                     {InstanceMethod("allocate", &AgentWrap::Allocate), InstanceMethod("register", &AgentWrap::Register),
                      InstanceMethod("deregister", &AgentWrap::Deregister),
                      InstanceMethod("allocateVram", &AgentWrap::AllocateVram),
                      InstanceMethod("registerVram", &AgentWrap::RegisterVram),
                      InstanceMethod("writeRegion", &AgentWrap::WriteRegion),
                      InstanceMethod("readRegion", &AgentWrap::ReadRegion),
                      InstanceMethod("metadata", &AgentWrap::Metadata), InstanceMethod("loadPeer", &AgentWrap::LoadPeer),
                      InstanceMethod("forgetPeer", &AgentWrap::ForgetPeer), InstanceMethod("post", &AgentWrap::Post),
                      InstanceMethod("cancel", &AgentWrap::Cancel), InstanceMethod("notify", &AgentWrap::Notify),
                      InstanceMethod("close", &AgentWrap::Close), InstanceMethod("setRef", &AgentWrap::SetRef),
                      InstanceMethod("securityCounters", &AgentWrap::SecurityCounters),
                      InstanceMethod("connections", &AgentWrap::Connections),
                      InstanceMethod("rebuildTransport", &AgentWrap::RebuildTransport)});
}

// new NativeAgent(name, { transports, devices, secret, progress, spinWindowUs }, onSettled, onNotification)
AgentWrap::AgentWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<AgentWrap>(info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsString() || !info[1].IsObject() || !info[2].IsFunction() || !info[3].IsFunction()) {
    throwInvalid(env, "NativeAgent(name, options, onSettled, onNotification)");
    return;
  }
  auto opts = info[1].As<Napi::Object>();
  kvwire::BackendOptions bo;
  if (opts.Get("transports").IsString()) bo.transports = opts.Get("transports").As<Napi::String>();
  if (opts.Get("devices").IsString()) bo.devices = opts.Get("devices").As<Napi::String>();
  if (opts.Get("cma").IsBoolean()) bo.cma = opts.Get("cma").As<Napi::Boolean>().Value();
  if (opts.Get("secret").IsBuffer()) {
    auto secret = opts.Get("secret").As<Napi::Buffer<uint8_t>>();
    bo.secret.assign(reinterpret_cast<const char*>(secret.Data()), secret.Length());
  }
  pollMode_ = opts.Get("progress").IsString() && opts.Get("progress").As<Napi::String>().Utf8Value() == "poll";
  if (opts.Get("spinWindowUs").IsNumber())
    spinWindowNs_ = static_cast<uint64_t>(opts.Get("spinWindowUs").As<Napi::Number>().DoubleValue() * 1000);
  if (opts.Get("progressThread").IsBoolean()) helperEnabled_ = opts.Get("progressThread").As<Napi::Boolean>().Value();
  if (opts.Get("progressGraceUs").IsNumber())
    graceNs_ = static_cast<uint64_t>(opts.Get("progressGraceUs").As<Napi::Number>().DoubleValue() * 1000);
  onSettled_ = Napi::Persistent(info[2].As<Napi::Function>());
  onNotification_ = Napi::Persistent(info[3].As<Napi::Function>());

  kvwire::AgentCallbacks cb;
  cb.settled = [this](uint64_t id, const Status& st, const kvwire::TransferStats& stats) {
    settled_.push_back({eventSeq_++, id, st, stats});
  };
  cb.notification = [this](const std::string& from, std::string message) {
    // Handed to JS after each progress step; bounded in case one step brings a flood.
    if (arrivedBytes_ + message.size() > kMaxArrivedBytes) {
      ++droppedArrivals_;  // counted in agent.droppedNotifications
      return;
    }
    arrivedBytes_ += message.size();
    arrived_.push_back({eventSeq_++, from, std::move(message), false});
  };
  cb.disconnected = [this](const std::string& peer, const std::string& reason) {
    arrived_.push_back({eventSeq_++, peer, reason, true});
  };
  cb.rebuilt = [this](const std::string& reason) {
    arrived_.push_back({eventSeq_++, std::string(), reason, true});  // no peer: the agent itself (names are never empty)
  };
  auto agent = kvwire::Agent::create(info[0].As<Napi::String>(), bo, std::move(cb));
  if (!agent.isOk()) {
    throwStatus(env, agent.status());
    return;
  }
  agent_ = std::move(agent.value());
  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr) {
    agent_.reset();
    throwStatus(env, Status(Code::Unavailable, "no libuv loop for this environment"));
    return;
  }
  startLoop(loop);
}

void AgentWrap::startLoop(uv_loop_t* loop) {
  handles_ = new LoopHandles();  // freed by the last uv_close callback of idle, timer and async
  handles_->idle.data = handles_->timer.data = handles_->async.data = this;
  uv_idle_init(loop, &handles_->idle);
  uv_timer_init(loop, &handles_->timer);
  uv_async_init(loop, &handles_->async, [](uv_async_t* h) { static_cast<AgentWrap*>(h->data)->drive(); });
  uv_unref(reinterpret_cast<uv_handle_t*>(&handles_->async));  // the other handles decide what keeps the loop alive
  handles_->open = 3;
  pollEventFd();
  napi_add_async_cleanup_hook(Env(), &AgentWrap::onAsyncCleanup, this, &handles_->cleanupHook);
  lastActivityNs_ = kvwire::monotonicNs();
  if (helperEnabled_) startHelper();
  schedule();
}

void AgentWrap::startHelper() {
  wakeFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wakeFd_ < 0) return;  // progress stays on the JS thread alone
  stopHelper_ = false;
  try {
    helper_ = std::thread([this] { helperMain(); });
  } catch (const std::system_error&) {
    close(wakeFd_);
    wakeFd_ = -1;
  }
}

// Called on the JS thread without the agent lock (the thread may be waiting for it).
void AgentWrap::stopHelper() {
  if (!helper_.joinable()) return;
  stopHelper_ = true;
  const uint64_t one = 1;
  if (write(wakeFd_, &one, sizeof one) < 0) {
  }  // the thread also looks at the flag between waits
  helper_.join();
  close(wakeFd_);
  wakeFd_ = -1;
}

// The progress thread. While the JS thread is stepping it only looks every grace period (no wake
// per event). Once JS has not stepped for a grace (idle, or late), it waits on the agent's event fd
// (and, while work is in flight, wakes every 10 ms as a watchdog); after an event it gives JS
// graceNs_ to take it; if JS has not stepped by then, this thread progresses the agent itself, and
// keeps doing so without the grace until JS steps again. It never calls JS: what settles waits in
// settled_/arrived_ and the JS thread is woken with uv_async_send. Idle (nothing in flight, fd
// armed), it sleeps.
void AgentWrap::helperMain() {
  kvwire::onNativeProgressThread = true;
  const int ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) return;
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = wakeFd_;  // written once, by stopHelper, and never drained: every wait ends from then on
  epoll_ctl(ep, EPOLL_CTL_ADD, wakeFd_, &ev);
  const auto stopped = [this] { return stopHelper_.load(std::memory_order_acquire); };
  int watched = -1;
  uint64_t watchedRebuilds = 0;  // a rebuilt worker's fd may reuse the old number
  bool inCharge = false;         // this thread took an event JS left, and JS has not stepped since
  uint64_t jsMark = 0;           // jsSteps_ when this thread last progressed
  uint64_t lookNs = graceNs_;    // how long it sleeps while JS keeps stepping (backs off to 8 graces)
  while (!stopped()) {
    if (inCharge && jsSteps_.load(std::memory_order_acquire) != jsMark) inCharge = false;  // JS is back
    // While the JS thread is stepping (a burst, spinning, a stream of events) this thread does not
    // wait on the fd (it would wake with every event, on the same cores): it looks again a while
    // after JS's last step — a grace at first, backing off to 8 graces while JS keeps stepping, so
    // a JS thread that spins (poll mode, the spin window) is interrupted at most ~125 times a second.
    const uint64_t jsAgo = kvwire::monotonicNs() - lastJsStepNs_.load(std::memory_order_acquire);
    if (!inCharge && jsAgo < graceNs_) {
      helperSleep(lookNs - std::min(jsAgo, lookNs / 2) + 1000);
      lookNs = std::min(lookNs * 2, 8 * graceNs_);
      continue;
    }
    lookNs = graceNs_;
    int fd = -1;
    uint64_t rebuilds = 0;
    bool busy = false, polling = false;
    {
      std::lock_guard<std::recursive_mutex> guard(*lock_);
      if (!agent_) break;
      fd = agent_->eventFd();
      rebuilds = agent_->rebuilds();
      busy = agent_->busy();
      polling = agent_->needsPolling();
    }
    if (fd != watched || rebuilds != watchedRebuilds) {
      if (watched >= 0) epoll_ctl(ep, EPOLL_CTL_DEL, watched, nullptr);  // fails harmlessly once closed
      watched = -1;
      watchedRebuilds = rebuilds;
      ev.data.fd = fd;
      if (fd >= 0 && epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0) watched = fd;
    }
    // JS is idle or late: wait for an event (and, while work is in flight, wake as a watchdog).
    const uint64_t seen = jsSteps_.load(std::memory_order_acquire);
    epoll_event got[2];
    const int timeoutMs = polling ? 1 : busy ? 10 : watched < 0 ? 50 : -1;
    const int n = epoll_wait(ep, got, 2, timeoutMs);
    if (stopped()) break;
    if (n <= 0 && !busy && !polling) continue;
    if (!inCharge) {
      // The JS thread normally takes the event at once: step in only if it has not within the grace.
      helperSleep(graceNs_);
      if (jsSteps_.load(std::memory_order_acquire) != seen || stopped()) continue;
    }
    std::unique_lock<std::recursive_mutex> guard(*lock_);
    if (!agent_ || stopped()) break;
    if (!inCharge && jsSteps_.load(std::memory_order_acquire) != seen) continue;
    if (backlogFull()) {
      // What waits for JS is bounded: leave the rest in UCX (its queues hold peers back) until JS
      // has taken the backlog.
      guard.unlock();
      helperSleep(graceNs_);
      continue;
    }
    bool any = false;
    for (int round = 0; round < 64 && !backlogFull() && agent_->progress(); ++round) any = true;
    helperSteps_.fetch_add(1, std::memory_order_relaxed);
    // JS left an event untaken for the grace: this thread keeps the agent (no grace) until JS steps
    // again. A watchdog step (no event: JS may simply be asleep with nothing to do) does not count.
    if (n > 0) inCharge = true;
    jsMark = jsSteps_.load(std::memory_order_acquire);
    if ((any || !settled_.empty() || !arrived_.empty() || agent_->closed() || releases_->pending()) && handles_)
      uv_async_send(&handles_->async);
    // Events pending: the fd stays readable and the loop comes back at once; but where nothing
    // moved (e.g. only the JS thread can do what is next), not at once.
    const bool armed = !agent_->needsPolling() && agent_->arm();
    guard.unlock();
    if (!any && !armed) helperSleep(graceNs_);
  }
  close(ep);
}

// Sleeps for ns, or until stopHelper is called.
void AgentWrap::helperSleep(uint64_t ns) const {
  pollfd p{wakeFd_, POLLIN, 0};
  const timespec ts{static_cast<time_t>(ns / 1'000'000'000ull), static_cast<long>(ns % 1'000'000'000ull)};
  ppoll(&p, 1, &ts, nullptr);
}

// Sleeps on the agent's event fd; called again when it changed (the old poll handle is closed).
void AgentWrap::pollEventFd() {
  const int fd = agent_->eventFd();
  const uint64_t rebuilds = agent_->rebuilds();
  if (!handles_ || (fd == handles_->polledFd && rebuilds == handles_->polledRebuilds)) return;
  uv_loop_t* loop = uv_handle_get_loop(reinterpret_cast<uv_handle_t*>(&handles_->idle));
  if (handles_->poll) {
    uv_close(reinterpret_cast<uv_handle_t*>(handles_->poll), [](uv_handle_t* h) { delete reinterpret_cast<uv_poll_t*>(h); });
    handles_->poll = nullptr;
  }
  handles_->polledFd = fd;
  handles_->polledRebuilds = rebuilds;
  auto* poll = new uv_poll_t;
  if (uv_poll_init(loop, poll, fd) != 0) {
    // E.g. the closing handle still holds the same fd number until the loop turns: try again on the
    // next step (meanwhile the idle handle, the watchdog timer and the progress thread keep it going).
    delete poll;
    handles_->polledFd = -1;
    return;
  }
  poll->data = this;
  handles_->poll = poll;
  uv_poll_start(poll, UV_READABLE, [](uv_poll_t* h, int, int) { static_cast<AgentWrap*>(h->data)->drive(); });
}

void AgentWrap::schedule() {
  if (!handles_) return;
  lastActivityNs_ = kvwire::monotonicNs();
  if (!uv_is_active(reinterpret_cast<uv_handle_t*>(&handles_->idle)))
    uv_idle_start(&handles_->idle, [](uv_idle_t* h) { static_cast<AgentWrap*>(h->data)->drive(); });
  updateRefs();
}

// One progress step: run UCX until it is idle, hand results to JS, then either keep spinning
// (poll mode, or within the spin window after activity) or arm the event fd and sleep.
void AgentWrap::drive() {
  if (!agent_ || !handles_) return;
  releases_->drain();
  std::unique_lock<std::recursive_mutex> guard(*lock_);
  jsSteps_.fetch_add(1, std::memory_order_release);
  lastJsStepNs_.store(kvwire::monotonicNs(), std::memory_order_release);
  // Results already waiting for JS (the progress thread's, or a flood) are handed over first.
  const bool any = !backlogFull() && agent_->progress();
  if (!agent_->closed()) pollEventFd();  // the agent may have opened a new UCX worker
  const uint64_t now = kvwire::monotonicNs();
  if (any) lastActivityNs_ = now;
  guard.unlock();  // JS callbacks run without it, so the progress thread is never kept waiting on JS
  const bool more = deliver();
  if (!agent_ || !handles_) return;  // closed from a JS callback
  guard.lock();
  if (agent_->closed() && (agent_->drained() || now > closeDeadlineNs_)) {
    guard.unlock();
    stopHelper();
    while (agent_ && deliver()) {
    }  // what arrived while closing, before it goes
    if (agent_) finishClose();
    return;
  }
  // GPU copies signal no fd: while any is in flight the loop polls their events. Results left
  // for the next turn come round again.
  bool spin = more || pollMode_ || now - lastActivityNs_ < spinWindowNs_ || agent_->needsPolling();
  if (!spin && !agent_->arm()) {  // events arrived while we were deciding: go round again
    lastActivityNs_ = now;
    spin = true;
  }
  if (spin) {
    if (!uv_is_active(reinterpret_cast<uv_handle_t*>(&handles_->idle)))
      uv_idle_start(&handles_->idle, [](uv_idle_t* h) { static_cast<AgentWrap*>(h->data)->drive(); });
  } else {
    uv_idle_stop(&handles_->idle);
  }
  // While work is in flight, a slow watchdog guards against a wake-up UCX did not signal.
  if (!spin && agent_->busy())
    uv_timer_start(&handles_->timer, [](uv_timer_t* h) { static_cast<AgentWrap*>(h->data)->drive(); }, 50, 0);
  else
    uv_timer_stop(&handles_->timer);
  updateRefs();
}

// The loop stays alive while transfers are in flight, and while the agent is ref'd (the default,
// like a server socket); an unref'd idle agent does not hold the process open.
void AgentWrap::updateRefs() {
  if (!handles_) return;
  const bool inFlight = agent_ && (agent_->inFlight() > 0 || agent_->closed());
  auto set = [](uv_handle_t* h, bool on) { on ? uv_ref(h) : uv_unref(h); };
  set(reinterpret_cast<uv_handle_t*>(&handles_->idle), inFlight || (userRef_ && pollMode_));
  set(reinterpret_cast<uv_handle_t*>(&handles_->timer), inFlight);
  if (handles_->poll) set(reinterpret_cast<uv_handle_t*>(handles_->poll), userRef_ || inFlight);
}

// Hands settled transfers and notifications to JS in batches. Plain N-API calls with every status
// checked: while a worker_thread is being terminated JS cannot run, and node-addon-api would turn
// such a failure into a fatal error; here the batch is simply dropped (the thread is going away).
bool AgentWrap::deliver() {
  if (delivering_) return false;
  std::vector<Settled> settled;
  std::vector<Arrived> arrived;
  {
    // Taken under the agent lock (the progress thread adds to them), handed to JS without it: the
    // oldest, at most kMaxDeliver per turn of the loop (the rest on the next turn, so timers and I/O
    // run in between however fast results come), in the order they happened.
    std::lock_guard<std::recursive_mutex> guard(*lock_);
    size_t s = 0, a = 0;
    while (s + a < kMaxDeliver && (s < settled_.size() || a < arrived_.size())) {
      if (settledFirst(settled_, s, arrived_, a))
        ++s;
      else
        ++a;
    }
    settled.assign(std::make_move_iterator(settled_.begin()), std::make_move_iterator(settled_.begin() + s));
    settled_.erase(settled_.begin(), settled_.begin() + s);
    arrived.assign(std::make_move_iterator(arrived_.begin()), std::make_move_iterator(arrived_.begin() + a));
    arrived_.erase(arrived_.begin(), arrived_.begin() + a);
    for (const Arrived& x : arrived)
      if (!x.disconnect) arrivedBytes_ -= x.message.size();
  }
  const auto remaining = [this] {
    std::lock_guard<std::recursive_mutex> guard(*lock_);
    return !settled_.empty() || !arrived_.empty();
  };
  if (settled.empty() && arrived.empty()) return remaining();
  delivering_ = true;
  napi_env env = Env();
  napi_handle_scope scope = nullptr;
  if (napi_open_handle_scope(env, &scope) != napi_ok) {
    delivering_ = false;
    return remaining();
  }
  napi_value self = Value();
  bool ok = true;
  auto call = [&](Napi::FunctionReference& fn, napi_value a, napi_value b) {
    napi_value argv[2] = {a, b}, result = nullptr;
    napi_async_context context = nullptr;
    napi_value resourceName = nullptr;
    ok = ok && napi_create_string_utf8(env, "kvwire", NAPI_AUTO_LENGTH, &resourceName) == napi_ok &&
         napi_async_init(env, nullptr, resourceName, &context) == napi_ok;
    if (!ok) return;
    napi_status st = napi_make_callback(env, context, self, fn.Value(), 2, argv, &result);
    napi_async_destroy(env, context);
    if (st == napi_pending_exception) {
      napi_value ignored;
      napi_get_and_clear_last_exception(env, &ignored);  // the JS side already reported it
    } else if (st != napi_ok) {
      ok = false;
    }
  };
  // One call per run of settled transfers [from, to).
  auto deliverSettled = [&](size_t from, size_t to) {
    const size_t count = to - from;
    // One row per transfer: [id, code, index, bytes, descriptors, segments, path, postNs, transferNs].
    constexpr size_t kStride = 9;
    napi_value buffer = nullptr, rows = nullptr, errors = nullptr;
    void* raw = nullptr;
    ok = napi_create_arraybuffer(env, count * kStride * sizeof(double), &raw, &buffer) == napi_ok &&
         napi_create_typedarray(env, napi_float64_array, count * kStride, buffer, 0, &rows) == napi_ok &&
         napi_create_array_with_length(env, count, &errors) == napi_ok;
    if (!ok) return;
    auto* data = static_cast<double*>(raw);
    for (size_t i = 0; i < count && ok; ++i) {
      const Settled& s = settled[from + i];
      double* row = data + i * kStride;
      row[0] = static_cast<double>(s.id);
      row[1] = static_cast<double>(static_cast<int>(s.status.code()));
      row[2] = static_cast<double>(s.status.index());
      row[3] = static_cast<double>(s.stats.bytes);
      row[4] = s.stats.descriptors;
      row[5] = s.stats.segments;
      row[6] = static_cast<double>(static_cast<int>(s.stats.path));
      row[7] = static_cast<double>(s.stats.postNs);
      row[8] = static_cast<double>(s.stats.transferNs);
      napi_value err = nullptr;
      if (s.status.isOk())
        ok = napi_get_null(env, &err) == napi_ok;
      else
        err = makeError(Env(), s.status.code(), s.status.message(), s.status.index());
      ok = ok && err != nullptr && napi_set_element(env, errors, static_cast<uint32_t>(i), err) == napi_ok;
    }
    if (ok) call(onSettled_, rows, errors);
  };
  // One call per run of notifications and disconnects [from, to).
  auto deliverArrived = [&](size_t from, size_t to) {
    napi_value names = nullptr, messages = nullptr;
    ok = napi_create_array_with_length(env, to - from, &names) == napi_ok &&
         napi_create_array_with_length(env, to - from, &messages) == napi_ok;
    for (size_t i = from; i < to && ok; ++i) {
      napi_value name = nullptr, message = nullptr;
      void* copy = nullptr;
      // A disconnect travels as a string (its reason), a notification as a Buffer.
      ok = napi_create_string_utf8(env, arrived[i].from.data(), arrived[i].from.size(), &name) == napi_ok &&
           (arrived[i].disconnect
                ? napi_create_string_utf8(env, arrived[i].message.data(), arrived[i].message.size(), &message) == napi_ok
                : napi_create_buffer_copy(env, arrived[i].message.size(), arrived[i].message.data(), &copy, &message) == napi_ok) &&
           napi_set_element(env, names, static_cast<uint32_t>(i - from), name) == napi_ok &&
           napi_set_element(env, messages, static_cast<uint32_t>(i - from), message) == napi_ok;
    }
    if (ok) call(onNotification_, names, messages);
  };
  // In the order they happened: a run of one kind at a time.
  for (size_t s = 0, a = 0; ok && (s < settled.size() || a < arrived.size());) {
    if (settledFirst(settled, s, arrived, a)) {
      size_t to = s;
      while (to < settled.size() && settledFirst(settled, to, arrived, a)) ++to;
      deliverSettled(s, to);
      s = to;
    } else {
      size_t to = a;
      while (to < arrived.size() && !settledFirst(settled, s, arrived, to)) ++to;
      deliverArrived(a, to);
      a = to;
    }
  }
  napi_close_handle_scope(env, scope);
  delivering_ = false;
  return remaining();  // including what JS callbacks settled meanwhile
}

bool AgentWrap::ensureOpen(Napi::Env env) {
  if (agent_) return true;
  throwStatus(env, Status(Code::Closed, "agent is closed"));
  return false;
}

Napi::Object AgentWrap::regionObject(Napi::Env env, const kvwire::RegionInfo& r) {
  auto o = Napi::Object::New(env);
  o.Set("id", r.id);
  o.Set("name", r.name);
  o.Set("kind", kvwire::memKindName(r.kind));
  o.Set("access", r.access == kvwire::kAccessRead ? "read" : r.access == kvwire::kAccessWrite ? "write" : "readwrite");
  o.Set("deviceId", r.deviceId);
  o.Set("base", Napi::BigInt::New(env, r.base));
  o.Set("length", static_cast<double>(r.length));
  o.Set("allocated", r.backendAllocated);
  o.Set("exported", r.kind == kvwire::MemKind::Dram || r.section(kvwire::cuda::kIpcSection) != nullptr);
  return o;
}

uint8_t accessFrom(const Napi::Value& v) {
  std::string s = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
  return s == "read" ? kvwire::kAccessRead : s == "write" ? kvwire::kAccessWrite : kvwire::kAccessReadWrite;
}

Napi::Value AgentWrap::newRegion(Napi::Env env, const kvwire::Result<kvwire::RegionInfo>& r) {
  if (!r.isOk()) {
    throwStatus(env, r.status());
    return env.Undefined();
  }
  schedule();
  return regionObject(env, r.value());
}

// allocate(name, bytes, access) -> { region, bytes: Uint8Array over the allocated memory }
Napi::Value AgentWrap::Allocate(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  if (!ensureOpen(env)) return env.Undefined();
  auto r = agent_->allocate(info[0].As<Napi::String>(), static_cast<uint64_t>(info[1].As<Napi::Number>().DoubleValue()),
                            accessFrom(info[2]));
  if (!r.isOk()) {
    throwStatus(env, r.status());
    return env.Undefined();
  }
  const kvwire::RegionInfo& ri = r.value();
  // The JS view keeps the mapping alive: deregistering while a view exists unmaps only after GC.
  kvwire::LocalRegionRef region = agent_->regionRef(ri.id);
  uint8_t* data = region->ptr();
  auto* keep = new ViewKeep{std::move(region), lock_};
  auto ab = Napi::ArrayBuffer::New(env, data, ri.length,
                                   [](Napi::Env, void*, ViewKeep* k) {
                                     const std::shared_ptr<std::recursive_mutex> lock = k->lock;
                                     {
                                       std::lock_guard<std::recursive_mutex> guard(*lock);
                                       k->region.reset();
                                     }
                                     delete k;
                                   },
                                   keep);
  auto out = Napi::Object::New(env);
  out.Set("region", regionObject(env, ri));
  out.Set("bytes", Napi::Uint8Array::New(env, ri.length, ab, 0));
  schedule();
  return out;
}

// register(name, view: Uint8Array, access) -> region
Napi::Value AgentWrap::Register(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  if (!ensureOpen(env)) return env.Undefined();
  if (!info[1].IsTypedArray()) {
    throwInvalid(env, "register: memory must be a Buffer, ArrayBuffer, SharedArrayBuffer or typed array");
    return env.Undefined();
  }
  auto view = info[1].As<Napi::Uint8Array>();
  auto* ref = new Napi::ObjectReference(Napi::Persistent(info[1].As<Napi::Object>()));
  std::shared_ptr<void> keeper(ref, [releases = releases_](void* p) {
    releases->release(std::unique_ptr<Napi::ObjectReference>(static_cast<Napi::ObjectReference*>(p)));
  });
  return newRegion(env, agent_->registerMemory(info[0].As<Napi::String>(), view.Data(), view.ByteLength(), accessFrom(info[2]),
                                               std::move(keeper), info[3].IsBoolean() && info[3].As<Napi::Boolean>().Value()));
}

// allocateVram(name, bytes, access, device) -> region (no host view: VRAM is reached by copies)
Napi::Value AgentWrap::AllocateVram(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  if (!ensureOpen(env)) return env.Undefined();
  return newRegion(env, agent_->allocateVram(info[0].As<Napi::String>(), static_cast<uint64_t>(info[1].As<Napi::Number>().DoubleValue()),
                                             accessFrom(info[2]), info[3].As<Napi::Number>().Uint32Value()));
}

// registerVram(name, address: bigint, bytes, access, device) -> region
Napi::Value AgentWrap::RegisterVram(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  if (!ensureOpen(env)) return env.Undefined();
  bool lossless = false;
  const uint64_t address = info[1].As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless) {
    throwInvalid(env, "register: address must be a bigint in [1, 2^64)");
    return env.Undefined();
  }
  return newRegion(env, agent_->registerVram(info[0].As<Napi::String>(), address,
                                             static_cast<uint64_t>(info[2].As<Napi::Number>().DoubleValue()), accessFrom(info[3]),
                                             info[4].As<Napi::Number>().Uint32Value()));
}

// writeRegion(id, offset, bytes: Uint8Array) / readRegion(id, offset, into: Uint8Array): host copies.
Napi::Value AgentWrap::WriteRegion(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  if (!ensureOpen(env)) return env.Undefined();
  auto data = info[2].As<Napi::Uint8Array>();
  Status st = agent_->writeRegion(info[0].As<Napi::Number>().Uint32Value(),
                                  static_cast<uint64_t>(info[1].As<Napi::Number>().DoubleValue()), data.Data(), data.ByteLength());
  if (!st) throwStatus(env, st);
  return env.Undefined();
}

Napi::Value AgentWrap::ReadRegion(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  if (!ensureOpen(env)) return env.Undefined();
  auto into = info[2].As<Napi::Uint8Array>();
  Status st = agent_->readRegion(info[0].As<Napi::Number>().Uint32Value(),
                                 static_cast<uint64_t>(info[1].As<Napi::Number>().DoubleValue()), into.Data(), into.ByteLength());
  if (!st) throwStatus(env, st);
  return env.Undefined();
}

Napi::Value AgentWrap::Deregister(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  if (!ensureOpen(env)) return env.Undefined();
  Status st = agent_->deregister(info[0].As<Napi::Number>().Uint32Value());
  if (!st) throwStatus(env, st);
  return env.Undefined();
}

Napi::Value AgentWrap::Metadata(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  if (!ensureOpen(env)) return env.Undefined();
  auto md = agent_->metadata();
  if (!md.isOk()) {
    throwStatus(env, md.status());
    return env.Undefined();
  }
  return Napi::Buffer<uint8_t>::Copy(env, md.value().data(), md.value().size());
}

Napi::Value AgentWrap::LoadPeer(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  if (!ensureOpen(env)) return env.Undefined();
  if (!info[0].IsTypedArray()) {
    throwInvalid(env, "loadPeer: metadata must be a Uint8Array");
    return env.Undefined();
  }
  auto blob = info[0].As<Napi::Uint8Array>();
  auto peer = agent_->loadPeer(blob.Data(), blob.ByteLength());
  if (!peer.isOk()) {
    throwStatus(env, peer.status());
    return env.Undefined();
  }
  const kvwire::PeerView& p = peer.value();
  auto o = Napi::Object::New(env);
  o.Set("name", p.name);
  o.Set("agentId", Napi::BigInt::New(env, p.agentId));
  o.Set("generation", static_cast<double>(p.generation));
  auto regions = Napi::Array::New(env, p.regions.size());
  for (size_t i = 0; i < p.regions.size(); ++i) regions.Set(i, regionObject(env, p.regions[i]));
  o.Set("regions", regions);
  schedule();
  return o;
}

Napi::Value AgentWrap::ForgetPeer(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  if (!ensureOpen(env)) return env.Undefined();
  Status st = agent_->forgetPeer(info[0].As<Napi::String>());
  if (!st) throwStatus(env, st);
  schedule();
  return env.Undefined();
}

// post(op, path, localRegion, localOffsets, localLengths, peer, peerAgentId, remoteRegion, remoteOffsets,
//      remoteLengths, notify?: Uint8Array) -> transfer id. Offsets are relative to their region.
Napi::Value AgentWrap::Post(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  if (!ensureOpen(env)) return env.Undefined();
  kvwire::TransferRequest rq;
  rq.op = info[0].As<Napi::Number>().Uint32Value() == 0 ? kvwire::Op::Read : kvwire::Op::Write;
  rq.path = static_cast<kvwire::Path>(std::min<uint32_t>(info[1].As<Napi::Number>().Uint32Value(), 5));  // Path::CudaIpc is the last
  rq.localRegion = info[2].As<Napi::Number>().Uint32Value();
  std::vector<uint64_t> lo, ll, ro, rl;
  if (!readOffsets(env, info[3], "local offset", &lo) || !readOffsets(env, info[4], "local length", &ll) ||
      !readOffsets(env, info[8], "remote offset", &ro) || !readOffsets(env, info[9], "remote length", &rl))
    return env.Undefined();
  if (lo.size() != ll.size() || ro.size() != rl.size()) {
    throwInvalid(env, "post: offsets and lengths of a descriptor list must have equal counts");
    return env.Undefined();
  }
  rq.local = {lo.data(), ll.data(), lo.size()};
  rq.remote = {ro.data(), rl.data(), ro.size()};
  rq.peer = info[5].As<Napi::String>();
  bool lossless = false;
  rq.peerAgentId = info[6].As<Napi::BigInt>().Uint64Value(&lossless);
  rq.remoteRegion = info[7].As<Napi::Number>().Uint32Value();
  if (info.Length() > 10 && info[10].IsTypedArray()) {
    auto n = info[10].As<Napi::Uint8Array>();
    rq.hasNotify = true;
    rq.notify.assign(reinterpret_cast<const char*>(n.Data()), n.ByteLength());
  }
  auto id = agent_->post(rq);
  if (!id.isOk()) {
    throwStatus(env, id.status());
    return env.Undefined();
  }
  schedule();
  return Napi::Number::New(env, static_cast<double>(id.value()));
}

// cancel(id, timeout: boolean, why) -> boolean (false if already settled)
Napi::Value AgentWrap::Cancel(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  if (!agent_) return Napi::Boolean::New(env, false);
  const bool timeout = info[1].ToBoolean();
  bool done = agent_->cancel(static_cast<uint64_t>(info[0].As<Napi::Number>().DoubleValue()),
                             timeout ? Code::Timeout : Code::Canceled, info[2].As<Napi::String>());
  schedule();
  return Napi::Boolean::New(env, done);
}

Napi::Value AgentWrap::Notify(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  if (!ensureOpen(env)) return env.Undefined();
  auto msg = info[1].As<Napi::Uint8Array>();
  Status st = agent_->notify(info[0].As<Napi::String>(),
                             std::string(reinterpret_cast<const char*>(msg.Data()), msg.ByteLength()));
  if (!st) throwStatus(env, st);
  schedule();
  return env.Undefined();
}

// connections() -> [{ peer, outbound, text }]: the transport's description of each open connection
// (empty once closed).
Napi::Value AgentWrap::Connections(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  const auto list = agent_ ? agent_->describeConnections() : std::vector<kvwire::Backend::ConnectionInfo>{};
  Napi::Array out = Napi::Array::New(env, list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("peer", Napi::String::New(env, list[i].peer));
    o.Set("outbound", Napi::Boolean::New(env, list[i].outbound));
    o.Set("text", Napi::String::New(env, list[i].text));
    out.Set(static_cast<uint32_t>(i), o);
  }
  return out;
}

// securityCounters() -> { droppedUnauthenticated, failedHandshakes, refusedAddresses, ... } (zeros once closed)
Napi::Value AgentWrap::SecurityCounters(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  Napi::Env env = info.Env();
  const kvwire::SecurityCounters c = agent_ ? agent_->securityCounters() : kvwire::SecurityCounters{};
  Napi::Object out = Napi::Object::New(env);
  out.Set("droppedUnauthenticated", Napi::Number::New(env, static_cast<double>(c.droppedUnauthenticated)));
  out.Set("failedHandshakes", Napi::Number::New(env, static_cast<double>(c.failedHandshakes)));
  out.Set("refusedAddresses", Napi::Number::New(env, static_cast<double>(c.refusedAddresses)));
  out.Set("receiveBlocked", Napi::Boolean::New(env, agent_ && agent_->receiveBlocked()));
  out.Set("rebuilds", Napi::Number::New(env, agent_ ? static_cast<double>(agent_->rebuilds()) : 0));
  out.Set("retiredRegions", Napi::Number::New(env, agent_ ? static_cast<double>(agent_->retiredRegions()) : 0));
  out.Set("gpuKernelBatches", Napi::Number::New(env, agent_ ? static_cast<double>(agent_->gpuKernelBatches()) : 0));
  out.Set("vramStagedBytes", Napi::Number::New(env, agent_ ? static_cast<double>(agent_->vramStagedBytes()) : 0));
  out.Set("progressThreadSteps", Napi::Number::New(env, static_cast<double>(helperSteps_.load(std::memory_order_relaxed))));
  out.Set("droppedNotifications", Napi::Number::New(env, static_cast<double>(droppedArrivals_)));
  const std::string fault = agent_ ? agent_->gpuFault() : std::string();
  out.Set("gpuFault", fault.empty() ? env.Null() : Napi::String::New(env, fault));
  return out;
}

// rebuildTransport(): the agent opens a new UCX worker as if its shared-memory queue were blocked
// (tests drive that path with it; nothing else should).
Napi::Value AgentWrap::RebuildTransport(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  if (!ensureOpen(info.Env())) return info.Env().Undefined();
  agent_->rebuildTransport();
  schedule();  // results are delivered, and the new event fd polled, from the loop
  return info.Env().Undefined();
}

Napi::Value AgentWrap::SetRef(const Napi::CallbackInfo& info) {
  std::lock_guard<std::recursive_mutex> guard(*lock_);
  userRef_ = info[0].ToBoolean();
  updateRefs();
  return info.Env().Undefined();
}

// close() -> Promise<void>. Transfers settle with ERR_CANCELED at once; the promise resolves when
// UCX has finished what it owns (progressed on the loop, so agents in the same process can answer),
// or after kCloseGraceNs.
Napi::Value AgentWrap::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!closeDeferred_) {
    closeDeferred_ = std::make_unique<Napi::Promise::Deferred>(env);
    if (agent_) {
      {
        std::lock_guard<std::recursive_mutex> guard(*lock_);
        agent_->beginClose();
      }
      deliver();
      closeDeadlineNs_ = kvwire::monotonicNs() + kCloseGraceNs;
      schedule();
    } else {
      finishClose();
    }
  }
  return closeDeferred_->Promise();
}

void AgentWrap::finishClose() {
  stopHelper();
  agent_.reset();  // blocks only if UCX is still not drained, then leaks the worker rather than abort
  shutdown();
  if (closeDeferred_) {
    Napi::HandleScope scope(Env());
    Napi::AsyncContext context(Env(), "kvwire.close");
    Napi::CallbackScope callbackScope(Env(), context);  // so the awaiting JS runs right away
    closeDeferred_->Resolve(Env().Undefined());
  }
}

void AgentWrap::shutdown() {
  stopHelper();
  agent_.reset();
  releases_->drain();
  if (!handles_) return;
  LoopHandles* h = handles_;
  handles_ = nullptr;
  if (h->cleanupHook) {
    napi_remove_async_cleanup_hook(h->cleanupHook);
    h->cleanupHook = nullptr;
  }
  auto closed = [](uv_handle_t* handle) {
    auto* hs = static_cast<LoopHandles*>(handle->data);
    if (--hs->open == 0) delete hs;
  };
  h->idle.data = h->timer.data = h->async.data = h;
  if (h->poll) uv_close(reinterpret_cast<uv_handle_t*>(h->poll), [](uv_handle_t* p) { delete reinterpret_cast<uv_poll_t*>(p); });
  uv_close(reinterpret_cast<uv_handle_t*>(&h->idle), closed);
  uv_close(reinterpret_cast<uv_handle_t*>(&h->timer), closed);
  uv_close(reinterpret_cast<uv_handle_t*>(&h->async), closed);
}

// A worker_thread is exiting: release UCX and close the uv handles while the loop still runs.
void AgentWrap::onAsyncCleanup(napi_async_cleanup_hook_handle, void* arg) {
  auto* self = static_cast<AgentWrap*>(arg);
  self->stopHelper();
  if (self->agent_) self->agent_->close();
  self->settled_.clear();
  self->arrived_.clear();
  self->shutdown();
}

Napi::Value SetErrorClass(const Napi::CallbackInfo& info) {
  auto* data = info.Env().GetInstanceData<AddonData>();
  data->errorClass = Napi::Persistent(info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

// Exposed for tests and tools: decode a metadata blob without loading it.
Napi::Value DecodeMetadata(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray()) {
    throwInvalid(env, "decodeMetadata: expected a Uint8Array");
    return env.Undefined();
  }
  auto blob = info[0].As<Napi::Uint8Array>();
  auto md = kvwire::decodeMetadata(blob.Data(), blob.ByteLength());
  if (!md.isOk()) {
    throwStatus(env, md.status());
    return env.Undefined();
  }
  auto o = Napi::Object::New(env);
  o.Set("name", md.value().name);
  o.Set("agentId", Napi::BigInt::New(env, md.value().agentId));
  o.Set("generation", static_cast<double>(md.value().generation));
  o.Set("backend", md.value().backend);
  o.Set("workerAddressBytes", static_cast<double>(md.value().workerAddress.size()));
  auto regions = Napi::Array::New(env);
  for (const auto& r : md.value().regions) {
    auto ro = Napi::Object::New(env);
    ro.Set("id", r.id);
    ro.Set("name", r.name);
    ro.Set("length", static_cast<double>(r.length));
    ro.Set("access", r.access);
    ro.Set("allocated", r.backendAllocated);
    regions.Set(regions.Length(), ro);
  }
  o.Set("regions", regions);
  return o;
}

// cudaInfo() -> { available, reason?, driver, testDouble?, version, devices: [{ ordinal, name, totalBytes }] }
Napi::Value CudaInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto o = Napi::Object::New(env);
  auto d = kvwire::cuda::driver();
  auto devices = kvwire::cuda::devices();
  o.Set("available", devices.isOk());
  if (!devices.isOk()) o.Set("reason", devices.status().message());
  if (d.isOk()) {
    o.Set("driver", d.value()->path);
    if (!d.value()->testDouble.empty()) o.Set("testDouble", d.value()->testDouble);
    o.Set("version", d.value()->version);
  }
  auto list = Napi::Array::New(env);
  if (devices.isOk())
    for (const auto& dev : devices.value()) {
      auto x = Napi::Object::New(env);
      x.Set("ordinal", dev.ordinal);
      x.Set("name", dev.name);
      x.Set("totalBytes", static_cast<double>(dev.totalBytes));
      list.Set(list.Length(), x);
    }
  o.Set("devices", list);
  // A trial export on device 0 (2 MiB): IPC can be off where a driver and devices are not (some
  // containers, virtualised or partitioned GPUs).
  if (devices.isOk()) {
    const std::string ipc = kvwire::cuda::probeIpc(0);
    if (!ipc.empty()) o.Set("ipcProblem", ipc);
  }
  return o;
}

// copyRuns(dst, dstOffsets, src, srcOffsets, lengths): a validated local gather/scatter (staging).
Napi::Value CopyRuns(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray() || !info[2].IsTypedArray()) {
    throwInvalid(env, "copyRuns: dst and src must be typed arrays");
    return env.Undefined();
  }
  auto dst = info[0].As<Napi::TypedArray>();
  auto src = info[2].As<Napi::TypedArray>();
  std::vector<uint64_t> dstOffsets, srcOffsets, lengths;
  if (!readOffsets(env, info[1], "dstOffsets", &dstOffsets) || !readOffsets(env, info[3], "srcOffsets", &srcOffsets) ||
      !readOffsets(env, info[4], "lengths", &lengths))
    return env.Undefined();
  if (dstOffsets.size() != lengths.size() || srcOffsets.size() != lengths.size()) {
    throwInvalid(env, "copyRuns: dstOffsets, srcOffsets and lengths must have the same length");
    return env.Undefined();
  }
  auto* dstBytes = static_cast<uint8_t*>(dst.ArrayBuffer().Data()) + dst.ByteOffset();
  auto* srcBytes = static_cast<const uint8_t*>(src.ArrayBuffer().Data()) + src.ByteOffset();
  Status st = kvwire::copyRuns(dstBytes, dst.ByteLength(), dstOffsets.data(), srcBytes, src.ByteLength(),
                               srcOffsets.data(), lengths.data(), lengths.size());
  if (!st) throwStatus(env, st);
  return env.Undefined();
}

Napi::Object InitAll(Napi::Env env, Napi::Object exports) {
  env.SetInstanceData(new AddonData());
  // The backends this addon links: the core finds them by name.
  kvwire::registerBackend("ucx", kvwire::createUcxBackend);
  exports.Set("NativeAgent", AgentWrap::Init(env));
  exports.Set("setErrorClass", Napi::Function::New(env, SetErrorClass));
  exports.Set("decodeMetadata", Napi::Function::New(env, DecodeMetadata));
  exports.Set("copyRuns", Napi::Function::New(env, CopyRuns));
  exports.Set("cudaInfo", Napi::Function::New(env, CudaInfo));
  exports.Set("ucxInfo", Napi::Function::New(env, [](const Napi::CallbackInfo& info) {
    const kvwire::UcxInfo u = kvwire::ucxInfo();
    auto o = Napi::Object::New(info.Env());
    auto list = [&](const std::vector<std::string>& v) {
      auto a = Napi::Array::New(info.Env());
      for (size_t i = 0; i < v.size(); ++i) a.Set(i, v[i]);
      return a;
    };
    o.Set("transports", list(u.transports));
    o.Set("memoryTypes", list(u.memoryTypes));
    if (!u.error.empty()) o.Set("error", u.error);
    return o;
  }));
  exports.Set("ucxVersion", Napi::Function::New(env, [](const Napi::CallbackInfo& info) {
    return Napi::String::New(info.Env(), kvwire::ucxVersion());
  }));
  return exports;
}

}  // namespace

NODE_API_MODULE(kvwire, InitAll)
