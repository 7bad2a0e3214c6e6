#include "backend_registry.h"

#include <map>
#include <mutex>

namespace kvwire {

namespace {
std::mutex& registryMutex() {
  static std::mutex m;
  return m;
}
std::map<std::string, BackendFactory>& registry() {
  static std::map<std::string, BackendFactory> r;
  return r;
}
}  // namespace

void registerBackend(const std::string& name, BackendFactory factory) {
  std::lock_guard<std::mutex> lock(registryMutex());
  registry()[name] = factory;
}

Result<std::unique_ptr<Backend>> createBackend(const std::string& name, const BackendOptions& options, BackendHost* host) {
  BackendFactory factory = nullptr;
  {
    std::lock_guard<std::mutex> lock(registryMutex());
    auto it = registry().find(name);
    if (it != registry().end()) factory = it->second;
  }
  if (factory == nullptr) {
    std::string known;
    for (const auto& n : registeredBackends()) known += (known.empty() ? "" : ", ") + n;
    return Status(Code::Unavailable, "backend '" + name + "' is not built into this kvwire (available: " +
                                         (known.empty() ? "none" : known) + ")");
  }
  return factory(options, host);
}

std::vector<std::string> registeredBackends() {
  std::lock_guard<std::mutex> lock(registryMutex());
  std::vector<std::string> names;
  for (const auto& [name, factory] : registry()) names.push_back(name);
  return names;
}

}  // namespace kvwire
