// fastasam._cpu: the multi-tensor kernels for CPU tensors (the ``cpu`` backend, fastasam/backends/cpu.py).
//
// The same tables (multi_tensor.h) and the same per-element formulas (elementwise.h) as the CUDA kernels; only the
// walk over memory differs. Each launch covers `count` chunks of the chunks table: a chunk is a run of at most
// chunk_size elements of one tensor, processed by one thread in one pass over each of its columns (a plain loop over
// contiguous memory, specialised on the launch's options so the compiler vectorises it). The chunks are spread over
// PyTorch's intra-op threads (at::parallel_for) in contiguous runs of about equal element counts.
//
// Reductions (the squared norm, the dots) are deterministic whatever the thread count: each chunk's partial sum is
// computed by one thread in a fixed order (fp32 products summed in fp64 over interleaved lanes, the lanes then
// added in a fixed tree), and the partials are added in chunk order.
//
// Compiled with -ffp-contract=off: no multiply-add contraction, as for the CUDA kernels (see elementwise.h).
// Arguments are the tables' addresses (int64), so a bound launch pays one Python call; the GIL is released while the
// kernel runs.
#include <pybind11/pybind11.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define FA_LAYOUT_ONLY
#include "elementwise.h"

namespace py = pybind11;

#ifdef _MSC_VER
#define __restrict__ __restrict
#endif

// --- fp16 / bf16 <-> fp32: c10's results (round to nearest even; NaN stays NaN), written branch-free on integers and
// exact float operations so that the kernels' loops vectorise (c10::Half's own conversion does not, here)
namespace convert {

FA_INLINE uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
FA_INLINE float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

FA_INLINE float bf16_to_float(uint16_t h) { return from_bits(static_cast<uint32_t>(h) << 16); }

// the bf16 whose value f is (f a bf16 value already: its low 16 bits are 0)
FA_INLINE uint16_t exact_bf16(float f) { return static_cast<uint16_t>(bits(f) >> 16); }

FA_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);  // NaN: c10's quiet NaN
}

// the fp16 <-> fp32 conversions of FP16 (Maratos), as c10 writes them without F16C
FA_INLINE float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = from_bits((two_w >> 4) + (0xE0u << 23)) * from_bits(0x7800000u);  // * 2^-112
  const float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t small = 0u - static_cast<uint32_t>(two_w < (1u << 27));  // all ones: a subnormal (or zero) half
  return from_bits(sign | (bits(denormalized) & small) | (bits(normalized) & ~small));
}

FA_INLINE uint16_t float_to_half(float f) {
  float base = (fabsf(f) * from_bits(239u << 23)) * from_bits(17u << 23);  // * 2^112 * 2^-110
  const uint32_t w = bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits(base);
  const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

}  // namespace convert

namespace fa {
template <> struct Storage<c10::Half> {
  static FA_INLINE float load(c10::Half x) { return convert::half_to_float(x.x); }
  static FA_INLINE c10::Half store(float x) { return c10::Half(convert::float_to_half(x), c10::Half::from_bits()); }
  static FA_INLINE c10::Half exact(float x) { return store(x); }
};
template <> struct Storage<c10::BFloat16> {
  static FA_INLINE float load(c10::BFloat16 x) { return convert::bf16_to_float(x.x); }
  static FA_INLINE c10::BFloat16 store(float x) {
    return c10::BFloat16(convert::float_to_bf16(x), c10::BFloat16::from_bits());
  }
  static FA_INLINE c10::BFloat16 exact(float x) {
    return c10::BFloat16(convert::exact_bf16(x), c10::BFloat16::from_bits());
  }
};
}  // namespace fa

// The loops, compiled once for the baseline instruction set of the build and, on x86-64 with GCC, twice more: for
// AVX2 + F16C (the conversions and 16-bit loads of bf16/fp16 storage vectorise 8 wide there, not with SSE2 alone) and
// for AVX-512 (F, BW, VL, DQ) with 512-bit vectors preferred (16 wide: half the instructions per element, which is
// what the 16-bit loops, bound by their conversions, are short of). All are the same C++ under -ffp-contract=off: the
// same operations in the same order, so the same results to the bit (the tests compare them); which one runs is
// decided once, from the CPU, when the module loads.
namespace {
#define FA_CPU_NS baseline
#include "cpu_loops.h"
#undef FA_CPU_NS
}  // namespace

// FA_CPU_BASELINE_ONLY: the baseline build alone (the tests' builds of planted bugs, which do not need both)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FA_CPU_BASELINE_ONLY)
#define FA_CPU_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
namespace {
#define FA_CPU_NS avx2
#define FA_CPU_AVX2_LOOPS 1  // (the pragma does not define __AVX2__ in C++)
#include "cpu_loops.h"
#undef FA_CPU_AVX2_LOOPS
#undef FA_CPU_NS
}  // namespace
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,prefer-vector-width=512")
namespace {
#define FA_CPU_NS avx512
#define FA_CPU_AVX512_LOOPS 1
#include "cpu_loops.h"
#undef FA_CPU_AVX512_LOOPS
#undef FA_CPU_NS
}  // namespace
#pragma GCC pop_options
#else
#define FA_CPU_AVX2 0
#endif

