// fastasam multi-tensor CUDA kernels. Pure CUDA (no PyTorch headers), so csrc/check.sh can compile them anywhere
// nvcc is; binding.cpp exposes them to PyTorch. Interface and table layout: multi_tensor.h.
//
// One block per chunk. A row whose tensors are all 16-byte aligned is processed 16 bytes per thread per iteration
// (4 fp32 or 8 fp16/bf16 values, one vector load per tensor); other rows, and the last few elements of a chunk,
// element by element. Offsets are int64 (tensors over 2^31 elements).
//
// Floating-point contraction: none. Every product and every sum rounds once, in the order written; nothing is fused
// into a multiply-add. nvcc contracts a * b + c by default (-fmad=true), so this file is compiled with -fmad=false
// everywhere it is built (setup.py and the just-in-time build take fastasam/_toolchain.py's NVCC_FLAGS;
// csrc/check.sh uses the same flag and fails on any fma, or add/sub/mul without a rounding mode, in the PTX). The
// per-element formulas live in elementwise.h, shared with the CPU kernels (cpu_kernels.cpp); its _rn helpers say the
// same where the order matters most (GSAM's x * G + y * K). The
// Triton kernels (kernels/multi_tensor.py) follow the same policy (enable_fp_fusion=False), the CPU shim that runs
// this file in tests is compiled with -ffp-contract=off, and Triton's interpreter never fuses, so all four agree bit
// for bit on every elementwise result from the same inputs (perturbation, restore, fused updates, combinations).
// The reductions (squared norm, dots) are deterministic but summed in each backend's own order (chunk size, block
// sums), so they agree across backends and with torch only to rounding; comparisons with torch's own optimizers
// hold within a bound where torch rounds differently (fp16/bf16 after every op in its foreach paths). The kernels
// are bound by memory bandwidth: the fused multiply-adds forgone cost nothing measurable.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "elementwise.h"
#include "multi_tensor.h"

namespace fa {  // the storage conversions elementwise.h's formulas round with
template <> struct Storage<__half> {
  FA_HD static FA_INLINE float load(__half x) { return __half2float(x); }
  FA_HD static FA_INLINE __half store(float x) { return __float2half_rn(x); }
};
template <> struct Storage<__nv_bfloat16> {
  FA_HD static FA_INLINE float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  FA_HD static FA_INLINE __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};
}  // namespace fa

namespace {

constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ float to_f(T x) { return fa::Storage<T>::load(x); }
template <typename T> __device__ __forceinline__ T from_f(float x) { return fa::Storage<T>::store(x); }

// W values of p starting at element i, in fp32 (W > 1: one 16-byte load; p + i must be 16-byte aligned).
// The table's addresses are plain integers, so plain dereferences would compile to generic loads; the __ldcg /
// __stcg intrinsics make them ld.global / st.global (cached in L2, not L1: every element is touched once per kernel).
template <int W, typename T> __device__ __forceinline__ void load(const T* p, int64_t i, float (&x)[W]) {
  if constexpr (W == 1) {
    x[0] = to_f<T>(__ldcg(p + i));
  } else {
    static_assert(W * sizeof(T) == 16, "vector width must be 16 bytes");
    uint4 raw = __ldcg(reinterpret_cast<const uint4*>(p + i));
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < W; ++k) x[k] = to_f<T>(v[k]);
  }
}

template <int W, typename T> __device__ __forceinline__ void store(T* p, int64_t i, const float (&x)[W]) {
  if constexpr (W == 1) {
    __stcg(p + i, from_f<T>(x[0]));
  } else {
    uint4 raw;
    T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = from_f<T>(x[k]);
    __stcg(reinterpret_cast<uint4*>(p + i), raw);
  }
}

struct Chunk {
  const int64_t* row;  // the tensor's table row
  int64_t start, length, flags;
};

