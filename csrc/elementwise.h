// fastasam's per-element formulas, written once: the CUDA kernels (multi_tensor.cu, also compiled for the CPU by the
// test shim) and the CPU kernels (cpu_kernels.cpp) include this header and differ only in how they walk memory.
//
// Every function takes and returns fp32 values (the storage dtype's values converted exactly); a value that the
// formula stores and then reads back is rounded to the storage dtype T once, with fa::rounded<T>, where the formula
// says so. The includer specialises fa::Storage<T> for its 16-bit types (CUDA: __half, __nv_bfloat16; CPU:
// c10::Half, c10::BFloat16), both converting float -> 16 bits round-to-nearest-even.
//
// No floating-point contraction: every product and sum rounds once, in the order written. Each includer is compiled
// so (nvcc -fmad=false, host compilers -ffp-contract=off); the _rn helpers below spell out the IEEE operations where
// a fast-math build would otherwise change them (division, square root) or where the order matters most.
#pragma once

#include <math.h>
#include <stdint.h>

#include "multi_tensor.h"  // the table layout: FA_NHYPER, FA_COMBINE_*

#ifdef __CUDACC__
#define FA_HD __host__ __device__
#define FA_INLINE __forceinline__
#elif defined(_MSC_VER)
#define FA_HD
#define FA_INLINE __forceinline
#else
#define FA_HD
#define FA_INLINE inline __attribute__((always_inline))
#endif

namespace fa {

// --- storage conversions and IEEE operations ------------------------------------------------------------------------

// T's conversions to and from fp32 (the includer specialises this for its 16-bit types): load(T) -> float is exact,
// store(float) -> T rounds to nearest even; exact(float) -> T (the CPU kernels') stores a value that is a T already.
template <typename T> struct Storage;
template <> struct Storage<float> {
  FA_HD static FA_INLINE float load(float x) { return x; }
  FA_HD static FA_INLINE float store(float x) { return x; }
  FA_HD static FA_INLINE float exact(float x) { return x; }
};

// x rounded to the storage dtype and back: the value the storage holds
template <typename T> FA_HD FA_INLINE float rounded(float x) { return Storage<T>::load(Storage<T>::store(x)); }

FA_HD FA_INLINE float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FA_HD FA_INLINE float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FA_HD FA_INLINE float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FA_HD FA_INLINE float sqrt_rn(float x) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(x);
#else
  return sqrtf(x);
#endif
}

// --- phase 1: the squared norm --------------------------------------------------------------------------------------

// T_w * g, whose square the norm sums: T_w = |w| + eta for adaptive groups; g itself otherwise
FA_HD FA_INLINE float scaled_grad(float g, float w, bool adaptive, float eta) {
  return adaptive ? g * (fabsf(w) + eta) : g;
}

// --- phase 2: the perturbation --------------------------------------------------------------------------------------

// The launch-wide factor of e: rho * (1 / (sqrt(sqnorm) + eps)), in the order of torch's rho / (norm + eps); 0 when
// the norm is 0 or not finite. finite: the norm is finite (a non-finite one means inf/NaN in g).
struct PerturbScale {
  float scale;
  bool finite;
};
FA_HD FA_INLINE PerturbScale perturb_scale(float sqnorm, float rho, float eps) {
  const float norm = sqrt_rn(sqnorm);
  const bool finite = norm < INFINITY;  // NaN compares false
  const bool ok = finite && norm > 0.f;
  const float inv = div_rn(1.f, ok ? add_rn(norm, eps) : 1.f);
  return {ok ? mul_rn(inv, rho) : 0.f, finite};
}

// e = T_w^2 * g * scale (adaptive: T_w * (T_w * g) * scale; else g * scale), exactly 0 when the norm is not finite
// (never NaN). With the subtract restore (!copy) the buffer stores e, so e is rounded to T once and that value is
// added to w.
template <typename T>
FA_HD FA_INLINE float perturbation(float w, float g, bool adaptive, float eta, float scale, bool finite, bool copy) {
  const float t = adaptive ? fabsf(w) + eta : 1.f;
  float e = adaptive ? t * (t * g) * scale : g * scale;
  e = finite ? e : 0.f;
  return copy ? e : rounded<T>(e);
}

// --- phase 3: restore, alone or fused with the base optimizer's update ----------------------------------------------

// the original weight as the storage holds it: the buffer (copy), or w - e rounded to T (subtract)
template <typename T> FA_HD FA_INLINE float restored(float w, float b, bool copy) {
  return copy ? b : rounded<T>(w - b);
}

