// PyTorch binding of the multi-tensor kernels (multi_tensor.cu): checks the arguments, picks the device and the
// current stream, launches, and turns a launch error into a Python exception. Registered as torch.library ops
// (torch.ops.fastasam.*), so torch.compile and CUDA graphs see one op per launch.
//
// The kernels write through the addresses in the rows table, which PyTorch cannot see; the schemas mark `rows` as
// mutated so that no graph pass drops or reorders a launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "multi_tensor.h"
#include "elementwise.h"  // FA_FUSED_UPDATES

extern "C" {
FA_FUSED_UPDATES(FA_DECLARE_UPDATE)
}

namespace {

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& tab) {
  TORCH_CHECK(t.is_cuda(), "fastasam: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == tab.device(), "fastasam: ", name, " is on ", t.device(), " but the table on ",
              tab.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fastasam: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastasam: ", name, " must be contiguous");
}

void check_tables(const at::Tensor& rows, const at::Tensor& chunks, int64_t count, int64_t chunk_size,
                  int64_t dtype) {
  check(rows, "rows", at::kLong, rows);
  check(chunks, "chunks", at::kInt, rows);
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == FA_NCOL, "fastasam: rows must be [N, ", FA_NCOL, "]");
  TORCH_CHECK(chunks.dim() == 2 && chunks.size(1) == 2, "fastasam: chunks must be [C, 2]");
  TORCH_CHECK(count > 0 && count <= chunks.size(0) && count <= INT32_MAX, "fastasam: count=", count,
              " is outside the ", chunks.size(0), " chunks");
  // a chunk starts at a multiple of chunk_size elements; 8 elements keep 16-byte aligned rows aligned in every dtype
  TORCH_CHECK(chunk_size > 0 && chunk_size % 8 == 0, "fastasam: chunk_size=", chunk_size,
              " must be a positive multiple of 8");
  TORCH_CHECK(dtype == FA_FLOAT32 || dtype == FA_FLOAT16 || dtype == FA_BFLOAT16,
              "fastasam: unsupported storage dtype code ", dtype);
}

void check_table(const at::Tensor& t, const char* name, int64_t width, const at::Tensor& rows) {
  check(t, name, at::kFloat, rows);
  TORCH_CHECK(t.dim() == 2 && t.size(1) == width, "fastasam: ", name, " must be [G, ", width, "]");
}

