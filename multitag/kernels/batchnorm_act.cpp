// Training-mode BatchNorm (+ residual add) (+ ReLU or ReLU6) on channels_last bf16 maps, two passes each way.
//
// Why: ATen runs BatchNorm, the residual add and the ReLU as separate kernels, each reading and writing
// the whole activation, and its channels_last bf16 BatchNorm itself takes a third pass for the variance
// and another in its backward. Here the forward reads x once for the statistics and once to write
// ReLU(BN(x) [+ r]); the backward reads dy and x once for the two per-channel sums and once to write dx.
// multitag/fused_batchnorm.py says where it is used and what it was measured against.
//
// Layout: a channels_last (N, C, H, W) tensor is a row-major (M = N*H*W, C) matrix; every loop below
// runs over (wide) rows outside and over contiguous channels inside, which the compiler vectorizes.
// Numerics follow ATen's mixed bf16/fp32 kernel: statistics and arithmetic in fp32 (sums in fp64),
// the BN output rounded to bf16 before the residual is added (as `x += shortcut` on a bf16 tensor),
// the result rounded once more, weights, bias and their gradients in fp32.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

// The (M, C) matrix is walked as "wide rows" of k consecutive rows, L = k*C values (the last one
// shorter when k does not divide M), with every per-channel array tiled k times (tiled()): narrow
// layers (8, 24 or 17 channels) then still get inner loops long enough to fill the vector registers.
// k makes L a multiple of 16 and at least 64; layers of 16·n or ≥ 256 channels keep k = 1.
struct Rows {
  int64_t C, k, L, count, values;
  Rows(int64_t M, int64_t C_) : C(C_), k(1), values(M * C_) {
    if (C % 16 != 0 && C < 256) {
      k = 16 / std::gcd<int64_t>(C, 16);
      k *= (64 + k * C - 1) / (k * C);
    }
    L = k * C;
    count = (values + L - 1) / L;
  }
  int64_t width(int64_t i) const { return std::min(L, values - i * L); }
};

std::vector<float> tiled(const float* per_channel, const Rows& rows) {
  std::vector<float> t(rows.L);
  for (int64_t j = 0; j < rows.L; ++j) t[j] = per_channel[j % rows.C];
  return t;
}

// Wide rows summed in fp32 before they join a chunk's fp64 sum: short enough that fp32 loses nothing
// that matters, long enough that the fp64 adds cost nothing.
constexpr int64_t kBlockValues = 256 * 64;

// Two per-channel sums over all rows: add_row(i, s, q) adds wide row i's terms to s[0..L), q[0..L).
// Rows are split into chunks (a few per thread) with their own fp64 sums, added up in a fixed order,
// so the result does not depend on how the threads were scheduled. Returns {s[0..C), q[0..C)}.
template <typename AddRow>
std::vector<double> channel_sums(const Rows& rows, const AddRow& add_row) {
  const int64_t L = rows.L, block = std::max<int64_t>(1, kBlockValues / L);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(4 * at::get_num_threads(), rows.count / block));
  std::vector<double> partial(chunks * 2 * L, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> s(L), q(L);
    for (int64_t k = first; k < last; ++k) {
      double* S = partial.data() + k * 2 * L;
      double* Q = S + L;
      const int64_t i_end = rows.count * (k + 1) / chunks;
      for (int64_t i0 = rows.count * k / chunks; i0 < i_end; i0 += block) {
        std::fill(s.begin(), s.end(), 0.f);
        std::fill(q.begin(), q.end(), 0.f);
        for (int64_t i = i0; i < std::min(i_end, i0 + block); ++i) add_row(i, s.data(), q.data());
        for (int64_t j = 0; j < L; ++j) {
          S[j] += s[j];
          Q[j] += q[j];
        }
      }
    }
  });
  std::vector<double> total(2 * rows.C, 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t j = 0; j < L; ++j) {
      total[j % rows.C] += partial[k * 2 * L + j];
      total[rows.C + j % rows.C] += partial[k * 2 * L + L + j];
    }
  return total;
}