__device__ __forceinline__ Chunk chunk_of(const int64_t* tab, const int32_t* chunks, int64_t b, int64_t size) {
  const int64_t r = chunks[2 * b];
  const int64_t start = static_cast<int64_t>(chunks[2 * b + 1]) * size;
  const int64_t* row = tab + r * FA_NCOL;
  const int64_t left = row[FA_COL_NUMEL] - start;
  return {row, start, left < size ? left : size, row[FA_COL_FLAGS]};
}

// the chunk's row of the per-group tables
__device__ __forceinline__ const float* opts_of(const float* opts, const Chunk& c) {
  return opts + ((c.flags >> FA_OPT_SHIFT) & FA_SLOT_MASK) * FA_NOPT;
}
__device__ __forceinline__ const float* hyper_of(const float* hyper, const Chunk& c) {
  return hyper + ((c.flags >> FA_HYPER_SHIFT) & FA_SLOT_MASK) * FA_NHYPER;
}

template <typename T> __device__ __forceinline__ T* col(const Chunk& c, int k) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(c.row[k]));
}

// 16-byte aligned: every listed column's address (unused columns hold 0, which is aligned)
__device__ __forceinline__ bool aligned(const Chunk& c, int ncols) {
  int64_t bits = 0;
  for (int k = 0; k < ncols; ++k) bits |= c.row[k];
  return (bits & 15) == 0;
}

// Calls f(std::integral_constant<int, W>, i) over the chunk: W = 16 / sizeof(T) for the vector part (when `vec`),
// then W = 1 for the rest. The chunk start is a multiple of the chunk size, so aligned rows stay aligned.
template <typename T, typename F>
__device__ __forceinline__ void for_each_element(const Chunk& c, bool vec, F&& f) {
  constexpr int V = 16 / sizeof(T);
  int64_t done = 0;
  if (vec) {
    const int64_t nvec = c.length / V;
    for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x) f(std::integral_constant<int, V>{}, c.start + k * V);
    done = nvec * V;
  }
  for (int64_t i = done + threadIdx.x; i < c.length; i += blockDim.x) f(std::integral_constant<int, 1>{}, c.start + i);
}

// sum over the block in a fixed order (warp tree, then the warps' sums by warp 0); the result in thread 0
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  x = 0.f;
  if (warp == 0) {
    if (lane < static_cast<int>(blockDim.x >> 5)) x = warp_sums[lane];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  }
  __syncthreads();  // warp_sums may be reused by a second call
  return x;
}

// --- phase 1: the squared norm ------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) sqnorm_kernel(const int64_t* tab, const int32_t* chunks, const float* opts,
                                                          int n_chunks, int64_t size, float* partials, int* counter,
                                                          float* out) {
  const Chunk c = chunk_of(tab, chunks, blockIdx.x, size);
  const float* opt = opts_of(opts, c);
  const bool adaptive = opt[FA_OPT_ADAPTIVE] != 0.f;
  const float eta = adaptive ? opt[FA_OPT_ETA] : 0.f;
  const T* w = col<T>(c, FA_COL_W);
  const T* g = col<T>(c, FA_COL_G);
  float acc = 0.f;
  for_each_element<T>(c, aligned(c, 2), [&](auto width, int64_t i) {
    constexpr int W = decltype(width)::value;
    float gv[W];
    load<W>(g, i, gv);
    if (adaptive) {
      float wv[W];
      load<W>(w, i, wv);
#pragma unroll
      for (int k = 0; k < W; ++k) gv[k] = fa::scaled_grad(gv[k], wv[k], true, eta);
    }
#pragma unroll
    for (int k = 0; k < W; ++k) acc += gv[k] * gv[k];
  });
  const float part = block_sum(acc);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = part;
    __threadfence();  // the partial is visible device-wide before the counter moves
    last = atomicAdd(counter, 1) == n_chunks - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  float total = 0.f;
  for (int i = threadIdx.x; i < n_chunks; i += blockDim.x) total += *(volatile float*)(partials + i);
  total = block_sum(total);
  if (threadIdx.x == 0) {
    *out = total;
    *counter = 0;  // ready for the next launch, CUDA-graph replays included
  }
}

