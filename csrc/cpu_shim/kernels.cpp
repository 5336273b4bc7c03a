// csrc/multi_tensor.cu itself, compiled by the host compiler against the CPU shim (fa_cuda_shim.h)
#include "multi_tensor.cu"