void raise_on(int err, const char* what) {
  TORCH_CHECK(err == 0, "fastasam: launching the CUDA ", what, " kernel failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

cudaStream_t stream_of(const at::Tensor& rows) {
  return c10::cuda::getCurrentCUDAStream(rows.device().index()).stream();
}

void sqnorm(at::Tensor& rows, const at::Tensor& chunks, const at::Tensor& opts, at::Tensor& partials,
            at::Tensor& counter, at::Tensor& out, int64_t count, int64_t chunk_size, int64_t dtype) {
  check_tables(rows, chunks, count, chunk_size, dtype);
  check_table(opts, "opts", FA_NOPT, rows);
  check(partials, "partials", at::kFloat, rows);
  check(counter, "counter", at::kInt, rows);
  check(out, "out", at::kFloat, rows);
  TORCH_CHECK(partials.numel() >= count, "fastasam: partials has ", partials.numel(), " slots for ", count, " chunks");
  const c10::cuda::CUDAGuard guard(rows.device());
  raise_on(fa_sqnorm(static_cast<int>(dtype), rows.data_ptr<int64_t>(), chunks.data_ptr<int32_t>(),
                     opts.data_ptr<float>(), static_cast<int>(count), chunk_size, partials.data_ptr<float>(),
                     counter.data_ptr<int32_t>(), out.data_ptr<float>(), stream_of(rows)),
           "norm");
}

void perturb(at::Tensor& rows, const at::Tensor& chunks, const at::Tensor& opts, const at::Tensor& sqnorm,
             int64_t count, int64_t chunk_size, int64_t dtype, bool copy) {
  check_tables(rows, chunks, count, chunk_size, dtype);
  check_table(opts, "opts", FA_NOPT, rows);
  check(sqnorm, "sqnorm", at::kFloat, rows);
  TORCH_CHECK(sqnorm.numel() == 1, "fastasam: sqnorm must hold one value");
  const c10::cuda::CUDAGuard guard(rows.device());
  raise_on(fa_perturb(static_cast<int>(dtype), rows.data_ptr<int64_t>(), chunks.data_ptr<int32_t>(),
                      opts.data_ptr<float>(), sqnorm.data_ptr<float>(), static_cast<int>(count), chunk_size, copy,
                      stream_of(rows)),
           "perturbation");
}

void restore(at::Tensor& rows, const at::Tensor& chunks, int64_t count, int64_t chunk_size, int64_t dtype, bool copy) {
  check_tables(rows, chunks, count, chunk_size, dtype);
  const c10::cuda::CUDAGuard guard(rows.device());
  raise_on(fa_restore(static_cast<int>(dtype), rows.data_ptr<int64_t>(), chunks.data_ptr<int32_t>(),
                      static_cast<int>(count), chunk_size, copy, stream_of(rows)),
           "restore");
}

// the fused restore + update launchers share their signature (multi_tensor.h)
using UpdateLauncher = int (*)(int, const int64_t*, const int32_t*, const float*, const double*, const double*, int,
                               int64_t, int, int, cudaStream_t);

void restore_update(UpdateLauncher launch, const char* what, at::Tensor& rows, const at::Tensor& chunks,
                    const at::Tensor& hyper, const at::Tensor& sums, const at::Tensor& alpha, int64_t count,
                    int64_t chunk_size, int64_t dtype, bool copy, int64_t mode) {
  check_tables(rows, chunks, count, chunk_size, dtype);
  check_table(hyper, "hyper", FA_NHYPER, rows);
  check(sums, "sums", at::kDouble, rows);
  check(alpha, "alpha", at::kDouble, rows);
  TORCH_CHECK(sums.numel() == 3 && alpha.numel() == 1, "fastasam: sums must hold three values and alpha one");
  TORCH_CHECK(mode == 0 || mode == FA_COMBINE_GSAM, "fastasam: unknown direction mode ", mode);
  const c10::cuda::CUDAGuard guard(rows.device());
  raise_on(launch(static_cast<int>(dtype), rows.data_ptr<int64_t>(), chunks.data_ptr<int32_t>(), hyper.data_ptr<float>(),
                  sums.data_ptr<double>(), alpha.data_ptr<double>(), static_cast<int>(count), chunk_size, copy,
                  static_cast<int>(mode), stream_of(rows)),
           what);
}

// one op per fused update (FA_FUSED_UPDATES)
#define FA_UPDATE_OP(NAME, WHAT)                                                                                  \
  void NAME(at::Tensor& rows, const at::Tensor& chunks, const at::Tensor& hyper, const at::Tensor& sums,          \
            const at::Tensor& alpha, int64_t count, int64_t chunk_size, int64_t dtype, bool copy, int64_t mode) { \
    restore_update(fa_##NAME, WHAT, rows, chunks, hyper, sums, alpha, count, chunk_size, dtype, copy, mode);      \
  }
FA_FUSED_UPDATES(FA_UPDATE_OP)

void dots(at::Tensor& rows, const at::Tensor& chunks, at::Tensor& partials, at::Tensor& counter, at::Tensor& out,
          int64_t count, int64_t chunk_size, int64_t dtype) {
  check_tables(rows, chunks, count, chunk_size, dtype);
  check(partials, "partials", at::kDouble, rows);
  check(counter, "counter", at::kInt, rows);
  check(out, "out", at::kDouble, rows);
  TORCH_CHECK(partials.numel() >= 3 * count, "fastasam: partials has ", partials.numel(), " slots for ", count,
              " chunks (3 each)");
  TORCH_CHECK(out.numel() == 3, "fastasam: out must hold three values");
  const c10::cuda::CUDAGuard guard(rows.device());
  raise_on(fa_dots(static_cast<int>(dtype), rows.data_ptr<int64_t>(), chunks.data_ptr<int32_t>(),
                   static_cast<int>(count), chunk_size, partials.data_ptr<double>(), counter.data_ptr<int32_t>(),
                   out.data_ptr<double>(), stream_of(rows)),
           "dot products");
}

void combine(at::Tensor& rows, const at::Tensor& chunks, const at::Tensor& sums, const at::Tensor& alpha,
             int64_t count, int64_t chunk_size, int64_t dtype, int64_t mode) {
  check_tables(rows, chunks, count, chunk_size, dtype);
  check(sums, "sums", at::kDouble, rows);
  check(alpha, "alpha", at::kDouble, rows);
  TORCH_CHECK(sums.numel() == 3 && alpha.numel() == 1, "fastasam: sums must hold three values and alpha one");
  TORCH_CHECK(mode >= FA_COMBINE_KEEP && mode <= FA_COMBINE_GSAM, "fastasam: unknown combine mode ", mode);
  const c10::cuda::CUDAGuard guard(rows.device());
  raise_on(fa_combine(static_cast<int>(dtype), rows.data_ptr<int64_t>(), chunks.data_ptr<int32_t>(),
                      sums.data_ptr<double>(), alpha.data_ptr<double>(), static_cast<int>(count), chunk_size,
                      static_cast<int>(mode), stream_of(rows)),
           "LookSAM/GSAM direction");
}

// Momentum-SAM: the fused steps (move back, update, the new norm's partials) and the perturbation
void check_msam_update(const at::Tensor& rows, const at::Tensor& chunks, const at::Tensor& hyper,
                       const at::Tensor& opts, const at::Tensor& factors, const at::Tensor& partials,
                       const at::Tensor& counter, const at::Tensor& out, int64_t count, int64_t chunk_size,
                       int64_t dtype) {
  check_tables(rows, chunks, count, chunk_size, dtype);
  check_table(hyper, "hyper", FA_NHYPER, rows);
  check_table(opts, "opts", FA_NOPT, rows);
  check(factors, "factors", at::kFloat, rows);
  check(partials, "partials", at::kFloat, rows);
  check(counter, "counter", at::kInt, rows);
  check(out, "out", at::kFloat, rows);
  TORCH_CHECK(factors.numel() >= opts.size(0), "fastasam: factors needs one value per row of opts");
  TORCH_CHECK(partials.numel() >= count, "fastasam: partials has ", partials.numel(), " slots for ", count, " chunks");
}

void msam_sgd(at::Tensor& rows, const at::Tensor& chunks, const at::Tensor& hyper, const at::Tensor& opts,
              const at::Tensor& factors, at::Tensor& partials, at::Tensor& counter, at::Tensor& out, int64_t count,
              int64_t chunk_size, int64_t dtype, bool copy) {
  check_msam_update(rows, chunks, hyper, opts, factors, partials, counter, out, count, chunk_size, dtype);
  const c10::cuda::CUDAGuard guard(rows.device());
  raise_on(fa_msam_sgd(static_cast<int>(dtype), rows.data_ptr<int64_t>(), chunks.data_ptr<int32_t>(),
                       hyper.data_ptr<float>(), opts.data_ptr<float>(), factors.data_ptr<float>(),
                       static_cast<int>(count), chunk_size, partials.data_ptr<float>(), counter.data_ptr<int32_t>(),
                       out.data_ptr<float>(), copy, stream_of(rows)),
           "MSAM SGD step");
}

void msam_adam(at::Tensor& rows, const at::Tensor& chunks, const at::Tensor& hyper, const at::Tensor& opts,
               const at::Tensor& factors, at::Tensor& partials, at::Tensor& counter, at::Tensor& out, int64_t count,
               int64_t chunk_size, int64_t dtype, bool copy) {
  check_msam_update(rows, chunks, hyper, opts, factors, partials, counter, out, count, chunk_size, dtype);
  const c10::cuda::CUDAGuard guard(rows.device());
  raise_on(fa_msam_adam(static_cast<int>(dtype), rows.data_ptr<int64_t>(), chunks.data_ptr<int32_t>(),
                        hyper.data_ptr<float>(), opts.data_ptr<float>(), factors.data_ptr<float>(),
                        static_cast<int>(count), chunk_size, partials.data_ptr<float>(), counter.data_ptr<int32_t>(),
                        out.data_ptr<float>(), copy, stream_of(rows)),
           "MSAM Adam step");
}

void msam_perturb(at::Tensor& rows, const at::Tensor& chunks, const at::Tensor& opts, const at::Tensor& sqnorm,
                  at::Tensor& factors, int64_t count, int64_t chunk_size, int64_t dtype, bool copy) {
  check_tables(rows, chunks, count, chunk_size, dtype);
  check_table(opts, "opts", FA_NOPT, rows);
  check(sqnorm, "sqnorm", at::kFloat, rows);
  check(factors, "factors", at::kFloat, rows);
  TORCH_CHECK(sqnorm.numel() == 1, "fastasam: sqnorm must hold one value");
  TORCH_CHECK(factors.numel() >= opts.size(0), "fastasam: factors needs one value per row of opts");
  const c10::cuda::CUDAGuard guard(rows.device());
  raise_on(fa_msam_perturb(static_cast<int>(dtype), rows.data_ptr<int64_t>(), chunks.data_ptr<int32_t>(),
                           opts.data_ptr<float>(), sqnorm.data_ptr<float>(), static_cast<int>(count), chunk_size,
                           factors.data_ptr<float>(), copy, stream_of(rows)),
           "MSAM perturbation");
}

}  // namespace

TORCH_LIBRARY(fastasam, m) {
  // The ops' fake (FakeTensor / meta) versions are registered from Python, by the module named here, which
  // `import fastasam` imports: torch requires the pair (and names this module when a fake is missing).
  m.set_python_module("fastasam.backends.cuda");
  // the schemas are the table's (fastasam/backends/_signatures.py; tests/test_signatures.py compares them)
  m.def("sqnorm(Tensor(a!) rows, Tensor chunks, Tensor opts, Tensor(b!) partials, Tensor(c!) counter, "
        "Tensor(d!) out, int count, int chunk_size, int dtype) -> ()");
  m.def("perturb(Tensor(a!) rows, Tensor chunks, Tensor opts, Tensor sqnorm, int count, int chunk_size, int dtype, "
        "bool copy) -> ()");
  m.def("restore(Tensor(a!) rows, Tensor chunks, int count, int chunk_size, int dtype, bool copy) -> ()");
#define FA_UPDATE_SCHEMA(NAME, WHAT)                                                                          \
  m.def(#NAME "(Tensor(a!) rows, Tensor chunks, Tensor hyper, Tensor sums, Tensor alpha, int count, "        \
              "int chunk_size, int dtype, bool copy, int mode) -> ()");
  FA_FUSED_UPDATES(FA_UPDATE_SCHEMA)
  m.def("dots(Tensor(a!) rows, Tensor chunks, Tensor(b!) partials, Tensor(c!) counter, Tensor(d!) out, int count, "
        "int chunk_size, int dtype) -> ()");
  m.def("combine(Tensor(a!) rows, Tensor chunks, Tensor sums, Tensor alpha, int count, int chunk_size, int dtype, "
        "int mode) -> ()");
  m.def("msam_sgd(Tensor(a!) rows, Tensor chunks, Tensor hyper, Tensor opts, Tensor factors, Tensor(b!) partials, "
        "Tensor(c!) counter, Tensor(d!) out, int count, int chunk_size, int dtype, bool copy) -> ()");
  m.def("msam_adam(Tensor(a!) rows, Tensor chunks, Tensor hyper, Tensor opts, Tensor factors, Tensor(b!) partials, "
        "Tensor(c!) counter, Tensor(d!) out, int count, int chunk_size, int dtype, bool copy) -> ()");
  m.def("msam_perturb(Tensor(a!) rows, Tensor chunks, Tensor opts, Tensor sqnorm, Tensor(b!) factors, int count, "
        "int chunk_size, int dtype, bool copy) -> ()");
}

TORCH_LIBRARY_IMPL(fastasam, CUDA, m) {
  m.impl("sqnorm", &sqnorm);
  m.impl("perturb", &perturb);
  m.impl("restore", &restore);
#define FA_UPDATE_IMPL(NAME, WHAT) m.impl(#NAME, &NAME);
  FA_FUSED_UPDATES(FA_UPDATE_IMPL)
  m.impl("dots", &dots);
  m.impl("combine", &combine);
  m.impl("msam_sgd", &msam_sgd);
  m.impl("msam_adam", &msam_adam);
  m.impl("msam_perturb", &msam_perturb);
}

#define FA_STR_(...) #__VA_ARGS__
#define FA_STR(...) FA_STR_(__VA_ARGS__)

// `import fastasam._C` loads this library, which registers the ops above. `archs` (setup.py passes the target list,
// comma-separated) and `cuda_runtime_version` say what it was built for (`python -m fastasam` prints them).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastasam CUDA multi-tensor kernels (torch.ops.fastasam)";
#ifdef FASTASAM_CUDA_ARCHS
  m.attr("archs") = FA_STR(FASTASAM_CUDA_ARCHS);
#endif
#ifdef CUDART_VERSION
  m.attr("cuda_runtime_version") = CUDART_VERSION;
#endif
}
