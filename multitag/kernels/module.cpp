// The Python bindings of multitag's CPU kernels (multitag/cpu_kernels.py loads them).
// torch's pybind11 casters for at::Tensor alone: <torch/extension.h> (the whole C++ API) took 44 s to compile
// here, this 16 s.
#include <torch/csrc/utils/pybind.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("batchnorm_act_forward", &batchnorm_act_forward, "BatchNorm (+ residual) (+ ReLU/ReLU6), training forward");
  m.def("batchnorm_act_backward", &batchnorm_act_backward, "its backward");
  m.def("max_pool_forward", &max_pool_forward, "3x3/2 max-pool, padding 1: output and each output's tap");
  m.def("max_pool_backward", &max_pool_backward, "its backward, gathered per input position");
}