// --- phase 2: the perturbation --------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) perturb_kernel(const int64_t* tab, const int32_t* chunks, const float* opts,
                                                           const float* sqnorm, int64_t size, bool copy) {
  const Chunk c = chunk_of(tab, chunks, blockIdx.x, size);
  const float* opt = opts_of(opts, c);
  const bool adaptive = opt[FA_OPT_ADAPTIVE] != 0.f;
  const float eta = adaptive ? opt[FA_OPT_ETA] : 0.f;
  const fa::PerturbScale s = fa::perturb_scale(*sqnorm, opt[FA_OPT_RHO], opt[FA_OPT_EPS]);
  T* w = col<T>(c, FA_COL_W);
  const T* g = col<T>(c, FA_COL_G);
  T* b = col<T>(c, FA_COL_B);
  for_each_element<T>(c, aligned(c, 3), [&](auto width, int64_t i) {
    constexpr int W = decltype(width)::value;
    float wv[W], gv[W], e[W];
    load<W>(w, i, wv);
    load<W>(g, i, gv);
#pragma unroll
    for (int k = 0; k < W; ++k) e[k] = fa::perturbation<T>(wv[k], gv[k], adaptive, eta, s.scale, s.finite, copy);
    if (copy) {
      store<W>(b, i, wv);
    } else {
      store<W>(b, i, e);
    }
#pragma unroll
    for (int k = 0; k < W; ++k) wv[k] += e[k];
    store<W>(w, i, wv);
  });
}

// --- phase 3: restore, alone or fused with the base optimizer's update -------------------------------------------

// The update's gradient x * G + y * K (fa::direction_of: (1, 0) without a direction, GSAM's with mode
// FA_COMBINE_GSAM, as the combine kernel computes it).
using fa::Direction;
using fa::direction_of;

// the update's gradient at element i (W values): G, or x * G + y * K (each product rounded, then the sum)
template <int W, typename T>
__device__ __forceinline__ void gradient(const T* g, const T* k, int64_t i, const Direction& dir, float (&d)[W]) {
  load<W>(g, i, d);
  if (dir.on) {
    float kv[W];
    load<W>(k, i, kv);
#pragma unroll
    for (int j = 0; j < W; ++j) d[j] = fa::combined(dir.x, d[j], dir.y, kv[j]);
  }
}

// 16-byte aligned: the first ncols columns, and K when a direction reads it
// the variants' kernels read G and K only (the other columns may hold anything: the update's tables)
__device__ __forceinline__ bool aligned_pair(const Chunk& c) {
  return ((c.row[FA_COL_G] | c.row[FA_COL_K]) & 15) == 0;
}

__device__ __forceinline__ bool aligned_with_k(const Chunk& c, int ncols, const Direction& dir) {
  return aligned(c, ncols) && (!dir.on || (c.row[FA_COL_K] & 15) == 0);
}

