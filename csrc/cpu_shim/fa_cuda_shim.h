// A host-compilation shim for fastasam's CUDA kernels (csrc/multi_tensor.cu): the same source, compiled by a C++
// compiler against this header instead of the CUDA toolkit, runs on the CPU with CUDA's execution model:
//
// * every block's threads are real execution contexts (fibers, one stack each) that run until they reach a barrier
//   or a warp shuffle; `__syncthreads()` releases them only when every thread of the block has arrived, a shuffle
//   only when all 32 lanes of the warp have; a thread that exits or waits elsewhere is reported as divergence;
// * blocks race: several worker threads take the grid's blocks in a shuffled order, so the last-block-done pattern
//   (atomics, fences) runs concurrently for real;
// * `__shared__` variables are per block (one worker runs one block at a time; they are thread_local there);
// * every global load and store (`__ldcg` / `__stcg`) is checked: in bounds of a tensor of the launch and naturally
//   aligned (16 bytes for a vector access); optionally (racecheck) no two threads touch the same bytes in one launch
//   where one of them writes.
// A violation does not touch memory: it is recorded (the first one, with block and thread) and the launch returns
// a CUDA error code, which cudaGetErrorString turns into that message.
//
// Arithmetic: each fp32 operation rounds once (the shim is compiled with -ffp-contract=off). nvcc contracts a * b + c
// into one fused multiply-add by default, so a GPU may differ from the shim in the last bit of such expressions.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <functional>

// --- qualifiers ------------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local  // one worker thread runs one block at a time: per block

// --- runtime types -------------------------------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorIllegalAddress = 700,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
typedef struct CUstream_st* cudaStream_t;
// renamed: in a process that has loaded the real CUDA runtime (a CUDA build of PyTorch), the dynamic linker would
// otherwise bind these calls to it
#define cudaGetLastError fa_shim_cuda_get_last_error
#define cudaGetErrorString fa_shim_cuda_get_error_string
extern "C" cudaError_t cudaGetLastError(void);
extern "C" const char* cudaGetErrorString(cudaError_t err);

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

// storage types: bit patterns, converted with round-to-nearest-even as the CUDA intrinsics do
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace fa_shim {

struct dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

struct Block {
  dim3 idx, dim;
  dim3 tid;  // the index of the thread running now
};
extern thread_local Block* g_block;  // the block this worker thread runs

// the device-side operations (fa_cuda_shim.cpp)
void syncthreads();
float shfl_down(unsigned int mask, float value, unsigned int delta);
// true when a global access of `size` bytes at p is allowed; else the violation is recorded and the access must not
// happen
bool ok_to_access(const void* p, size_t size, bool write);

// runs `body` once per thread of a grid of `blocks` blocks of `threads` threads; returns the launch's error
cudaError_t launch(long long blocks, long long threads, cudaStream_t stream, const std::function<void()>& body);

inline uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return float_of(sign | 0x7f800000u | (man << 13));  // inf / NaN (payload kept)
  if (exp == 0) {
    const float mag = static_cast<float>(man) * 5.9604644775390625e-8f;  // man * 2^-24, exact
    return sign ? -mag : mag;
  }
  return float_of(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_half_rn(float f) {
  const uint32_t x = bits_of(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u | static_cast<uint16_t>((a >> 13) & 0x3ffu);  // NaN stays NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (halfway past 65504) rounds to inf; inf stays inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half; |f| * 2^24 is exact and <= 1024
    return sign | static_cast<uint16_t>(nearbyintf(float_of(a) * 16777216.0f));  // ties to even
  }
  const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round the 13 dropped bits to nearest even
  return sign | static_cast<uint16_t>((r - 0x38000000u) >> 13);  // rebias 127 -> 15
}

inline float bf16_to_float(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bf16_rn(float f) {
  const uint32_t x = bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace fa_shim

#define threadIdx (::fa_shim::g_block->tid)
#define blockIdx (::fa_shim::g_block->idx)
#define blockDim (::fa_shim::g_block->dim)

// --- device functions ------------------------------------------------------------------------------------------------
inline float __half2float(__half h) { return fa_shim::half_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{fa_shim::float_to_half_rn(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return fa_shim::bf16_to_float(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{fa_shim::float_to_bf16_rn(f)}; }

inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }

// global loads and stores, cached at L2 on the GPU; here: checked
template <typename T> inline T __ldcg(const T* p) {
  if (!fa_shim::ok_to_access(p, sizeof(T), false)) return T{};
  T v;
  memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T> inline void __stcg(T* p, T v) {
  if (fa_shim::ok_to_access(p, sizeof(T), true)) memcpy(p, &v, sizeof(T));
}

inline void __syncthreads() { fa_shim::syncthreads(); }
inline float __shfl_down_sync(unsigned int mask, float value, unsigned int delta) {
  return fa_shim::shfl_down(mask, value, delta);
}
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// multi_tensor.cu launches through FA_LAUNCH (there: `kernel<<<blocks, threads, 0, stream>>>(args)`)
#define FA_LAUNCH(KERNEL, blocks, threads, stream, ...) \
  ::fa_shim::record_launch(::fa_shim::launch(blocks, threads, stream, [&] { KERNEL(__VA_ARGS__); }))

namespace fa_shim {
void record_launch(cudaError_t err);  // what the next cudaGetLastError() returns
}
