// int4 weights: the per-block scale search of gpt2chat/kernels/blocks.py (`quantize_int4`) in C++, the same
// bytes and scales bit for bit, registered as `gpt2chat::quantize_int4_blocks(Tensor weight) -> (q, d)`.
//
// blocks.py's search runs ~100 small torch ops per 4096-row step; under load each waits out the OpenMP
// barrier of a 2-thread op, which made converting the 124M model take 106 s. Here one pass per block of 32
// weights does it all, threaded over rows. To give torch's numbers exactly, every step is the one torch
// does, in its order and precision (this file is built with -ffp-contract=off, so no multiply-add is fused):
//  - sums of 32 products (torch.linalg.vecdot = (a * b).sum(-1)): the products, lane-wise sums of the four
//    8-wide vectors ((v0 + v1) + v2) + v3, then 0 + lane 0 + ... + lane 7 (ATen's vectorized inner sum);
//  - divisions are true fp32 divisions, fp16 is rounded to nearest even (F16C, as torch's conversion),
//    `round` is to nearest even, the squared-error comparison is in float64.
// tests/test_quantize.py compares it with the torch search on many shapes, zero blocks and ties included.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

namespace {

constexpr int64_t kBlock = 32;
// blocks.py's INT4_SCALE_CANDIDATES: d = peak / c for each c, in this order
constexpr float kDivisors[] = {-9.0f, -8.5f, -8.0f, -7.5f, -7.0f, -6.5f, 7.0f, 6.5f, 6.0f};

inline uint16_t to_half(float v) { return _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); }
inline float from_half(uint16_t h) { return _cvtsh_ss(h); }

// sum(a * b) over a block of 32 in torch's order (see the top)
inline float dot32(const __m256 a[4], const __m256 b[4]) {
  const __m256 lanes = _mm256_add_ps(
      _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(a[0], b[0]), _mm256_mul_ps(a[1], b[1])), _mm256_mul_ps(a[2], b[2])),
      _mm256_mul_ps(a[3], b[3]));
  alignas(32) float part[8];
  _mm256_store_ps(part, lanes);
  float total = 0.0f;
  for (float p : part) total += p;
  return total;
}

// blocks.py's error(): the squared error less sum(w^2), in float64
inline double error(float d, float wl, float ll) {
  const double dd = d;
  return dd * (dd * static_cast<double>(ll) - 2.0 * static_cast<double>(wl));
}

// levels round(w / d) clamped to [-8, 7] for the reciprocal `inverse`, as floats
inline void levels(const __m256 w[4], float inverse, __m256 out[4]) {
  const __m256 iv = _mm256_set1_ps(inverse), lo = _mm256_set1_ps(-8.0f), hi = _mm256_set1_ps(7.0f);
  for (int i = 0; i < 4; ++i) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(w[i], iv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    out[i] = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
  }
}

// One block of 32 (zero padded): q (0..15) and the fp16 bits of d, blocks.py's _round_int4_searched.
void search_block(const float* src, int64_t count, uint8_t* q, uint16_t* d_out) {
  alignas(32) float w[kBlock] = {};
  std::memcpy(w, src, count * sizeof(float));
  __m256 wv[4];
  for (int i = 0; i < 4; ++i) wv[i] = _mm256_load_ps(w + 8 * i);
  // llama.cpp's reference rounding: the first weight of largest magnitude is the signed peak, d = peak / -8
  int64_t at = 0;
  for (int64_t k = 1; k < kBlock; ++k)
    if (std::fabs(w[k]) > std::fabs(w[at])) at = k;
  const float peak = w[at];
  const float reference_d = peak / -8.0f;
  const float reference_inverse = reference_d == 0.0f ? 0.0f : 1.0f / reference_d;
  alignas(32) float level[kBlock];
  uint8_t reference_q[kBlock];
  for (int64_t k = 0; k < kBlock; ++k) {
    const float t = std::min(std::max(std::trunc(w[k] * reference_inverse + 8.5f), 0.0f), 15.0f);
    reference_q[k] = static_cast<uint8_t>(t);
    level[k] = static_cast<float>(reference_q[k]) - 8.0f;
  }
  __m256 lv[4];
  for (int i = 0; i < 4; ++i) lv[i] = _mm256_load_ps(level + 8 * i);
  uint16_t best_d = to_half(reference_d);
  double best_error = error(from_half(best_d), dot32(wv, lv), dot32(lv, lv));
  bool searched = false;
  float best_inverse = 0.0f;
  for (const float divisor : kDivisors) {
    const float d = from_half(to_half(peak / divisor));
    const float inverse = d == 0.0f ? 0.0f : 1.0f / d;
    levels(wv, inverse, lv);
    const float wl = dot32(wv, lv), ll = dot32(lv, lv);
    const uint16_t fitted = to_half(ll > 0.0f ? wl / std::max(ll, 1.0f) : d);  // least squares, then fp16
    const double candidate = error(from_half(fitted), wl, ll);
    if (candidate < best_error) {
      best_error = candidate;
      best_d = fitted;
      best_inverse = inverse;
      searched = true;
    }
  }
  if (searched) {
    levels(wv, best_inverse, lv);
    for (int i = 0; i < 4; ++i) _mm256_store_ps(level + 8 * i, _mm256_add_ps(lv[i], _mm256_set1_ps(8.0f)));
    for (int64_t k = 0; k < count; ++k) q[k] = static_cast<uint8_t>(level[k]);
  } else {
    std::memcpy(q, reference_q, count);
  }
  *d_out = best_d;
}

std::tuple<at::Tensor, at::Tensor> quantize_int4_blocks(const at::Tensor& weight) {
  const char* op = "gpt2chat::quantize_int4_blocks";
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2 &&
                  weight.is_contiguous(),
              op, ": weight must be a contiguous float32 [N, K] CPU matrix, got ", weight.scalar_type(), " ",
              weight.sizes(), " on ", weight.device());
  const int64_t N = weight.size(0), K = weight.size(1), G = (K + kBlock - 1) / kBlock;
  at::Tensor q = at::empty({N, K}, weight.options().dtype(at::kByte));
  at::Tensor d = at::empty({N, G}, weight.options().dtype(at::kHalf));
  const float* w = weight.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  auto* dp = reinterpret_cast<uint16_t*>(d.data_ptr());
  at::parallel_for(0, N, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, K)), [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t count = std::min(kBlock, K - g * kBlock);
        search_block(w + n * K + g * kBlock, count, qp + n * K + g * kBlock, dp + n * G + g);
      }
  });
  return {q, d};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2chat, m) {
  m.def("quantize_int4_blocks(Tensor weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gpt2chat, CPU, m) {
  m.impl("quantize_int4_blocks", &quantize_int4_blocks);
}
