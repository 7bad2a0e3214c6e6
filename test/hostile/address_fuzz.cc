// Fuzzes kvwire's UCX worker-address check (native/backends/ucx/address_check.cc) against UCX itself.
//
//   kvwire_address_fuzz <cases> [seed] [all]
//   kvwire_address_fuzz print [ms]         this UCX's worker address, in hex (then stays alive `ms`)
//   kvwire_address_fuzz check <hex>        the check's verdict on an address (e.g. another UCX release's)
//
// Builds candidate addresses from this process's real worker addresses (random bytes, real addresses
// with 1-4 bytes changed or set to boundary values, truncated, extended, spliced) and checks each with
// the AddressChecker. Every candidate the checker accepts is handed to ucp_ep_create (plus some
// progress) in a forked child, which must not die. Real addresses must all be accepted. With `all`,
// rejected candidates are tried too (what UCX would do without the check: "crashedRejected").
// Prints one JSON line: {"cases":N,"accepted":A,"rejected":R,"crashed":C,"validRejected":V,...};
// exits 1 when a crash or a wrongly rejected real address was seen.
#include <fcntl.h>
#include <sys/wait.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "backends/ucx/address_check.h"

namespace {

ucp_worker_h makeWorker(ucp_context_h ctx) {
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  ucp_worker_h w = nullptr;
  if (ucp_worker_create(ctx, &wp, &w) != UCS_OK) {
    std::fprintf(stderr, "address_fuzz: ucp_worker_create failed\n");
    std::exit(2);
  }
  return w;
}

std::vector<uint8_t> addressOf(ucp_worker_h w) {
  ucp_address_t* a = nullptr;
  size_t n = 0;
  if (ucp_worker_get_address(w, &a, &n) != UCS_OK) std::exit(2);
  std::vector<uint8_t> out(reinterpret_cast<uint8_t*>(a), reinterpret_cast<uint8_t*>(a) + n);
  ucp_worker_release_address(w, a);
  return out;
}

// Returns "ok", "error" or "signal N" for ucp_ep_create(address) in a child process.
std::string tryConnect(ucp_worker_h w, const std::vector<uint8_t>& address) {
  std::fflush(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    alarm(10);
    // UCX logs a refused connection or an unreachable address on stdout: keep the JSON line clean.
    const int devnull = open("/dev/null", O_WRONLY);
    if (devnull >= 0) dup2(devnull, STDOUT_FILENO);
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    std::vector<uint8_t> padded(address);  // as kvwire hands addresses to UCX (kAddressPadding)
    padded.resize(padded.size() + kvwire::ucx::kAddressPadding);
    ep.address = reinterpret_cast<const ucp_address_t*>(padded.data());
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ucp_ep_h e = nullptr;
    const ucs_status_t st = ucp_ep_create(w, &ep, &e);
    for (int i = 0; i < 200; ++i) ucp_worker_progress(w);
    _exit(st == UCS_OK ? 0 : 1);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFEXITED(status)) return WEXITSTATUS(status) == 0 ? "ok" : "error";
  return "signal " + std::to_string(WIFSIGNALED(status) ? WTERMSIG(status) : -1);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  const long cases = argc > 1 ? std::atol(argv[1]) : 1000;
  const unsigned long seed = argc > 2 ? std::strtoul(argv[2], nullptr, 10) : 1;
  const bool all = argc > 3 && std::string(argv[3]) == "all";
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM;  // no WAKEUP: forked children would share one epoll set
  ucp_config_t* config = nullptr;
  ucp_context_h ctx = nullptr;
  if (ucp_config_read(nullptr, nullptr, &config) != UCS_OK || ucp_init(&params, config, &ctx) != UCS_OK) return 2;
  ucp_config_release(config);
  ucp_worker_h self = makeWorker(ctx);
  const kvwire::ucx::AddressChecker checker(addressOf(self));
  if (!checker.ok()) {
    std::printf("{\"disabled\":\"%s\"}\n", checker.disabledBecause().c_str());
    return 3;
  }
  if (mode == "print") {
    for (uint8_t b : addressOf(self)) std::printf("%02x", b);
    std::printf("\n");
    std::fflush(stdout);
    if (argc > 2) usleep(static_cast<useconds_t>(std::atol(argv[2])) * 1000);  // its FIFO exists while it lives
    return 0;
  }
  if (mode == "check" && argc > 2) {
    std::vector<uint8_t> a;
    for (const char* p = argv[2]; p[0] && p[1]; p += 2) a.push_back(static_cast<uint8_t>(std::strtoul(std::string(p, 2).c_str(), nullptr, 16)));
    const std::string why = checker.check(a.data(), a.size());
    std::printf("{\"accepted\":%s,\"reason\":\"%s\",\"connect\":\"%s\"}\n", why.empty() ? "true" : "false", why.c_str(),
                tryConnect(self, a).c_str());
    return 0;
  }
  std::vector<std::vector<uint8_t>> real;
  for (int i = 0; i < 4; ++i) real.push_back(addressOf(makeWorker(ctx)));
  long validRejected = 0;
  for (const auto& a : real)
    if (!checker.check(a.data(), a.size()).empty()) {
      ++validRejected;
      std::fprintf(stderr, "real address rejected: %s\n", checker.check(a.data(), a.size()).c_str());
    }

  std::mt19937_64 rng(seed);
  std::map<std::string, long> outcomes, reasons;
  long accepted = 0, rejected = 0, crashed = 0, crashedRejected = 0;
  const uint8_t boundary[] = {0x00, 0x01, 0x1f, 0x20, 0x3f, 0x40, 0x7f, 0x80, 0xfe, 0xff};
  for (long i = 0; i < cases; ++i) {
    const auto& base = real[rng() % real.size()];
    std::vector<uint8_t> a;
    switch (i % 7) {
      case 0: a.resize(1 + rng() % 512); for (auto& b : a) b = static_cast<uint8_t>(rng()); break;
      case 1: case 2: {  // a few bytes changed
        a = base;
        for (int k = 1 + rng() % 4; k > 0; --k) a[rng() % a.size()] = static_cast<uint8_t>(rng());
        break;
      }
      case 3: {  // bytes set to values that sit on the format's bit fields
        a = base;
        for (int k = 1 + rng() % 3; k > 0; --k) a[rng() % a.size()] = boundary[rng() % sizeof boundary];
        break;
      }
      case 4: a.assign(base.begin(), base.begin() + rng() % base.size()); break;  // truncated
      case 5:  // the header's flags (they decide what follows)
        a = base;
        a[0] ^= static_cast<uint8_t>(0x10 << (rng() % 4));
        break;
      default: {  // extended or spliced
        a = base;
        const auto& other = real[rng() % real.size()];
        const size_t at = rng() % a.size();
        a.insert(a.begin() + at, other.begin() + rng() % other.size(), other.end());
        break;
      }
    }
    const std::string why = a.empty() ? "empty" : checker.check(a.data(), a.size());
    if (!why.empty()) {
      ++rejected;
      ++reasons[why.substr(0, why.find(" at byte"))];
      if (all && tryConnect(self, a).rfind("signal", 0) == 0) ++crashedRejected;
      continue;
    }
    ++accepted;
    const std::string outcome = tryConnect(self, a);
    ++outcomes[outcome];
    if (outcome.rfind("signal", 0) == 0) ++crashed;
  }
  std::printf("{\"cases\":%ld,\"accepted\":%ld,\"rejected\":%ld,\"crashed\":%ld,\"validRejected\":%ld,", cases, accepted,
              rejected, crashed, validRejected);
  if (all) std::printf("\"crashedRejected\":%ld,", crashedRejected);
  std::printf("\"outcomes\":{");
  bool first = true;
  for (auto& [k, v] : outcomes) std::printf("%s\"%s\":%ld", first ? "" : ",", k.c_str(), v), first = false;
  std::printf("},\"reasons\":{");
  first = true;
  for (auto& [k, v] : reasons) std::printf("%s\"%s\":%ld", first ? "" : ",", k.c_str(), v), first = false;
  std::printf("}}\n");
  return crashed == 0 && validRejected == 0 ? 0 : 1;
}