// the original weights, as the storage dtype holds them
template <int W, typename T>
__device__ __forceinline__ void restored(const T* w, const T* b, int64_t i, bool copy, float (&p)[W]) {
  load<W>(b, i, p);
  if (!copy) {
    float wv[W];
    load<W>(w, i, wv);
#pragma unroll
    for (int k = 0; k < W; ++k) p[k] = fa::restored<T>(wv[k], p[k], false);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) restore_kernel(const int64_t* tab, const int32_t* chunks, int64_t size,
                                                           bool copy) {
  const Chunk c = chunk_of(tab, chunks, blockIdx.x, size);
  T* w = col<T>(c, FA_COL_W);
  const T* b = col<T>(c, FA_COL_B);
  for_each_element<T>(c, aligned(c, 3), [&](auto width, int64_t i) {
    constexpr int W = decltype(width)::value;
    float p[W];
    restored<W>(w, b, i, copy, p);
    store<W>(w, i, p);
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) restore_sgd_kernel(const int64_t* tab, const int32_t* chunks,
                                                               const float* hyper, const double* sums,
                                                               const double* alpha, int64_t size, bool copy,
                                                               int mode) {
  const Chunk c = chunk_of(tab, chunks, blockIdx.x, size);
  const bool fresh = (c.flags & FA_FLAG_FRESH_STATE) != 0;
  const fa::SgdHyper h = fa::sgd_hyper(hyper_of(hyper, c));
  T* w = col<T>(c, FA_COL_W);
  const T* g = col<T>(c, FA_COL_G);
  const T* b = col<T>(c, FA_COL_B);
  T* mom = col<T>(c, FA_COL_S1);
  const T* k = col<T>(c, FA_COL_K);
  const Direction dir = direction_of(sums, alpha, mode);
  for_each_element<T>(c, aligned_with_k(c, 4, dir), [&](auto width, int64_t i) {
    constexpr int W = decltype(width)::value;
    float p[W], d[W], m[W] = {};
    restored<W>(w, b, i, copy, p);
    gradient<W>(g, k, i, dir, d);
    if (h.has_momentum && !fresh) load<W>(mom, i, m);  // a fresh buffer is set to d
#pragma unroll
    for (int j = 0; j < W; ++j) p[j] = fa::sgd_update<T>(h, fresh, p[j], d[j], m[j]);
    if (h.has_momentum) store<W>(mom, i, m);
    store<W>(w, i, p);
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) restore_adam_kernel(const int64_t* tab, const int32_t* chunks,
                                                                const float* hyper, const double* sums,
                                                                const double* alpha, int64_t size, bool copy,
                                                                int mode) {
  const Chunk c = chunk_of(tab, chunks, blockIdx.x, size);
  const fa::AdamHyper h = fa::adam_hyper(hyper_of(hyper, c));
  T* w = col<T>(c, FA_COL_W);
  const T* g = col<T>(c, FA_COL_G);
  const T* b = col<T>(c, FA_COL_B);
  T* m1 = col<T>(c, FA_COL_S1);
  T* m2 = col<T>(c, FA_COL_S2);
  T* vmax = col<T>(c, FA_COL_S3);
  const T* k = col<T>(c, FA_COL_K);
  const Direction dir = direction_of(sums, alpha, mode);
  for_each_element<T>(c, aligned_with_k(c, 6, dir), [&](auto width, int64_t i) {
    constexpr int W = decltype(width)::value;
    float p[W], d[W], m[W], v[W], vm[W] = {};
    restored<W>(w, b, i, copy, p);
    gradient<W>(g, k, i, dir, d);
    load<W>(m1, i, m);
    load<W>(m2, i, v);
    if (h.amsgrad) load<W>(vmax, i, vm);
#pragma unroll
    for (int j = 0; j < W; ++j) p[j] = fa::adam_update(h, p[j], d[j], m[j], v[j], vm[j]);
    store<W>(m1, i, m);  // stored rounded; the update used the fp32 values, as torch's fused Adam does
    store<W>(m2, i, v);
    if (h.amsgrad) store<W>(vmax, i, vm);
    store<W>(w, i, p);
  });
}

// --- Momentum-SAM (fastasam.MSAM) ------------------------------------------------------------------------------

// the block's partial into its slot; the last block to finish sums the partials in a fixed order into out (as
// sqnorm_kernel)
__device__ __forceinline__ void sum_partials(float part, int n_chunks, float* partials, int* counter, float* out) {
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = part;
    __threadfence();
    last = atomicAdd(counter, 1) == n_chunks - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  float total = 0.f;
  for (int i = threadIdx.x; i < n_chunks; i += blockDim.x) total += *(volatile float*)(partials + i);
  total = block_sum(total);
  if (threadIdx.x == 0) {
    *out = total;
    *counter = 0;
  }
}

// the columns a MSAM kernel reads: W, G, B (with copy), the state
__device__ __forceinline__ bool aligned_msam(const Chunk& c, bool copy, int state_cols) {
  int64_t bits = c.row[FA_COL_W] | c.row[FA_COL_G] | (copy ? c.row[FA_COL_B] : 0);
  for (int k = 0; k < state_cols; ++k) bits |= c.row[FA_COL_S1 + k];
  return (bits & 15) == 0;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) msam_sgd_kernel(const int64_t* tab, const int32_t* chunks,
                                                            const float* hyper, const float* opts,
                                                            const float* factors, int n_chunks, int64_t size,
                                                            float* partials, int* counter, float* out, bool copy) {
  const Chunk c = chunk_of(tab, chunks, blockIdx.x, size);
  const fa::SgdHyper h = fa::sgd_hyper(hyper_of(hyper, c));
  const float* opt = opts_of(opts, c);
  const bool adaptive = opt[FA_OPT_ADAPTIVE] != 0.f;
  const float eta = adaptive ? opt[FA_OPT_ETA] : 0.f;
  const float a = factors[(c.flags >> FA_OPT_SHIFT) & FA_SLOT_MASK];
  T* w = col<T>(c, FA_COL_W);
  const T* g = col<T>(c, FA_COL_G);
  const T* b = col<T>(c, FA_COL_B);
  T* mom = col<T>(c, FA_COL_S1);
  float acc = 0.f;
  for_each_element<T>(c, aligned_msam(c, copy, 1), [&](auto width, int64_t i) {
    constexpr int W = decltype(width)::value;
    float wt[W], gv[W], m[W], p[W] = {};
    load<W>(w, i, wt);
    load<W>(g, i, gv);
    load<W>(mom, i, m);
    if (copy) load<W>(b, i, p);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      p[j] = fa::msam_moved_back<T>(wt[j], p[j], a, m[j], copy);
      p[j] = fa::rounded<T>(fa::msam_sgd_update<T>(h, p[j], wt[j], gv[j], m[j]));
      const float x = adaptive ? (fabsf(p[j]) + eta) * m[j] : m[j];
      acc += x * x;
    }
    store<W>(mom, i, m);
    store<W>(w, i, p);
  });
  sum_partials(block_sum(acc), n_chunks, partials, counter, out);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) msam_adam_kernel(const int64_t* tab, const int32_t* chunks,
                                                             const float* hyper, const float* opts,
                                                             const float* factors, int n_chunks, int64_t size,
                                                             float* partials, int* counter, float* out, bool copy) {
  const Chunk c = chunk_of(tab, chunks, blockIdx.x, size);
  const fa::AdamHyper h = fa::adam_hyper(hyper_of(hyper, c));
  const float* opt = opts_of(opts, c);
  const bool adaptive = opt[FA_OPT_ADAPTIVE] != 0.f;
  const float eta = adaptive ? opt[FA_OPT_ETA] : 0.f;
  const float a = factors[(c.flags >> FA_OPT_SHIFT) & FA_SLOT_MASK];
  T* w = col<T>(c, FA_COL_W);
  const T* g = col<T>(c, FA_COL_G);
  const T* b = col<T>(c, FA_COL_B);
  T* m1 = col<T>(c, FA_COL_S1);
  T* m2 = col<T>(c, FA_COL_S2);
  T* vmax = col<T>(c, FA_COL_S3);
  float acc = 0.f;
  for_each_element<T>(c, aligned_msam(c, copy, h.amsgrad ? 3 : 2), [&](auto width, int64_t i) {
    constexpr int W = decltype(width)::value;
    float wt[W], gv[W], m[W], v[W], vm[W] = {}, p[W] = {};
    load<W>(w, i, wt);
    load<W>(g, i, gv);
    load<W>(m1, i, m);
    load<W>(m2, i, v);
    if (h.amsgrad) load<W>(vmax, i, vm);
    if (copy) load<W>(b, i, p);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      p[j] = fa::msam_moved_back<T>(wt[j], p[j], a, m[j], copy);
      p[j] = fa::rounded<T>(fa::msam_adam_update(h, p[j], wt[j], gv[j], m[j], v[j], vm[j]));
      const float ms = fa::rounded<T>(m[j]);
      const float x = adaptive ? (fabsf(p[j]) + eta) * ms : ms;
      acc += x * x;
    }
    store<W>(m1, i, m);  // stored rounded (the norm summed those values)
    store<W>(m2, i, v);
    if (h.amsgrad) store<W>(vmax, i, vm);
    store<W>(w, i, p);
  });
  sum_partials(block_sum(acc), n_chunks, partials, counter, out);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) msam_perturb_kernel(const int64_t* tab, const int32_t* chunks,
                                                                const float* opts, const float* sqnorm, int64_t size,
                                                                float* factors, bool copy) {
  const Chunk c = chunk_of(tab, chunks, blockIdx.x, size);
  const float* opt = opts_of(opts, c);
  const bool adaptive = opt[FA_OPT_ADAPTIVE] != 0.f;
  const float eta = adaptive ? opt[FA_OPT_ETA] : 0.f;
  const float a = fa::perturb_scale(*sqnorm, opt[FA_OPT_RHO], opt[FA_OPT_EPS]).scale;
  if (threadIdx.x == 0) factors[(c.flags >> FA_OPT_SHIFT) & FA_SLOT_MASK] = a;  // each block of a group: one value
  T* w = col<T>(c, FA_COL_W);
  const T* mom = col<T>(c, FA_COL_S1);
  T* b = col<T>(c, FA_COL_B);
  const bool vec = ((c.row[FA_COL_W] | c.row[FA_COL_S1] | (copy ? c.row[FA_COL_B] : 0)) & 15) == 0;
  for_each_element<T>(c, vec, [&](auto width, int64_t i) {
    constexpr int W = decltype(width)::value;
    float wv[W], m[W];
    load<W>(w, i, wv);
    load<W>(mom, i, m);
    if (copy) store<W>(b, i, wv);
#pragma unroll
    for (int j = 0; j < W; ++j) wv[j] = wv[j] - fa::msam_perturbation(wv[j], m[j], adaptive, eta, a);
    store<W>(w, i, wv);
  });
}

// --- LookSAM / GSAM (fastasam/_decompose.py): rows hold a gradient in G and the kept buffer in K -------------------

// the three sums over the block in a fixed order (a shared-memory tree); the results in thread 0
__device__ __forceinline__ void block_sum3(double (&s)[3]) {
  __shared__ double buf[3][kThreads];
#pragma unroll
  for (int j = 0; j < 3; ++j) buf[j][threadIdx.x] = s[j];
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.x) < half) {
#pragma unroll
      for (int j = 0; j < 3; ++j) buf[j][threadIdx.x] += buf[j][threadIdx.x + half];
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 3; ++j) s[j] = buf[j][0];
  __syncthreads();  // buf may be reused by a second call
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dots_kernel(const int64_t* tab, const int32_t* chunks, int n_chunks,
                                                        int64_t size, double* partials, int* counter, double* out) {
  const Chunk c = chunk_of(tab, chunks, blockIdx.x, size);
  const T* g = col<T>(c, FA_COL_G);
  const T* k = col<T>(c, FA_COL_K);
  double s[3] = {0.0, 0.0, 0.0};
  for_each_element<T>(c, aligned_pair(c), [&](auto width, int64_t i) {
    constexpr int W = decltype(width)::value;
    float gv[W], kv[W];
    load<W>(g, i, gv);
    load<W>(k, i, kv);
#pragma unroll
    for (int j = 0; j < W; ++j) {  // products rounded in fp32, summed in fp64
      s[0] += static_cast<double>(fa::mul_rn(gv[j], gv[j]));
      s[1] += static_cast<double>(fa::mul_rn(gv[j], kv[j]));
      s[2] += static_cast<double>(fa::mul_rn(kv[j], kv[j]));
    }
  });
  block_sum3(s);
  __shared__ bool last;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < 3; ++j) partials[3 * blockIdx.x + j] = s[j];
    __threadfence();
    last = atomicAdd(counter, 1) == n_chunks - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  double t[3] = {0.0, 0.0, 0.0};
  for (int i = threadIdx.x; i < n_chunks; i += blockDim.x) {
#pragma unroll
    for (int j = 0; j < 3; ++j) t[j] += *(volatile double*)(partials + 3 * i + j);
  }
  block_sum3(t);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < 3; ++j) out[j] = t[j];
    *counter = 0;
  }
}

