// fastasam multi-tensor CUDA kernels: the C interface (no PyTorch types; see binding.cpp for the torch.library ops).
//
// A bucket of tensors of one storage dtype is described by two device tables built by the host
// (fastasam/backends/_multi_tensor.py), the same tables the Triton kernels read:
//   tab    int64[N][FA_NCOL]  per tensor: addresses of the parameter, gradient, restore buffer and up to three
//                             optimizer-state tensors, the element count and a flags word;
//   chunks int32[C][2]        (tensor row, chunk number): block b handles elements
//                             [chunk * chunk_size, min((chunk + 1) * chunk_size, numel)) of its tensor.
// One launch per phase covers every tensor. Math is fp32 for fp32/fp16/bf16 storage; every store rounds once.
// Each function returns the cudaError_t of the launch (0 on success).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

// table layout: must equal fastasam/backends/_multi_tensor.py (tests/test_cuda_backend.py checks it)
#define FA_COL_W 0
#define FA_COL_G 1
#define FA_COL_B 2
#define FA_COL_S1 3
#define FA_COL_S2 4
#define FA_COL_S3 5
#define FA_COL_NUMEL 6
#define FA_COL_FLAGS 7
#define FA_NCOL 8
#define FA_FLAG_ADAPTIVE 1
#define FA_FLAG_FRESH_STATE 2
#define FA_SCALE_SHIFT 8

// storage dtypes
#define FA_FLOAT32 0
#define FA_FLOAT16 1
#define FA_BFLOAT16 2

#ifdef __cplusplus
extern "C" {
#endif

// out[0] = sum over all rows of sum((T_w * g)^2), T_w = |w| + etas[row] for adaptive rows, else 1.
// Deterministic: per-block partials, the last block to finish (int counter, reset to 0 afterwards) sums them in a
// fixed order. partials: float[n_chunks]; counter: int[1], zero before the first launch.
int fa_sqnorm(int dtype, const int64_t* tab, const float* etas, const int32_t* chunks, int n_chunks,
              int64_t chunk_size, float* partials, int* counter, float* out, cudaStream_t stream);

// w <- w + e, e = T_w^2 * g * scales[flags >> FA_SCALE_SHIFT], e = 0 unless *finite; the buffer gets w (copy) or e.
int fa_perturb(int dtype, const int64_t* tab, const float* etas, const int32_t* chunks, int n_chunks,
               int64_t chunk_size, const float* scales, const bool* finite, int copy, cudaStream_t stream);

// w <- buffer (copy) or w - buffer.
int fa_restore(int dtype, const int64_t* tab, const int32_t* chunks, int n_chunks, int64_t chunk_size, int copy,
               cudaStream_t stream);

// restore, then torch.optim.SGD's update (chunks [first, first + count)); S1 = momentum buffer, flag
// FA_FLAG_FRESH_STATE: the buffer is new (torch's first step sets it to d_p).
int fa_restore_sgd(int dtype, const int64_t* tab, const int32_t* chunks, int first, int count, int64_t chunk_size,
                   float lr, float momentum, float dampening, float weight_decay, int copy, int has_momentum,
                   int nesterov, int maximize, cudaStream_t stream);

// restore, then torch.optim.Adam/AdamW's update; S1 exp_avg, S2 exp_avg_sq, S3 max_exp_avg_sq (amsgrad).
// step_size = lr / (1 - beta1^step), bc2_sqrt = sqrt(1 - beta2^step), computed by the host.
int fa_restore_adam(int dtype, const int64_t* tab, const int32_t* chunks, int first, int count, int64_t chunk_size,
                    float lr, float beta1, float beta2, float eps, float weight_decay, float step_size,
                    float bc2_sqrt, int copy, int decoupled, int amsgrad, int maximize, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
