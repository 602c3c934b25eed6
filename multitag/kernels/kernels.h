// What multitag's CPU kernels share: bf16 bit conversions, the map check, and their entry points
// (bound to Python in module.cpp; multitag/cpu_kernels.py builds them into one extension).
#pragma once

// ATen's tensor core and the two ops the kernels call (each .cpp includes ATen/Parallel.h itself), not
// <torch/extension.h> (autograd, pybind11, the C++ API): the kernels compiled ~3x faster so (max_pool.cpp
// 32 -> 9.5 s); module.cpp's bindings include torch's pybind casters themselves.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <vector>

using bf16_t = uint16_t;

// bf16 <-> fp32 by bit operations (round to nearest even, NaN kept a quiet NaN): these vectorize.
inline float to_float(bf16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline bf16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const bf16_t rounded = bf16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return f != f ? bf16_t(0x7FC0) : rounded;
}

inline float to_float(float v) { return v; }

// fp32 -> the map's element type: bf16 rounded as above, fp32 as it is.
template <typename T> inline T from_float(float f);
template <> inline bf16_t from_float<bf16_t>(float f) { return to_bf16(f); }
template <> inline float from_float<float>(float f) { return f; }

// Every map the kernels read: what the Python side hands over, checked (not assumed) here.
inline void check_map(const at::Tensor& t, const char* name, bool fp32_too = false) {
  const bool dtype_ok = t.scalar_type() == at::kBFloat16 || (fp32_too && t.scalar_type() == at::kFloat);
  TORCH_CHECK(t.device().is_cpu() && dtype_ok && t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast),
              name, fp32_too ? " must be a bf16 or fp32" : " must be a bf16",
              " channels_last CPU tensor of 4 dimensions");
}

// f(T{}) with T the element type of a map check_map(..., fp32_too) passed: float for fp32, bf16_t for bf16.
template <typename F> decltype(auto) with_element_type(const at::Tensor& t, F&& f) {
  return t.scalar_type() == at::kFloat ? f(float{}) : f(bf16_t{});
}

// A map's elements as T (bf16_t for bf16 maps, float for fp32 ones).
template <typename T> inline const T* data_of(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T> inline T* data_of_mut(at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

inline const bf16_t* bits(const at::Tensor& t) { return data_of<bf16_t>(t); }
inline bf16_t* bits_mut(at::Tensor& t) { return data_of_mut<bf16_t>(t); }

// batchnorm_act.cpp
std::vector<at::Tensor> batchnorm_act_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                              at::Tensor running_mean, at::Tensor running_var, double momentum,
                                              double eps, const c10::optional<at::Tensor>& residual, int64_t act);
std::vector<at::Tensor> batchnorm_act_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y,
                                               const at::Tensor& weight, const at::Tensor& mean,
                                               const at::Tensor& invstd, const at::Tensor& scale,
                                               const at::Tensor& shift, bool has_residual, int64_t act);

// max_pool.cpp
std::vector<at::Tensor> max_pool_forward(const at::Tensor& x);
at::Tensor max_pool_backward(const at::Tensor& dy, const at::Tensor& argmax, int64_t height, int64_t width);