template <typename T, int MODE>
__device__ __forceinline__ void combine(const int64_t* tab, const int32_t* chunks, const double* sums,
                                        const double* alpha, int64_t size) {
  const Chunk c = chunk_of(tab, chunks, blockIdx.x, size);
  const fa::Coefficients xy = fa::combine_coefficients<MODE>(sums, alpha);  // target <- x * target + y * other
  constexpr bool into_g = MODE == FA_COMBINE_LOOK_ONE || MODE == FA_COMBINE_GSAM;
  T* t = col<T>(c, into_g ? FA_COL_G : FA_COL_K);
  const T* o = col<T>(c, into_g ? FA_COL_K : FA_COL_G);
  for_each_element<T>(c, aligned_pair(c), [&](auto width, int64_t i) {
    constexpr int W = decltype(width)::value;
    float ov[W];
    load<W>(o, i, ov);
    if (MODE != FA_COMBINE_KEEP) {
      float tv[W];
      load<W>(t, i, tv);
#pragma unroll
      for (int j = 0; j < W; ++j) ov[j] = fa::combined(xy.x, tv[j], xy.y, ov[j]);  // each product rounded
    }
    store<W>(t, i, ov);
  });
}

// one kernel per mode (a template of one parameter, as FA_DISPATCH launches them)
#define FA_COMBINE_KERNEL(NAME, MODE)                                                                            \
  template <typename T>                                                                                          \
  __global__ void __launch_bounds__(kThreads) NAME(const int64_t* tab, const int32_t* chunks, const double* sums, \
                                                   const double* alpha, int64_t size) {                          \
    combine<T, MODE>(tab, chunks, sums, alpha, size);                                                            \
  }