// num / den, 0 where den is 0 (fp64)
FA_HD FA_INLINE double ratio(double num, double den) { return den > 0.0 ? num / den : 0.0; }

// x * a + y * b, each product rounded, then the sum (GSAM's and LookSAM's combinations)
FA_HD FA_INLINE float combined(float x, float a, float y, float b) { return add_rn(mul_rn(x, a), mul_rn(y, b)); }

// The update's gradient x * G + y * K: (1, 0) without a direction (mode 0); GSAM's (mode FA_COMBINE_GSAM):
// x = 1 + alpha * sums[1] / sums[0], y = -alpha, in fp64, rounded once to fp32.
struct Direction {
  float x = 1.f, y = 0.f;
  bool on = false;
};
FA_HD FA_INLINE Direction direction_of(const double* sums, const double* alpha, int mode) {
  Direction d;
  if (mode == FA_COMBINE_GSAM) {
    d.x = static_cast<float>(1.0 + *alpha * ratio(sums[1], sums[0]));
    d.y = static_cast<float>(-*alpha);
    d.on = true;
  }
  return d;
}

// combine's coefficients (target <- x * target + y * other) for MODE (FA_COMBINE_*), from the sums (gg, gb, bb) and
// alpha in fp64, rounded once to fp32 (a ratio whose denominator is 0 is 0)
struct Coefficients {
  float x, y;
};
template <int MODE> FA_HD FA_INLINE Coefficients combine_coefficients(const double* sums, const double* alpha) {
  if (MODE == FA_COMBINE_GSAM) {
    const Direction d = direction_of(sums, alpha, MODE);
    return {d.x, d.y};
  }
  double x = 1.0, y = 1.0;
  if (MODE == FA_COMBINE_LOOK_FULL) {
    x = -ratio(sums[1], sums[2]);
  } else if (MODE == FA_COMBINE_LOOK_ONE) {
    y = *alpha * ratio(sqrt(sums[0]), sqrt(sums[2]));
  }
  return {static_cast<float>(x), static_cast<float>(y)};
}

// A fused update's hyper-parameters are one row of the hyper table, combined on the host: its struct's fields in
// order are the row's columns, and the Python class that writes the row (fastasam/backends/_updates.py: `columns`)
// names them alike (tests/test_signatures.py compares the two). A flag is a float column, 0 or 1.

// torch.optim.SGD's hyper-parameters. nesterov and maximize stay floats tested with != 0: a condition of the
// float's width lets a CPU compiler vectorise the loop around the formula for 16-bit storage too, where a bool does
// not (GCC 12).
struct SgdHyper {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool has_momentum;
  float nesterov, maximize;
};
FA_HD FA_INLINE SgdHyper sgd_hyper(const float* h) {
  return {h[0], h[1], h[2], h[3], h[4] != 0.f, h[5], h[6]};
}

// torch.optim.SGD's update of one element: p the restored weight, d the update's gradient; m the momentum buffer's
// value (ignored when fresh: torch's first step sets the buffer to d), set to its new value rounded to T (as
// stored, and used so). Returns the new weight.
template <typename T>
FA_HD FA_INLINE float sgd_update(const SgdHyper& h, bool fresh, float p, float d, float& m) {
  if (h.maximize != 0.f) d = -d;
  if (h.weight_decay != 0.f) d += h.weight_decay * p;
  if (h.has_momentum) {
    m = rounded<T>(fresh ? d : m * h.momentum + h.one_minus_dampening * d);
    d = h.nesterov != 0.f ? d + h.momentum * m : m;
  }
  return p - h.lr * d;
}

// torch.optim.Adam/AdamW's hyper-parameters (lerp_weight = 1 - beta1; step size and bias corrections from the host)
struct AdamHyper {
  float lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay_factor, step_size, bc2_sqrt;
  bool amsgrad;
  float maximize;  // 0 or 1 (see SgdHyper)
};
FA_HD FA_INLINE AdamHyper adam_hyper(const float* h) {
  return {h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8] != 0.f, h[9]};
}

