// PyTorch binding of the multi-tensor kernels (multi_tensor.cu): checks the arguments, picks the device and the
// current stream, launches, and turns a launch error into a Python exception. Registered as torch.library ops
// (torch.ops.fastasam.*), so torch.compile and CUDA graphs see one op per launch.
//
// The kernels write through the addresses in the tensor table, which PyTorch cannot see; the schemas mark `tab` as
// mutated so that no graph pass drops or reorders a launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "multi_tensor.h"

namespace {

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& tab) {
  TORCH_CHECK(t.is_cuda(), "fastasam: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == tab.device(), "fastasam: ", name, " is on ", t.device(), " but the table on ",
              tab.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fastasam: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastasam: ", name, " must be contiguous");
}

void check_tables(const at::Tensor& tab, const at::Tensor& chunks, int64_t dtype) {
  check(tab, "tab", at::kLong, tab);
  check(chunks, "chunks", at::kInt, tab);
  TORCH_CHECK(tab.dim() == 2 && tab.size(1) == FA_NCOL, "fastasam: tab must be [N, ", FA_NCOL, "]");
  TORCH_CHECK(chunks.dim() == 2 && chunks.size(1) == 2, "fastasam: chunks must be [C, 2]");
  TORCH_CHECK(dtype == FA_FLOAT32 || dtype == FA_FLOAT16 || dtype == FA_BFLOAT16,
              "fastasam: unsupported storage dtype code ", dtype);
}

void raise_on(int err, const char* what) {
  TORCH_CHECK(err == 0, "fastasam: launching the CUDA ", what, " kernel failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

cudaStream_t stream_of(const at::Tensor& tab) { return c10::cuda::getCurrentCUDAStream(tab.device().index()).stream(); }

int checked_int(int64_t v, const char* name) {
  TORCH_CHECK(v >= 0 && v <= INT32_MAX, "fastasam: ", name, "=", v, " is out of range");
  return static_cast<int>(v);
}

void sqnorm(at::Tensor& tab, const at::Tensor& etas, const at::Tensor& chunks, at::Tensor& partials,
            at::Tensor& counter, at::Tensor& out, int64_t chunk_size, int64_t dtype) {
  check_tables(tab, chunks, dtype);
  check(etas, "etas", at::kFloat, tab);
  check(partials, "partials", at::kFloat, tab);
  check(counter, "counter", at::kInt, tab);
  check(out, "out", at::kFloat, tab);
  const int n = checked_int(chunks.size(0), "chunks");
  TORCH_CHECK(partials.numel() >= n, "fastasam: partials has ", partials.numel(), " slots for ", n, " chunks");
  const c10::cuda::CUDAGuard guard(tab.device());
  raise_on(fa_sqnorm(static_cast<int>(dtype), tab.data_ptr<int64_t>(), etas.data_ptr<float>(),
                     chunks.data_ptr<int32_t>(), n, chunk_size, partials.data_ptr<float>(), counter.data_ptr<int32_t>(),
                     out.data_ptr<float>(), stream_of(tab)),
           "norm");
}

void perturb(at::Tensor& tab, const at::Tensor& etas, const at::Tensor& chunks, const at::Tensor& scales,
             const at::Tensor& finite, int64_t chunk_size, int64_t dtype, bool copy) {
  check_tables(tab, chunks, dtype);
  check(etas, "etas", at::kFloat, tab);
  check(scales, "scales", at::kFloat, tab);
  check(finite, "finite", at::kBool, tab);
  const c10::cuda::CUDAGuard guard(tab.device());
  raise_on(fa_perturb(static_cast<int>(dtype), tab.data_ptr<int64_t>(), etas.data_ptr<float>(),
                      chunks.data_ptr<int32_t>(), checked_int(chunks.size(0), "chunks"), chunk_size,
                      scales.data_ptr<float>(), finite.data_ptr<bool>(), copy, stream_of(tab)),
           "perturbation");
}

void restore(at::Tensor& tab, const at::Tensor& chunks, int64_t chunk_size, int64_t dtype, bool copy) {
  check_tables(tab, chunks, dtype);
  const c10::cuda::CUDAGuard guard(tab.device());
  raise_on(fa_restore(static_cast<int>(dtype), tab.data_ptr<int64_t>(), chunks.data_ptr<int32_t>(),
                      checked_int(chunks.size(0), "chunks"), chunk_size, copy, stream_of(tab)),
           "restore");
}

void check_range(const at::Tensor& chunks, int64_t first, int64_t count) {
  TORCH_CHECK(first >= 0 && count > 0 && first + count <= chunks.size(0), "fastasam: chunk range [", first, ", ",
              first + count, ") outside the ", chunks.size(0), " chunks");
}

void restore_sgd(at::Tensor& tab, const at::Tensor& chunks, int64_t first, int64_t count, int64_t chunk_size,
                 int64_t dtype, double lr, double momentum, double dampening, double weight_decay, bool copy,
                 bool nesterov, bool maximize) {
  check_tables(tab, chunks, dtype);
  check_range(chunks, first, count);
  const c10::cuda::CUDAGuard guard(tab.device());
  raise_on(fa_restore_sgd(static_cast<int>(dtype), tab.data_ptr<int64_t>(), chunks.data_ptr<int32_t>(),
                          static_cast<int>(first), static_cast<int>(count), chunk_size, static_cast<float>(lr),
                          static_cast<float>(momentum), static_cast<float>(dampening),
                          static_cast<float>(weight_decay), copy, momentum != 0.0, nesterov, maximize, stream_of(tab)),
           "restore + SGD");
}

void restore_adam(at::Tensor& tab, const at::Tensor& chunks, int64_t first, int64_t count, int64_t chunk_size,
                  int64_t dtype, double lr, double beta1, double beta2, double eps, double weight_decay,
                  double step_size, double bc2_sqrt, bool copy, bool decoupled, bool amsgrad, bool maximize) {
  check_tables(tab, chunks, dtype);
  check_range(chunks, first, count);
  const c10::cuda::CUDAGuard guard(tab.device());
  raise_on(fa_restore_adam(static_cast<int>(dtype), tab.data_ptr<int64_t>(), chunks.data_ptr<int32_t>(),
                           static_cast<int>(first), static_cast<int>(count), chunk_size, static_cast<float>(lr),
                           static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps),
                           static_cast<float>(weight_decay), static_cast<float>(step_size),
                           static_cast<float>(bc2_sqrt), copy, decoupled, amsgrad, maximize, stream_of(tab)),
           "restore + Adam");
}

}  // namespace

TORCH_LIBRARY(fastasam, m) {
  m.def("sqnorm(Tensor(a!) tab, Tensor etas, Tensor chunks, Tensor(b!) partials, Tensor(c!) counter, "
        "Tensor(d!) out, int chunk_size, int dtype) -> ()");
  m.def("perturb(Tensor(a!) tab, Tensor etas, Tensor chunks, Tensor scales, Tensor finite, int chunk_size, "
        "int dtype, bool copy) -> ()");
  m.def("restore(Tensor(a!) tab, Tensor chunks, int chunk_size, int dtype, bool copy) -> ()");
  m.def("restore_sgd(Tensor(a!) tab, Tensor chunks, int first, int count, int chunk_size, int dtype, float lr, "
        "float momentum, float dampening, float weight_decay, bool copy, bool nesterov, bool maximize) -> ()");
  m.def("restore_adam(Tensor(a!) tab, Tensor chunks, int first, int count, int chunk_size, int dtype, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, float step_size, float bc2_sqrt, bool copy, "
        "bool decoupled, bool amsgrad, bool maximize) -> ()");
}

TORCH_LIBRARY_IMPL(fastasam, CUDA, m) {
  m.impl("sqnorm", &sqnorm);
  m.impl("perturb", &perturb);
  m.impl("restore", &restore);
  m.impl("restore_sgd", &restore_sgd);
  m.impl("restore_adam", &restore_adam);
}

// `import fastasam._C` loads this library, which registers the ops above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "fastasam CUDA multi-tensor kernels (torch.ops.fastasam)"; }
