// The ResNet stem's max-pool (3x3, stride 2, padding 1) on channels_last bf16 or fp32 maps, forward and backward.
//
// Why: ATen's channels_last max-pool backward (bf16 and fp32) scatters each output's gradient onto its argmax one
// element at a time; on the stem's full-resolution map it took ~18 ms of a 128 px ResNet-18 step
// (multitag/max_pool.py, RESULTS run S). Here the forward keeps, per output value, which of the 9 taps
// won (one byte), and the backward gathers: each input position sums the gradients of the (at most 2x2)
// windows that chose it, in fp32, rounded once — every row written by one thread, no scatter, no zeroing
// pass (in fp32 the sum is ATen's own: the windows in the same order, from 0). The winner is PyTorch's: the
// first strictly larger value in (kh, kw) order, NaN winning.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t kSize = 3, kStride = 2, kPad = 1;

int64_t pooled(int64_t n) { return (n + 2 * kPad - kSize) / kStride + 1; }

template <typename T>
void pool_forward(const at::Tensor& x, at::Tensor& y, at::Tensor& argmax) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), OH = y.size(2), OW = y.size(3);
  const T* X = data_of<T>(x);
  T* Y = data_of_mut<T>(y);
  uint8_t* A = argmax.data_ptr<uint8_t>();
  at::parallel_for(0, N * OH, 1, [&](int64_t first, int64_t last) {
    std::vector<float> best(C);
    for (int64_t row = first; row < last; ++row) {
      const int64_t n = row / OH, oh = row % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        float* __restrict m = best.data();
        uint8_t* __restrict a = A + ((n * OH + oh) * OW + ow) * C;
        bool first_tap = true;
        for (int64_t kh = 0; kh < kSize; ++kh) {
          const int64_t h = oh * kStride - kPad + kh;
          if (h < 0 || h >= H) continue;
          for (int64_t kw = 0; kw < kSize; ++kw) {
            const int64_t w = ow * kStride - kPad + kw;
            if (w < 0 || w >= W) continue;
            const T* __restrict v = X + ((n * H + h) * W + w) * C;
            const uint8_t tap = uint8_t(kh * kSize + kw);
            if (first_tap) {                       // PyTorch starts from -inf at the first valid tap
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) {
                m[c] = to_float(v[c]);
                a[c] = tap;
              }
              first_tap = false;
              continue;
            }
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const float val = to_float(v[c]);
              const bool wins = val > m[c] || val != val;
              m[c] = wins ? val : m[c];
              a[c] = wins ? tap : a[c];
            }
          }
        }
        T* __restrict out = Y + ((n * OH + oh) * OW + ow) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) out[c] = from_float<T>(m[c]);     // exact: m holds a T value
      }
    }
  });
}

template <typename T>
void pool_backward(const at::Tensor& dy, const at::Tensor& argmax, at::Tensor& dx) {
  const int64_t N = dy.size(0), C = dy.size(1), OH = dy.size(2), OW = dy.size(3), H = dx.size(2), W = dx.size(3);
  const T* G = data_of<T>(dy);
  const uint8_t* A = argmax.data_ptr<uint8_t>();
  T* DX = data_of_mut<T>(dx);
  at::parallel_for(0, N * H, 1, [&](int64_t first, int64_t last) {
    std::vector<float> sum(C);
    for (int64_t row = first; row < last; ++row) {
      const int64_t n = row / H, h = row % H;
      // windows covering h: oh * 2 - 1 <= h <= oh * 2 + 1
      const int64_t oh_lo = std::max<int64_t>(0, (h + kPad - kSize + kStride) / kStride);
      const int64_t oh_hi = std::min<int64_t>(OH - 1, (h + kPad) / kStride);
      for (int64_t w = 0; w < W; ++w) {
        const int64_t ow_lo = std::max<int64_t>(0, (w + kPad - kSize + kStride) / kStride);
        const int64_t ow_hi = std::min<int64_t>(OW - 1, (w + kPad) / kStride);
        float* __restrict s = sum.data();
        std::fill(sum.begin(), sum.end(), 0.f);
        for (int64_t oh = oh_lo; oh <= oh_hi; ++oh) {
          for (int64_t ow = ow_lo; ow <= ow_hi; ++ow) {
            const uint8_t tap = uint8_t((h - oh * kStride + kPad) * kSize + (w - ow * kStride + kPad));
            const int64_t at = ((n * OH + oh) * OW + ow) * C;
            const T* __restrict g = G + at;
            const uint8_t* __restrict a = A + at;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) s[c] += a[c] == tap ? to_float(g[c]) : 0.f;
          }
        }
        T* __restrict out = DX + ((n * H + h) * W + w) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) out[c] = from_float<T>(s[c]);
      }
    }
  });
}

}  // namespace

// x: (N, C, H, W) channels_last bf16 or fp32. Returns {y: (N, C, OH, OW) channels_last, x's dtype, argmax:
// uint8 of the same layout, the winning tap kh * 3 + kw of each output value}.
std::vector<at::Tensor> max_pool_forward(const at::Tensor& x) {
  check_map(x, "x", /*fp32_too=*/true);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H >= 2 && W >= 2, "max_pool_forward needs maps of at least 2x2");
  at::Tensor y = at::empty({N, C, pooled(H), pooled(W)}, x.options(), at::MemoryFormat::ChannelsLast);
  at::Tensor argmax = at::empty(y.sizes(), x.options().dtype(at::kByte), at::MemoryFormat::ChannelsLast);
  with_element_type(x, [&](auto v) { pool_forward<decltype(v)>(x, y, argmax); });
  return {y, argmax};
}

// dy: (N, C, OH, OW) channels_last bf16 or fp32, argmax from the forward. Returns dx: (N, C, height, width).
at::Tensor max_pool_backward(const at::Tensor& dy, const at::Tensor& argmax, int64_t height, int64_t width) {
  check_map(dy, "dy", /*fp32_too=*/true);
  TORCH_CHECK(argmax.sizes() == dy.sizes() && argmax.scalar_type() == at::kByte &&
                  argmax.is_contiguous(at::MemoryFormat::ChannelsLast),
              "argmax must be the forward's (uint8, dy's shape, channels_last)");
  TORCH_CHECK(pooled(height) == dy.size(2) && pooled(width) == dy.size(3),
              "height and width must be the forward input's");
  at::Tensor dx = at::empty({dy.size(0), dy.size(1), height, width}, dy.options(), at::MemoryFormat::ChannelsLast);
  with_element_type(dy, [&](auto v) { pool_backward<decltype(v)>(dy, argmax, dx); });
  return dx;
}
