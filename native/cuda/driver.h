// The CUDA driver, loaded at run time with dlopen: kvwire builds and runs on machines with no GPU,
// no driver and no toolkit, and says why GPU memory is unavailable there.
//
// KVWIRE_CUDA_DRIVER=<path> loads another library with the same entry points instead of
// libcuda.so.1: the test suite points it at the CUDA driver test double (test/cuda-double), which
// kvwire recognises and labels as such in every report (`kvwire info`, errors).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "../core/status.h"
#include "cuda_api.h"

namespace kvwire {
namespace cuda {

struct Driver {
#define KVWIRE_CUDA_MEMBER(symbol, member, params) CUresult(*member) params = nullptr;
  KVWIRE_CUDA_ENTRY_POINTS(KVWIRE_CUDA_MEMBER)
#undef KVWIRE_CUDA_MEMBER
  std::string path;        // what was loaded
  std::string testDouble;  // the double's description; empty for a real driver
  int version = 0;         // e.g. 13000 for CUDA 13.0
  int deviceCount = 0;

  // "invalid argument (CUDA error 1)".
  std::string describe(CUresult result) const;
  // ERR_BACKEND "what: <describe>" (ERR_INVALID_PARAM for CUDA_ERROR_INVALID_VALUE when `invalid`).
  Status fail(const std::string& what, CUresult result) const;
};

// The driver, loaded and initialised once per process. ERR_UNAVAILABLE, with the reason (library
// not found, no device, initialisation failed), when there is none.
Result<const Driver*> driver();

// Makes `device`'s primary context current on the calling thread (retained once, for the life of
// the process). ERR_INVALID_PARAM for a device that does not exist.
Status useDevice(int device);

struct DeviceInfo {
  int ordinal = 0;
  std::string name;
  uint64_t totalBytes = 0;
};
// What `kvwire info` shows: every device, or the reason there is none.
Result<std::vector<DeviceInfo>> devices();

}  // namespace cuda
}  // namespace kvwire
