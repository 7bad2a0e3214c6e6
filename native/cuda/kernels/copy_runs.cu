// The batched copy kernel of path 'cuda_ipc': one launch moves a whole batch of device-to-device
// runs (the host splits large runs into chunks first, so the grid spreads over the GPU). One
// cudaMemcpyAsync per block is launch-bound (measured on an H200: 0.7 GB/s for 4 KiB blocks, 11 GB/s
// for 64 KiB, against a device-copy ceiling of ~2,040 GB/s).
//
// Compiled to PTX with NVRTC (native/cuda/kernels/make-ptx.py), and the PTX text is what kvwire
// ships (copy_runs_ptx.h): the driver JIT-compiles it for the GPU at hand, so building kvwire needs
// no CUDA toolkit.
struct KvwireRun {
  unsigned long long dst;
  unsigned long long src;
  unsigned long long bytes;
};

extern "C" __global__ void kvwire_copy_runs(const KvwireRun* runs, unsigned int count) {
  for (unsigned int r = blockIdx.x; r < count; r += gridDim.x) {
    const KvwireRun run = runs[r];
    if (((run.dst | run.src | run.bytes) & 15ull) == 0) {
      // 16-byte words: what the memory system moves best.
      uint4* dst = reinterpret_cast<uint4*>(run.dst);
      const uint4* src = reinterpret_cast<const uint4*>(run.src);
      const unsigned long long words = run.bytes >> 4;
      for (unsigned long long i = threadIdx.x; i < words; i += blockDim.x) dst[i] = src[i];
    } else {
      unsigned char* dst = reinterpret_cast<unsigned char*>(run.dst);
      const unsigned char* src = reinterpret_cast<const unsigned char*>(run.src);
      for (unsigned long long i = threadIdx.x; i < run.bytes; i += blockDim.x) dst[i] = src[i];
    }
  }
}
