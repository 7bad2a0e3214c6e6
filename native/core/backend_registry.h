// How the core creates backends without naming any: each backend registers a factory under its name
// (the binding registers the ones it links: "ucx"), and an agent asks for one by name.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "backend.h"

namespace kvwire {

using BackendFactory = Result<std::unique_ptr<Backend>> (*)(const BackendOptions& options, BackendHost* host);

// Registers (or replaces) the factory of backend `name`. Call before creating agents.
void registerBackend(const std::string& name, BackendFactory factory);
// ERR_UNAVAILABLE naming the registered backends when `name` is not one of them.
Result<std::unique_ptr<Backend>> createBackend(const std::string& name, const BackendOptions& options, BackendHost* host);
std::vector<std::string> registeredBackends();

}  // namespace kvwire
