// fastasam multi-tensor CUDA kernels: the C interface (no PyTorch types; see binding.cpp for the torch.library ops).
//
// A bucket of tensors of one storage dtype is described by small device tables built by the host
// (fastasam/backends/_multi_tensor.py; layout in fastasam/backends/_layout.py), the same tables the Triton kernels
// read:
//   rows   int64[N][FA_NCOL]     per tensor: addresses of the parameter, gradient, restore buffer and up to three
//                                optimizer-state tensors, the element count and a flags word (FA_FLAG_FRESH_STATE;
//                                bits FA_OPT_SHIFT..: the tensor's row in opts; bits FA_HYPER_SHIFT..: its row in hyper);
//   chunks int32[C][2]           (tensor row, chunk number): block b handles elements
//                                [chunk * chunk_size, min((chunk + 1) * chunk_size, numel)) of its tensor;
//   opts   float[G][FA_NOPT]     per parameter group: eta, rho, adaptive (0/1), the norm's eps;
//   hyper  float[H][FA_NHYPER]   per base-optimizer group: the update's hyper-parameters (elementwise.h),
//                                combined on the host in double precision as torch.optim combines them.
// One launch per phase covers `count` chunks (the first `count` rows of `chunks`). Math is fp32 for fp32/fp16/bf16
// storage; every store rounds once. Each function returns the cudaError_t of the launch (0 on success).
#pragma once

#include <stdint.h>
#ifndef FA_LAYOUT_ONLY  // defined by cpu_kernels.cpp, which reads the table layout only
#include <cuda_runtime.h>
#endif

// table layout: must equal fastasam/backends/_layout.py (tests/test_cuda_backend.py checks it)
#define FA_COL_W 0
#define FA_COL_G 1
#define FA_COL_B 2
#define FA_COL_S1 3
#define FA_COL_S2 4
#define FA_COL_S3 5
#define FA_COL_NUMEL 6
#define FA_COL_FLAGS 7
#define FA_COL_K 8
#define FA_NCOL 9
#define FA_FLAG_FRESH_STATE 2
#define FA_OPT_SHIFT 8
#define FA_HYPER_SHIFT 32
#define FA_SLOT_MASK 16777215
// flags bits FA_ALIGN_SHIFT..+6: the host marks each address column 16-byte aligned (for the Triton kernels; these
// kernels check the addresses themselves)
#define FA_ALIGN_SHIFT 56
#define FA_OPT_ETA 0
#define FA_OPT_RHO 1
#define FA_OPT_ADAPTIVE 2
#define FA_OPT_EPS 3
#define FA_NOPT 4
#define FA_NHYPER 10  // the hyper table's width: room for the widest update's row (elementwise.h)
#define FA_COMBINE_KEEP 0
#define FA_COMBINE_LOOK_FULL 1
#define FA_COMBINE_LOOK_ONE 2
#define FA_COMBINE_GSAM 3

// storage dtypes
#define FA_FLOAT32 0
#define FA_FLOAT16 1
#define FA_BFLOAT16 2

