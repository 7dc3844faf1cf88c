// What linear.cpp (fp32 / fp16 / int8 weights, fp32 activations) and quantized.cpp (int8 / int4 weights
// times int8 activation blocks) share: the threading grain, the horizontal sum, the walk over input rows in
// register-block passes, and the prefill path that widens a tile of compact weights to fp32 for sgemm.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace gpt2chat_kernels {

constexpr int64_t kThreadWork = 1 << 15;  // weights per thread below which threading does not pay
constexpr int64_t kTileBytes = 4 << 20;   // fp32 bytes of a widened weight tile (fits the 32 MB L3)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// `f(std::integral_constant<int, count>{})` for a run-time count in 1..N: a register block's size (rows of a
// tail, weight rows of the last block) becomes a compile-time constant; count 0 calls nothing.
template <int N, class F>
inline void with_count(int64_t count, F&& f) {
  if constexpr (N > 0) {
    if (count == N) {
      f(std::integral_constant<int, N>{});
    } else {
      with_count<N - 1>(count, f);
    }
  }
}

// Input rows [0, M) in passes of I rows (a kernel's register block), then the M % I rows left as one smaller
// pass: `pass(rows, m)` with `rows` a std::integral_constant<int, n> (n rows from m, n known at compile time).
template <int I, class Pass>
inline void rows_in_passes(int64_t M, Pass&& pass) {
  int64_t m = 0;
  for (; m + I <= M; m += I) pass(std::integral_constant<int, I>{}, m);
  with_count<I - 1>(M - m, [&](auto rows) { pass(rows, m); });
}

// y2d = x2d W^T (+ bias) for a compact weight: `widen(n0, n1, dst)` writes rows [n0, n1) of W as fp32
// into dst [n1 - n0, K]; the tiles stay in cache and sgemm multiplies each into its output columns.
template <class Widen>
void widened_sgemm(const at::Tensor& x2d, int64_t N, int64_t K, Widen widen, const std::optional<at::Tensor>& bias,
                   at::Tensor& y2d) {
  const int64_t tile = std::max<int64_t>(8, std::min<int64_t>(N, kTileBytes / (4 * K)));
  at::Tensor buffer = at::empty({tile, K}, x2d.options());
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t n1 = std::min(N, n0 + tile);
    widen(n0, n1, buffer.data_ptr<float>());
    at::Tensor wt = buffer.narrow(0, 0, n1 - n0).t();
    at::Tensor out = y2d.narrow(1, n0, n1 - n0);
    if (bias.has_value()) {
      at::addmm_out(out, bias->narrow(0, n0, n1 - n0), x2d, wt);
    } else {
      at::mm_out(out, x2d, wt);
    }
  }
}

// The frame every linear op shares: `x` as a contiguous [M, K] matrix and an [M, N] output, filled by
// `product(x2d, y2d)` unless the product is trivial (no rows or outputs; K == 0 leaves the bias, or zeros);
// returns the output in x's shape with N features.
template <class Product>
at::Tensor linear_frame(const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& bias, Product product) {
  const int64_t K = x.size(-1);
  at::Tensor x2d = x.reshape({-1, K}).contiguous();
  const int64_t M = x2d.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y2d = at::empty({M, N}, x.options());
  if (M > 0 && N > 0) {
    if (K == 0) {
      if (bias.has_value()) y2d.copy_(bias->expand({M, N})); else y2d.zero_();
    } else {
      product(x2d, y2d);
    }
  }
  return y2d.view(out_shape);
}

}  // namespace gpt2chat_kernels