// Every wide row once, in parallel: each_row(i).
template <typename EachRow>
void for_rows(const Rows& rows, const EachRow& each_row) {
  const int64_t grain = std::max<int64_t>(1, 16384 / rows.L);
  at::parallel_for(0, rows.count, grain, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) each_row(i);
  });
}

// The activation after BN (+ residual): 0 none, 1 ReLU, 2 ReLU6 (max(0, min(v, 6)), EfficientNet-Lite's).
enum Act : int { kNone = 0, kReLU = 1, kReLU6 = 2 };

template <int kAct>
inline float activate(float v) {
  if constexpr (kAct >= kReLU) v = std::max(v, 0.f);
  if constexpr (kAct == kReLU6) v = std::min(v, 6.f);
  return v;
}

// Whether the activation passes the gradient at v (its input, as rounded to bf16): PyTorch's
// threshold/hardtanh backward, strict at the ends. For ReLU(6) it can also be told from the output.
template <int kAct>
inline bool passes(float v) {
  return kAct == kNone || (v > 0.f && (kAct == kReLU || v < 6.f));
}

// z = x * scale + shift, as the forward computed it (the backward recomputes the ReLU mask from it).
template <typename T>
inline float affine(T x, float scale, float shift) { return to_float(x) * scale + shift; }

// The row kernels below take their flags as template parameters so that each inner loop is one
// branch-free vectorized loop (selects, not jumps), and restrict pointers so that it needs no alias checks.

template <typename T, bool kResidual, int kAct>
void forward_row(const T* __restrict x, const T* __restrict res, T* __restrict y,
                 const float* __restrict scale, const float* __restrict shift, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    float z = affine(x[c], scale[c], shift[c]);
    if constexpr (kResidual) z = to_float(from_float<T>(z)) + to_float(res[c]);
    y[c] = from_float<T>(activate<kAct>(z));
  }
}

// The gradient at BN's output: dy through the activation's mask (0 < v, and v < 6 for ReLU6) — with a
// residual told from y, without one from v recomputed from x exactly as the forward rounded it.
template <typename T, bool kResidual, int kAct>
inline float bn_grad(T dy, T x, T y, float scale, float shift) {
  if constexpr (kAct == kNone) return to_float(dy);
  const float v = kResidual ? to_float(y) : to_float(from_float<T>(affine(x, scale, shift)));
  return passes<kAct>(v) ? to_float(dy) : 0.f;
}

// Backward pass 1 for one row: the sums of g and g·(x − mean); with a residual g is also written out
// (it is the residual's gradient, and pass 2 reads it back instead of dy and y).
template <typename T, bool kResidual, int kAct>
void grad_sums_row(const T* __restrict dy, const T* __restrict x, const T* __restrict y,
                   T* __restrict g_out, const float* __restrict mean, const float* __restrict scale,
                   const float* __restrict shift, float* __restrict s, float* __restrict q, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float g = bn_grad<T, kResidual, kAct>(dy[c], x[c], kResidual ? y[c] : T(0), scale[c], shift[c]);
    if constexpr (kResidual) g_out[c] = from_float<T>(g);      // exact: dy or 0
    s[c] += g;
    q[c] += g * (to_float(x[c]) - mean[c]);
  }
}

// Backward pass 2 for one row: dx = γ·invstd·(g − mean(g) − x̂·mean(g·x̂)), x̂ = (x − mean)·invstd
// (ATen's formula), with a = γ·invstd and k = mean(g·(x − mean))·invstd².
template <typename T, bool kResidual, int kAct>
void grad_input_row(const T* __restrict dy_or_g, const T* __restrict x, T* __restrict dx,
                    const float* __restrict mean, const float* __restrict scale, const float* __restrict shift,
                    const float* __restrict g_mean, const float* __restrict k, const float* __restrict a, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    // with a residual dy_or_g holds g already (no mask left to apply)
    const float g = kResidual ? to_float(dy_or_g[c]) : bn_grad<T, false, kAct>(dy_or_g[c], x[c], T(0), scale[c], shift[c]);
    dx[c] = from_float<T>((g - g_mean[c] - (to_float(x[c]) - mean[c]) * k[c]) * a[c]);
  }
}