// torch.optim.Adam/AdamW's update of one element: p the restored weight, d the update's gradient; m, v the moments
// (set to their new fp32 values: stored rounded, used unrounded, as torch's fused Adam); vmax (amsgrad) the
// running maximum of v, set to max(vmax, v). Returns the new weight.
FA_HD FA_INLINE float adam_update(const AdamHyper& h, float p, float d, float& m, float& v, float& vmax) {
  if (h.maximize != 0.f) d = -d;
  if (h.decay_factor != 1.f) p *= h.decay_factor;        // AdamW: p *= 1 - lr * weight_decay
  if (h.weight_decay != 0.f) d += h.weight_decay * p;   // Adam: the L2 penalty in the gradient
  // torch's lerp(m, d, 1 - beta1), both branches as torch computes them
  const float w = h.lerp_weight;
  m = w < 0.5f ? m + w * (d - m) : d - (d - m) * (1.f - w);
  v = v * h.beta2 + h.one_minus_beta2 * d * d;
  if (h.amsgrad) vmax = fmaxf(vmax, v);
  const float denom = div_rn(sqrt_rn(h.amsgrad ? vmax : v), h.bc2_sqrt) + h.eps;
  return p - h.step_size * div_rn(m, denom);
}

// --- Momentum-SAM (fastasam.MSAM): move back, the authors' update, the new perturbation along the momentum ---------
//
// Between steps the weights sit at w~ = w - a * T^2 * m (a: the group's factor, T = |w| + eta for adaptive tensors,
// else 1). A step moves back (w = w~ + a * m, or the kept copy of w), applies the base optimizer's update with the
// gradient g taken at w~ (the weight decay of SGD and of Adam's L2 at w~; AdamW's decoupled decay after the update:
// the authors' order), sums the new (T * m)^2, then perturbs with a = rho / (sqrt(sum) + eps) (perturb_scale).

// the weight moved back from w~: the kept copy (copy), or w~ + a * m rounded to T
template <typename T> FA_HD FA_INLINE float msam_moved_back(float w_t, float b, float a, float m, bool copy) {
  return copy ? b : rounded<T>(w_t + a * m);
}

// The authors' SGD step (momentum, no dampening, not nesterov): d = g + weight_decay * w~; m = momentum * m + d,
// rounded to T (as stored, and used so). Returns the new weight p - lr * m.
template <typename T>
FA_HD FA_INLINE float msam_sgd_update(const SgdHyper& h, float p, float w_t, float g, float& m) {
  float d = h.maximize != 0.f ? -g : g;
  if (h.weight_decay != 0.f) d += h.weight_decay * w_t;
  m = rounded<T>(m * h.momentum + h.one_minus_dampening * d);
  return p - h.lr * m;
}

// The authors' AdamW step (decay_factor = 1 - lr * weight_decay, after the update) or Adam's (L2: weight_decay * w~
// in the gradient): m, v (, vmax) as adam_update (stored rounded, used unrounded). Returns the new weight.
FA_HD FA_INLINE float msam_adam_update(const AdamHyper& h, float p, float w_t, float g, float& m, float& v,
                                       float& vmax) {
  float d = h.maximize != 0.f ? -g : g;
  if (h.weight_decay != 0.f) d += h.weight_decay * w_t;
  const float w = h.lerp_weight;
  m = w < 0.5f ? m + w * (d - m) : d - (d - m) * (1.f - w);
  v = v * h.beta2 + h.one_minus_beta2 * d * d;
  if (h.amsgrad) vmax = fmaxf(vmax, v);
  const float denom = div_rn(sqrt_rn(h.amsgrad ? vmax : v), h.bc2_sqrt) + h.eps;
  float out = p - h.step_size * div_rn(m, denom);
  if (h.decay_factor != 1.f) out = out * h.decay_factor;
  return out;
}

// the perturbation along the momentum, subtracted from w: T^2 * m * a (adaptive: T * (T * m) * a; else m * a)
FA_HD FA_INLINE float msam_perturbation(float w, float m, bool adaptive, float eta, float a) {
  const float t = adaptive ? fabsf(w) + eta : 1.f;
  return adaptive ? t * (t * m) * a : m * a;
}

}  // namespace fa

// The fused restore + update kernels, one X(name, what) per base optimizer: `name` is the CUDA kernel
// <name>_kernel (multi_tensor.cu) behind fa_<name>, the CPU function <name> (cpu_loops.h), the op
// torch.ops.fastasam.<name> and the `kernel` of the Python class that plans it (fastasam/backends/_updates.py,
// whose FUSED_UPDATES lists the same, in this order); `what` names it in errors. binding.cpp, cpu_kernels.cpp and
// multi_tensor.cu register and declare every entry from this list.
#define FA_FUSED_UPDATES(X)           \
  X(restore_sgd, "restore + SGD")     \
  X(restore_adam, "restore + Adam")
