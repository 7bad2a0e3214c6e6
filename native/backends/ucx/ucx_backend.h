// UCX backend: context, worker, endpoints, remote keys, and the three data paths
// (direct copy through ucp_rkey_ptr, active-message rendezvous, native RMA).
#pragma once
#include <string>
#include <vector>

#include "../../core/backend.h"

namespace kvwire {

std::string ucxVersion();
// What the running UCX offers here (with this process's UCX_* settings): its transports as
// "transport/device" and the memory types it can move. `error` says why it could not be asked.
struct UcxInfo {
  std::vector<std::string> transports;
  std::vector<std::string> memoryTypes;
  std::string error;
};
UcxInfo ucxInfo();
Result<std::unique_ptr<Backend>> createUcxBackend(const BackendOptions& options, BackendHost* host);

}  // namespace kvwire
