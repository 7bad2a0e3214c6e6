// The few CUDA driver API types, constants and entry points kvwire uses, declared here so that
// building kvwire needs no CUDA toolkit: the driver (libcuda.so.1) is loaded with dlopen at run time
// (driver.h). The values are the driver API's own (cuda.h, CUDA 12/13); the exported symbol names are
// the ones cuda.h maps each call to (e.g. cuMemAlloc -> cuMemAlloc_v2).
//
// The test double (test/cuda-double) implements exactly these entry points over host memory.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kvwire {
namespace cuda {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = struct CUctx_st*;
using CUstream = struct CUstream_st*;
using CUevent = struct CUevent_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;

constexpr size_t kIpcHandleBytes = 64;  // CU_IPC_HANDLE_SIZE
struct CUipcMemHandle {
  unsigned char reserved[kIpcHandleBytes];
};

// CUresult values kvwire tells apart.
constexpr CUresult kSuccess = 0;
constexpr CUresult kErrorInvalidValue = 1;
constexpr CUresult kErrorOutOfMemory = 2;
constexpr CUresult kErrorNotInitialized = 3;
constexpr CUresult kErrorNoDevice = 100;
constexpr CUresult kErrorInvalidDevice = 101;
constexpr CUresult kErrorInvalidContext = 201;
constexpr CUresult kErrorNotReady = 600;
constexpr CUresult kErrorUnsupportedPtxVersion = 222;

// CUpointer_attribute
constexpr int kPointerAttributeMemoryType = 2;
constexpr int kPointerAttributeDeviceOrdinal = 9;
constexpr int kPointerAttributeRangeStartAddr = 11;
constexpr int kPointerAttributeRangeSize = 12;
// CUmemorytype
constexpr unsigned kMemoryTypeHost = 1;
constexpr unsigned kMemoryTypeDevice = 2;
// Flags
constexpr unsigned kIpcMemLazyEnablePeerAccess = 0x1;  // CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
constexpr unsigned kStreamNonBlocking = 0x1;           // CU_STREAM_NON_BLOCKING
constexpr unsigned kEventDisableTiming = 0x2;          // CU_EVENT_DISABLE_TIMING
constexpr unsigned kMemHostRegisterPortable = 0x1;     // CU_MEMHOSTREGISTER_PORTABLE

// Entry points, as `X(exported symbol, member name, parameter list)`.
#define KVWIRE_CUDA_ENTRY_POINTS(X)                                                                            \
  X(cuInit, init, (unsigned flags))                                                                            \
  X(cuDriverGetVersion, driverGetVersion, (int* version))                                                      \
  X(cuGetErrorString, getErrorString, (CUresult error, const char** text))                                     \
  X(cuDeviceGetCount, deviceGetCount, (int* count))                                                            \
  X(cuDeviceGet, deviceGet, (CUdevice * device, int ordinal))                                                  \
  X(cuDeviceGetName, deviceGetName, (char* name, int length, CUdevice device))                                 \
  X(cuDeviceTotalMem_v2, deviceTotalMem, (size_t * bytes, CUdevice device))                                    \
  X(cuDevicePrimaryCtxRetain, primaryCtxRetain, (CUcontext * context, CUdevice device))                        \
  X(cuDevicePrimaryCtxRelease_v2, primaryCtxRelease, (CUdevice device))                                        \
  X(cuCtxSetCurrent, ctxSetCurrent, (CUcontext context))                                                       \
  X(cuCtxGetCurrent, ctxGetCurrent, (CUcontext * context))                                                     \
  X(cuMemAlloc_v2, memAlloc, (CUdeviceptr * pointer, size_t bytes))                                            \
  X(cuMemFree_v2, memFree, (CUdeviceptr pointer))                                                              \
  X(cuMemGetAddressRange_v2, memGetAddressRange, (CUdeviceptr * base, size_t * bytes, CUdeviceptr pointer))    \
  X(cuPointerGetAttributes, pointerGetAttributes,                                                              \
    (unsigned count, int* attributes, void** data, CUdeviceptr pointer))                                       \
  X(cuMemsetD8_v2, memsetD8, (CUdeviceptr dst, unsigned char value, size_t count))                            \
  X(cuMemcpyHtoD_v2, memcpyHtoD, (CUdeviceptr dst, const void* src, size_t bytes))                            \
  X(cuMemcpyDtoH_v2, memcpyDtoH, (void* dst, CUdeviceptr src, size_t bytes))                                  \
  X(cuMemcpyAsync, memcpyAsync, (CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream stream))            \
  X(cuMemcpyHtoDAsync_v2, memcpyHtoDAsync, (CUdeviceptr dst, const void* src, size_t bytes, CUstream stream))   \
  X(cuModuleLoadData, moduleLoadData, (CUmodule * module, const void* image))                                  \
  X(cuModuleGetFunction, moduleGetFunction, (CUfunction * function, CUmodule module, const char* name))         \
  X(cuLaunchKernel, launchKernel,                                                                              \
    (CUfunction function, unsigned gridX, unsigned gridY, unsigned gridZ, unsigned blockX, unsigned blockY,    \
     unsigned blockZ, unsigned sharedBytes, CUstream stream, void** params, void** extra))                     \
  X(cuMemHostRegister_v2, memHostRegister, (void* pointer, size_t bytes, unsigned flags))                     \
  X(cuMemHostUnregister, memHostUnregister, (void* pointer))                                                   \
  X(cuIpcGetMemHandle, ipcGetMemHandle, (CUipcMemHandle * handle, CUdeviceptr pointer))                       \
  X(cuIpcOpenMemHandle_v2, ipcOpenMemHandle, (CUdeviceptr * pointer, CUipcMemHandle handle, unsigned flags))  \
  X(cuIpcCloseMemHandle, ipcCloseMemHandle, (CUdeviceptr pointer))                                             \
  X(cuStreamCreate, streamCreate, (CUstream * stream, unsigned flags))                                         \
  X(cuStreamDestroy_v2, streamDestroy, (CUstream stream))                                                      \
  X(cuStreamSynchronize, streamSynchronize, (CUstream stream))                                                 \
  X(cuEventCreate, eventCreate, (CUevent * event, unsigned flags))                                             \
  X(cuEventDestroy_v2, eventDestroy, (CUevent event))                                                          \
  X(cuEventRecord, eventRecord, (CUevent event, CUstream stream))                                              \
  X(cuEventQuery, eventQuery, (CUevent event))

}  // namespace cuda
}  // namespace kvwire