FA_COMBINE_KERNEL(combine_kernel_keep, FA_COMBINE_KEEP)
FA_COMBINE_KERNEL(combine_kernel_look_full, FA_COMBINE_LOOK_FULL)
FA_COMBINE_KERNEL(combine_kernel_look_one, FA_COMBINE_LOOK_ONE)
FA_COMBINE_KERNEL(combine_kernel_gsam, FA_COMBINE_GSAM)

// dispatch on the storage dtype; an unknown dtype is a launch error, never a silent no-op

#ifndef FA_LAUNCH  // the CPU shim (csrc/cpu_shim) defines its own: the kernels then run on the CPU
#define FA_LAUNCH(KERNEL, blocks, threads, stream, ...) KERNEL<<<blocks, threads, 0, stream>>>(__VA_ARGS__)
#endif

#define FA_DISPATCH(KERNEL, ...)                                                                     \
  switch (dtype) {                                                                                   \
    case FA_FLOAT32: FA_LAUNCH(KERNEL<float>, blocks, kThreads, stream, __VA_ARGS__); break;          \
    case FA_FLOAT16: FA_LAUNCH(KERNEL<__half>, blocks, kThreads, stream, __VA_ARGS__); break;         \
    case FA_BFLOAT16: FA_LAUNCH(KERNEL<__nv_bfloat16>, blocks, kThreads, stream, __VA_ARGS__); break; \
    default: return static_cast<int>(cudaErrorInvalidValue);                                         \
  }                                                                                                  \
  return static_cast<int>(cudaGetLastError());

}  // namespace