// f(residual, act) with both as compile-time constants (std::integral_constant).
template <typename F>
void with_flags(bool residual, int64_t act, const F& f) {
  TORCH_CHECK(act >= kNone && act <= kReLU6, "unknown activation code ", act);
  auto with_act = [&](auto res_t) {
    if (act == kNone) f(res_t, std::integral_constant<int, kNone>{});
    else if (act == kReLU) f(res_t, std::integral_constant<int, kReLU>{});
    else f(res_t, std::integral_constant<int, kReLU6>{});
  };
  if (residual) with_act(std::true_type{}); else with_act(std::false_type{});
}

template <typename T>
std::vector<at::Tensor> forward_as(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                   at::Tensor running_mean, at::Tensor running_var, double momentum, double eps,
                                   const c10::optional<at::Tensor>& residual, int64_t act) {
  const int64_t C = x.size(1), M = x.numel() / C;
  const Rows rows(M, C);
  const int64_t L = rows.L;
  const T* X = data_of<T>(x);
  // Sums of (x - pivot) and its square, the pivot being the first row: E[x²] − E[x]² then cancels
  // only as much as the channel's spread around one of its own values, not around 0.
  std::vector<float> pivot(C);
  for (int64_t c = 0; c < C; ++c) pivot[c] = to_float(X[c]);
  const std::vector<float> P = tiled(pivot.data(), rows);
  const std::vector<double> sums = channel_sums(rows, [&](int64_t i, float* __restrict s, float* __restrict q) {
    const T* __restrict xr = X + i * L;
    const float* __restrict p = P.data();
#pragma omp simd
    for (int64_t j = 0; j < rows.width(i); ++j) {
      const float d = to_float(xr[j]) - p[j];
      s[j] += d;
      q[j] += d * d;
    }
  });

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({C}, f32), invstd = at::empty({C}, f32);
  at::Tensor scale = at::empty({C}, f32), shift = at::empty({C}, f32);
  float *MEAN = mean.data_ptr<float>(), *INV = invstd.data_ptr<float>();
  float *SC = scale.data_ptr<float>(), *SH = shift.data_ptr<float>();
  const float *W = weight.data_ptr<float>(), *B = bias.data_ptr<float>();
  float *RM = running_mean.data_ptr<float>(), *RV = running_var.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const double d = sums[c] / M, var = std::max(0.0, sums[C + c] / M - d * d);
    const double m = pivot[c] + d;
    MEAN[c] = float(m);
    INV[c] = float(1.0 / std::sqrt(var + eps));
    RM[c] = float((1.0 - momentum) * RM[c] + momentum * m);
    RV[c] = float((1.0 - momentum) * RV[c] + momentum * var * M / std::max<int64_t>(M - 1, 1));
    SC[c] = INV[c] * W[c];
    SH[c] = B[c] - MEAN[c] * SC[c];
  }

  at::Tensor y = at::empty_like(x);
  T* Y = data_of_mut<T>(y);
  const T* R = residual ? data_of<T>(*residual) : nullptr;
  const std::vector<float> sc = tiled(SC, rows), sh = tiled(SH, rows);
  with_flags(R != nullptr, act, [&](auto res_t, auto act_t) {
    for_rows(rows, [&](int64_t i) {
      forward_row<T, res_t(), act_t()>(X + i * L, R ? R + i * L : nullptr, Y + i * L, sc.data(), sh.data(),
                                        rows.width(i));
    });
  });
  return {y, mean, invstd, scale, shift};
}

