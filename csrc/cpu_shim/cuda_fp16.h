// CPU shim: stands in for the CUDA toolkit header of the same name (see fa_cuda_shim.h)
#pragma once
#include "fa_cuda_shim.h"