#ifndef FA_LAYOUT_ONLY
#ifdef __cplusplus
extern "C" {
#endif

// out[0] = sum over the chunks of sum((T_w * g)^2), T_w = |w| + eta for adaptive groups, else 1.
// Deterministic: per-block partials, the last block to finish (int counter, reset to 0 afterwards) sums them in a
// fixed order. partials: float[count]; counter: int[1], zero before the first launch.
int fa_sqnorm(int dtype, const int64_t* rows, const int32_t* chunks, const float* opts, int count, int64_t chunk_size,
              float* partials, int* counter, float* out, cudaStream_t stream);

// w <- w + e, e = T_w^2 * g * scale with scale = rho * (1 / (sqrt(*sqnorm) + eps)) (0 when that norm is 0 or not
// finite; e = 0 when it is not finite); the buffer gets w (copy) or e.
int fa_perturb(int dtype, const int64_t* rows, const int32_t* chunks, const float* opts, const float* sqnorm,
               int count, int64_t chunk_size, int copy, cudaStream_t stream);

// w <- buffer (copy) or w - buffer.
int fa_restore(int dtype, const int64_t* rows, const int32_t* chunks, int count, int64_t chunk_size, int copy,
               cudaStream_t stream);

// The fused restore + updates (restore, then a base optimizer's update), one per entry of FA_FUSED_UPDATES
// (elementwise.h), all of one signature: int fa_restore_<name>(FA_UPDATE_PARAMS), declared with that list. The
// update's gradient: G (mode 0), or with mode FA_COMBINE_GSAM GSAM's direction x * G + y * K with
// x = 1 + alpha * sums[1] / sums[0] (0 where sums[0] is 0), y = -alpha (as fa_combine; sums and alpha are read only
// in that mode); hyper: the update's hyper-parameters, one row per base-optimizer group.
#define FA_UPDATE_PARAMS                                                                                           \
  int dtype, const int64_t *rows, const int32_t *chunks, const float *hyper, const double *sums, const double *alpha, \
      int count, int64_t chunk_size, int copy, int mode, cudaStream_t stream
// declares one: FA_FUSED_UPDATES(FA_DECLARE_UPDATE), inside extern "C", where elementwise.h is included
#define FA_DECLARE_UPDATE(NAME, WHAT) int fa_##NAME(FA_UPDATE_PARAMS);

// LookSAM / GSAM (fastasam/_decompose.py): rows hold a gradient in G and the variant's kept buffer in K (the
// other columns are not read: the step plan's tables serve as they are). out[0..2] = sums over the chunks of
// (G*G, G*K, K*K): products in fp32, sums in fp64; deterministic as fa_sqnorm.
// partials: double[3 * count]; counter: int[1], zero before the first launch.
int fa_dots(int dtype, const int64_t* rows, const int32_t* chunks, int count, int64_t chunk_size, double* partials,
            int* counter, double* out, cudaStream_t stream);

// target <- x * target + y * other (mode FA_COMBINE_*: which column is the target, and x, y from sums[0..2] and
// *alpha in fp64, rounded once to fp32; a ratio whose denominator is 0 is 0); FA_COMBINE_KEEP copies G into K.
int fa_combine(int dtype, const int64_t* rows, const int32_t* chunks, const double* sums, const double* alpha,
               int count, int64_t chunk_size, int mode, cudaStream_t stream);

// Momentum-SAM (fastasam.MSAM): rows hold W (at w~), G, B (the kept copy of w, with copy), S1 (SGD's momentum or
// Adam's exp_avg), S2, S3 (exp_avg_sq, max_exp_avg_sq); factors[group] the factor a of the perturbation in place.
// fa_msam_sgd / fa_msam_adam: move back (w~ + a * m, or the copy), the authors' update with the gradient taken at
// w~ (hyper: the fused SGD / Adam updates' rows), out[0] = the new sum of (T * m)^2 (deterministic as fa_sqnorm).
// fa_msam_perturb: w~ = w - a * T^2 * m with a = rho * (1 / (sqrt(*sqnorm) + eps)) (0 when that norm is 0 or not
// finite), written into factors[group]; with copy the buffer gets w first.
int fa_msam_sgd(int dtype, const int64_t* rows, const int32_t* chunks, const float* hyper, const float* opts,
                const float* factors, int count, int64_t chunk_size, float* partials, int* counter, float* out,
                int copy, cudaStream_t stream);
int fa_msam_adam(int dtype, const int64_t* rows, const int32_t* chunks, const float* hyper, const float* opts,
                 const float* factors, int count, int64_t chunk_size, float* partials, int* counter, float* out,
                 int copy, cudaStream_t stream);
int fa_msam_perturb(int dtype, const int64_t* rows, const int32_t* chunks, const float* opts, const float* sqnorm,
                    int count, int64_t chunk_size, float* factors, int copy, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif  // FA_LAYOUT_ONLY