template <typename T>
std::vector<at::Tensor> backward_as(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y,
                                    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& invstd,
                                    const at::Tensor& scale, const at::Tensor& shift, bool has_residual, int64_t act) {
  const int64_t C = x.size(1), M = x.numel() / C;
  const Rows rows(M, C);
  const int64_t L = rows.L;
  const T *X = data_of<T>(x), *DY = data_of<T>(dy), *Y = data_of<T>(y);
  const float *W = weight.data_ptr<float>(), *INV = invstd.data_ptr<float>();
  const std::vector<float> mu = tiled(mean.data_ptr<float>(), rows), sc = tiled(scale.data_ptr<float>(), rows),
                           sh = tiled(shift.data_ptr<float>(), rows);
  at::Tensor dres = has_residual ? at::empty_like(x) : at::Tensor();
  T* G = has_residual ? data_of_mut<T>(dres) : nullptr;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dweight = at::empty({C}, f32), dbias = at::empty({C}, f32);
  at::Tensor dx = at::empty_like(x);
  with_flags(has_residual, act, [&](auto res_t, auto act_t) {
    constexpr bool kResidual = res_t();
    constexpr int kAct = act_t();
    const std::vector<double> sums = channel_sums(rows, [&](int64_t i, float* s, float* q) {
      grad_sums_row<T, kResidual, kAct>(DY + i * L, X + i * L, Y + i * L, G ? G + i * L : nullptr, mu.data(),
                                         sc.data(), sh.data(), s, q, rows.width(i));
    });
    float *DW = dweight.data_ptr<float>(), *DB = dbias.data_ptr<float>();
    std::vector<float> g_mean(C), k(C), a(C);
    for (int64_t c = 0; c < C; ++c) {
      DB[c] = float(sums[c]);
      DW[c] = float(sums[C + c] * INV[c]);
      g_mean[c] = float(sums[c] / M);
      k[c] = float(sums[C + c] / M * INV[c] * INV[c]);
      a[c] = INV[c] * W[c];
    }
    const std::vector<float> gm = tiled(g_mean.data(), rows), kk = tiled(k.data(), rows), aa = tiled(a.data(), rows);
    T* DX = data_of_mut<T>(dx);
    const T* source = kResidual ? G : DY;
    for_rows(rows, [&](int64_t i) {
      grad_input_row<T, kResidual, kAct>(source + i * L, X + i * L, DX + i * L, mu.data(), sc.data(), sh.data(),
                                          gm.data(), kk.data(), aa.data(), rows.width(i));
    });
  });
  if (has_residual) return {dx, dweight, dbias, dres};
  return {dx, dweight, dbias};
}

}  // namespace

// x, residual: (N, C, H, W) channels_last, bf16 or fp32 (both the same); weight, bias, running_mean,
// running_var: (C,) fp32. Updates the running statistics in place (momentum = the weight of the new batch,
// as in PyTorch; the running variance gets the unbiased batch variance). Returns {y, mean, invstd, scale, shift}.
std::vector<at::Tensor> batchnorm_act_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                              at::Tensor running_mean, at::Tensor running_var, double momentum,
                                              double eps, const c10::optional<at::Tensor>& residual, int64_t act) {
  check_map(x, "x", true);
  if (residual) {
    check_map(*residual, "residual", true);
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must have x's shape and dtype");
  }
  return with_element_type(x, [&](auto v) {
    return forward_as<decltype(v)>(x, weight, bias, running_mean, running_var, momentum, eps, residual, act);
  });
}

// dy, x, y: (N, C, H, W) channels_last, x's dtype (y: the forward's output, read only with a residual,
// where the activation's mask can only be told from it); the rest (C,) fp32 as the forward returned them.
// Returns {dx, dweight, dbias} and, with a residual, the gradient of the residual (dy where it passes).
std::vector<at::Tensor> batchnorm_act_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y,
                                               const at::Tensor& weight, const at::Tensor& mean,
                                               const at::Tensor& invstd, const at::Tensor& scale,
                                               const at::Tensor& shift, bool has_residual, int64_t act) {
  check_map(dy, "dy", true);
  check_map(x, "x", true);
  check_map(y, "y", true);
  TORCH_CHECK(dy.sizes() == x.sizes() && y.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() &&
                  y.scalar_type() == x.scalar_type(),
              "dy and y must have x's shape and dtype");
  return with_element_type(x, [&](auto v) {
    return backward_as<decltype(v)>(dy, x, y, weight, mean, invstd, scale, shift, has_residual, act);
  });
}