extern "C" {

int fa_sqnorm(int dtype, const int64_t* rows, const int32_t* chunks, const float* opts, int count, int64_t chunk_size,
              float* partials, int* counter, float* out, cudaStream_t stream) {
  if (count <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const int blocks = count;
  FA_DISPATCH(sqnorm_kernel, rows, chunks, opts, count, chunk_size, partials, counter, out)
}

int fa_perturb(int dtype, const int64_t* rows, const int32_t* chunks, const float* opts, const float* sqnorm,
               int count, int64_t chunk_size, int copy, cudaStream_t stream) {
  if (count <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const int blocks = count;
  FA_DISPATCH(perturb_kernel, rows, chunks, opts, sqnorm, chunk_size, copy != 0)
}

int fa_restore(int dtype, const int64_t* rows, const int32_t* chunks, int count, int64_t chunk_size, int copy,
               cudaStream_t stream) {
  if (count <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const int blocks = count;
  FA_DISPATCH(restore_kernel, rows, chunks, chunk_size, copy != 0)
}

// every fused update's C entry point (FA_FUSED_UPDATES: <name>_kernel, launched as fa_<name>)
#define FA_DEFINE_UPDATE(NAME, WHAT)                                                                   \
  int fa_##NAME(FA_UPDATE_PARAMS) {                                                                    \
    if (count <= 0 || (mode != 0 && mode != FA_COMBINE_GSAM)) return static_cast<int>(cudaErrorInvalidValue); \
    const int blocks = count;                                                                          \
    FA_DISPATCH(NAME##_kernel, rows, chunks, hyper, sums, alpha, chunk_size, copy != 0, mode)          \
  }
FA_FUSED_UPDATES(FA_DEFINE_UPDATE)

int fa_dots(int dtype, const int64_t* rows, const int32_t* chunks, int count, int64_t chunk_size, double* partials,
            int* counter, double* out, cudaStream_t stream) {
  if (count <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const int blocks = count;
  FA_DISPATCH(dots_kernel, rows, chunks, count, chunk_size, partials, counter, out)
}

int fa_combine(int dtype, const int64_t* rows, const int32_t* chunks, const double* sums, const double* alpha,
               int count, int64_t chunk_size, int mode, cudaStream_t stream) {
  if (count <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const int blocks = count;
  switch (mode) {
    case FA_COMBINE_KEEP: { FA_DISPATCH(combine_kernel_keep, rows, chunks, sums, alpha, chunk_size) }
    case FA_COMBINE_LOOK_FULL: { FA_DISPATCH(combine_kernel_look_full, rows, chunks, sums, alpha, chunk_size) }
    case FA_COMBINE_LOOK_ONE: { FA_DISPATCH(combine_kernel_look_one, rows, chunks, sums, alpha, chunk_size) }
    case FA_COMBINE_GSAM: { FA_DISPATCH(combine_kernel_gsam, rows, chunks, sums, alpha, chunk_size) }
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

int fa_msam_sgd(int dtype, const int64_t* rows, const int32_t* chunks, const float* hyper, const float* opts,
                const float* factors, int count, int64_t chunk_size, float* partials, int* counter, float* out,
                int copy, cudaStream_t stream) {
  if (count <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const int blocks = count;
  FA_DISPATCH(msam_sgd_kernel, rows, chunks, hyper, opts, factors, count, chunk_size, partials, counter, out,
              copy != 0)
}

int fa_msam_adam(int dtype, const int64_t* rows, const int32_t* chunks, const float* hyper, const float* opts,
                 const float* factors, int count, int64_t chunk_size, float* partials, int* counter, float* out,
                 int copy, cudaStream_t stream) {
  if (count <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const int blocks = count;
  FA_DISPATCH(msam_adam_kernel, rows, chunks, hyper, opts, factors, count, chunk_size, partials, counter, out,
              copy != 0)
}

int fa_msam_perturb(int dtype, const int64_t* rows, const int32_t* chunks, const float* opts, const float* sqnorm,
                    int count, int64_t chunk_size, float* factors, int copy, cudaStream_t stream) {
  if (count <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const int blocks = count;
  FA_DISPATCH(msam_perturb_kernel, rows, chunks, opts, sqnorm, chunk_size, factors, copy != 0)
}

}  // extern "C"