namespace {

// one instruction set's kernels
// (the fused updates: one member each, from FA_FUSED_UPDATES, after the other kernels)
#define FA_UPDATE_MEMBER(NAME, WHAT) decltype(&baseline::NAME) NAME;
struct Kernels {
  const char* isa;
  decltype(&baseline::sqnorm) sqnorm;
  decltype(&baseline::perturb) perturb;
  decltype(&baseline::restore) restore;
  decltype(&baseline::dots) dots;
  decltype(&baseline::combine) combine;
  decltype(&baseline::msam_sgd) msam_sgd;
  decltype(&baseline::msam_adam) msam_adam;
  decltype(&baseline::msam_perturb) msam_perturb;
  FA_FUSED_UPDATES(FA_UPDATE_MEMBER)
};
#define FA_UPDATE_IN_baseline(NAME, WHAT) , &baseline::NAME
#define FA_UPDATE_IN_avx2(NAME, WHAT) , &avx2::NAME
#define FA_UPDATE_IN_avx512(NAME, WHAT) , &avx512::NAME
#define FA_KERNELS(NS) \
  Kernels { #NS, &NS::sqnorm, &NS::perturb, &NS::restore, &NS::dots, &NS::combine, &NS::msam_sgd, &NS::msam_adam, \
            &NS::msam_perturb FA_FUSED_UPDATES(FA_UPDATE_IN_##NS) }

// the builds this CPU runs, the baseline first and the widest last
std::vector<Kernels> supported_kernels() {
  std::vector<Kernels> out{FA_KERNELS(baseline)};
#if FA_CPU_AVX2
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
    out.push_back(FA_KERNELS(avx2));
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      out.push_back(FA_KERNELS(avx512));
    }
  }
#endif
  return out;
}

void define_kernels(py::module_& m, const Kernels& k) {
  m.def("sqnorm", k.sqnorm, py::arg("dtype"), py::arg("rows"), py::arg("chunks"), py::arg("opts"), py::arg("count"),
        py::arg("chunk_size"), py::arg("out"));
  m.def("perturb", k.perturb, py::arg("dtype"), py::arg("rows"), py::arg("chunks"), py::arg("opts"),
        py::arg("sqnorm"), py::arg("count"), py::arg("chunk_size"), py::arg("copy"));
  m.def("restore", k.restore, py::arg("dtype"), py::arg("rows"), py::arg("chunks"), py::arg("count"),
        py::arg("chunk_size"), py::arg("copy"));
#define FA_UPDATE_DEF(NAME, WHAT)                                                                              \
  m.def(#NAME, k.NAME, py::arg("dtype"), py::arg("rows"), py::arg("chunks"), py::arg("hyper"), py::arg("sums"), \
        py::arg("alpha"), py::arg("count"), py::arg("chunk_size"), py::arg("copy"), py::arg("mode"));
  FA_FUSED_UPDATES(FA_UPDATE_DEF)
  m.def("dots", k.dots, py::arg("dtype"), py::arg("rows"), py::arg("chunks"), py::arg("count"), py::arg("chunk_size"),
        py::arg("out"));
  m.def("combine", k.combine, py::arg("dtype"), py::arg("rows"), py::arg("chunks"), py::arg("sums"), py::arg("alpha"),
        py::arg("count"), py::arg("chunk_size"), py::arg("mode"));
#define FA_MSAM_UPDATE_DEF(NAME)                                                                                 \
  m.def(#NAME, k.NAME, py::arg("dtype"), py::arg("rows"), py::arg("chunks"), py::arg("hyper"), py::arg("opts"),   \
        py::arg("factors"), py::arg("count"), py::arg("chunk_size"), py::arg("out"), py::arg("copy"));
  FA_MSAM_UPDATE_DEF(msam_sgd)
  FA_MSAM_UPDATE_DEF(msam_adam)
  m.def("msam_perturb", k.msam_perturb, py::arg("dtype"), py::arg("rows"), py::arg("chunks"), py::arg("opts"),
        py::arg("sqnorm"), py::arg("count"), py::arg("chunk_size"), py::arg("factors"), py::arg("copy"));
  m.attr("isa") = k.isa;
}

}  // namespace

// TORCH_EXTENSION_NAME: _cpu (setup.py); the tests build variants under other names. The module's functions are the
// kernels of the widest instruction set this CPU runs (``isa``); a submodule per build this CPU runs (``baseline``,
// and where compiled and supported ``avx2`` and ``avx512``) holds that build's, for the tests; ``isas`` names them.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastasam's multi-tensor kernels for CPU tensors (the cpu backend); arguments are table addresses";
  const std::vector<Kernels> builds = supported_kernels();
  define_kernels(m, builds.back());
  py::tuple isas(builds.size());
  for (size_t i = 0; i < builds.size(); ++i) {
    auto sub = m.def_submodule(builds[i].isa, "the kernels of one instruction set's build");
    define_kernels(sub, builds[i]);
    isas[i] = builds[i].isa;
  }
  m.attr("isas") = isas;
  m.attr("openmp") = py::bool_(
#ifdef _OPENMP
      true
#else
      false
#endif
  );
}
