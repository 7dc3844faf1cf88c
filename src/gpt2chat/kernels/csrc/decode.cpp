// One GPT-2 decode step as one native call: every batch row adds ONE token to its own KV-cache row.
//
// `gpt2chat::decode_step` runs the whole stack of blocks for B rows (each at its own cache length) and
// returns the final layer-normed hidden states; the LM head stays a separate call (gpt2chat/fused_decode.py
// builds the arguments once per model and says when this path is taken). Per layer:
//   h = LN1(x); qkv = c_attn(h); k, v -> cache[row, :, position]; y = attention of q over the row's keys
//   0 .. position; x += c_proj(y); h = LN2(x); x += mlp.c_proj(gelu_tanh(c_fc(h)))
// and ln_f at the end. The four projections call the same at::Tensor-level kernels the `gpt2chat::linear_*`
// ops run (ops.h), so each weight format gives exactly the numbers of the module path's projection; what
// this file adds is everything between them, without a torch op, a Python frame or a module call:
//  - the embedding: the token's row read from wte in its format (fp32, or the tied head's fp16 / int8 / int4
//    packed rows, widened as packing.py's gather functions do) plus wpe's row;
//  - LayerNorm: two passes over the row in fp32 (mean, then the variance of the deviations);
//  - GELU (tanh form): x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3), the same function as
//    0.5 x (1 + tanh(u)), with a vectorised exp (degree-7 polynomial after range reduction, ~1 ulp);
//  - attention: one query per (row, head) over that row's cached keys, threaded over rows x heads: AVX2
//    dot products over head_dim, a max-subtracted softmax, the weighted sum of the values.
// Layout of the arguments (fused_decode.py writes them): wte is [weight] (fp32 / fp16) or [weight, scale];
//  weights: kPerLayer tensors per layer (below), then ln_f's weight and bias; a projection's absent scale or
//  bias is an empty tensor. formats: 4 per layer (c_attn, attn.c_proj, c_fc, mlp.c_proj), the Format codes.
//  keys / values: the KVCache's [rows, heads, max_len, head_dim] fp32 tensors, one per layer.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "common.h"
#include "ops.h"

namespace {

using gpt2chat_kernels::hsum;

enum Format : int64_t { kF32 = 0, kF16 = 1, kI8 = 2, kI8Q8 = 3, kI4Q8 = 4 };
enum Slot : int64_t {
  kLn1W, kLn1B, kAttnW, kAttnS, kAttnB, kAProjW, kAProjS, kAProjB,
  kLn2W, kLn2B, kFcW, kFcS, kFcB, kMProjW, kMProjS, kMProjB, kPerLayer
};
constexpr int64_t kFormatsPerLayer = 4;

std::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? std::optional<at::Tensor>(t) : std::nullopt;
}

// y = x W^T + b through the kernel of W's format (the same function the module's op runs).
at::Tensor project(const at::Tensor& x, int64_t format, const at::Tensor& weight, const at::Tensor& scale,
                   const at::Tensor& bias, int64_t out_features) {
  const std::optional<at::Tensor> b = present(bias);
  switch (format) {
    case kF32: return gpt2chat_kernels::linear_f32(x, weight, b, -1);
    case kF16: return gpt2chat_kernels::linear_f16(x, weight, out_features, b, -1);
    case kI8: return gpt2chat_kernels::linear_i8(x, weight, scale, b, -1);
    case kI8Q8: return gpt2chat_kernels::linear_i8_q8(x, weight, scale, b, -1);
    case kI4Q8: return gpt2chat_kernels::linear_i4_q8(x, weight, scale, out_features, b, -1);
    default: TORCH_CHECK(false, "gpt2chat::decode_step: unknown weight format ", format);
  }
}

// exp(x) for 8 floats: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor polynomial to degree 7 (relative
// error < 1e-8 there), times 2^n built in the exponent bits. Inputs are clamped to where the result is a
// normal float.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

inline float gelu1(float x) {
  const float u = kGeluC * (x + kGeluA * x * x * x);
  return x / (1.0f + std::exp(-2.0f * u));
}

// gelu_tanh in place over n floats.
void gelu(float* p, int64_t n) {
  at::parallel_for(0, n, 1 << 13, [&](int64_t a, int64_t b) {
    int64_t i = a;
    const __m256 c = _mm256_set1_ps(-2.0f * kGeluC), ca = _mm256_set1_ps(kGeluA), one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= b; i += 8) {
      const __m256 x = _mm256_loadu_ps(p + i);
      const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(ca, x), _mm256_mul_ps(x, x), x);  // x + a x^3
      const __m256 e = exp8(_mm256_mul_ps(c, inner));
      _mm256_storeu_ps(p + i, _mm256_div_ps(x, _mm256_add_ps(one, e)));
    }
    for (; i < b; ++i) p[i] = gelu1(p[i]);
  });
}

// out[b] = LayerNorm(x[b]) * w + bias for B rows of C.
void layer_norm(const float* x, int64_t B, int64_t C, const float* w, const float* bias, float eps, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* row = x + b * C;
    float* dst = out + b * C;
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= C; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(row + i));
    float sum = hsum(acc);
    for (; i < C; ++i) sum += row[i];
    const float mean = sum / static_cast<float>(C);
    const __m256 mv = _mm256_set1_ps(mean);
    acc = _mm256_setzero_ps();
    for (i = 0; i + 8 <= C; i += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(row + i), mv);
      acc = _mm256_fmadd_ps(d, d, acc);
    }
    float squares = hsum(acc);
    for (; i < C; ++i) squares += (row[i] - mean) * (row[i] - mean);
    const float rstd = 1.0f / std::sqrt(squares / static_cast<float>(C) + eps);
    const __m256 rv = _mm256_set1_ps(rstd);
    for (i = 0; i + 8 <= C; i += 8) {
      const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(row + i), mv), rv);
      _mm256_storeu_ps(dst + i, _mm256_fmadd_ps(d, _mm256_loadu_ps(w + i), _mm256_loadu_ps(bias + i)));
    }
    for (; i < C; ++i) dst[i] = (row[i] - mean) * rstd * w[i] + bias[i];
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Writes this step's k / v of every (row, head) into the cache and attends the row's query over its keys
// 0 .. position. qkv [B, 3C] (q | k | v, heads of D inside each); y [B, C].
void attend(const float* qkv, int64_t B, int64_t H, int64_t D, const int64_t* cache_rows, const int64_t* positions,
            float* keys, float* values, int64_t max_len, float* y) {
  const int64_t C = H * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t longest = *std::max_element(positions, positions + B) + 1;
  // threads only where the work pays for the fork / join (a short cache at one row stays on one thread)
  const int64_t grain = std::max<int64_t>(1, gpt2chat_kernels::kThreadWork / std::max<int64_t>(1, 2 * longest * D));
  at::parallel_for(0, B * H, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(longest);
    std::vector<float> acc(D);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / H, h = task % H, n = positions[b] + 1;
      const float* q = qkv + b * 3 * C + h * D;
      float* k = keys + (cache_rows[b] * H + h) * max_len * D;
      float* v = values + (cache_rows[b] * H + h) * max_len * D;
      std::copy_n(q + C, D, k + positions[b] * D);
      std::copy_n(q + 2 * C, D, v + positions[b] * D);
      float top = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        scores[j] = dot(q, k + j * D, D) * scale;
        top = std::max(top, scores[j]);
      }
      const __m256 tv = _mm256_set1_ps(top);
      __m256 sv = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores.data() + j), tv));
        _mm256_storeu_ps(scores.data() + j, e);
        sv = _mm256_add_ps(sv, e);
      }
      float total = hsum(sv);
      for (; j < n; ++j) {
        scores[j] = std::exp(scores[j] - top);
        total += scores[j];
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (j = 0; j < n; ++j) {
        const __m256 p = _mm256_set1_ps(scores[j]);
        const float* vj = v + j * D;
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) {
          _mm256_storeu_ps(acc.data() + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + d), _mm256_loadu_ps(acc.data() + d)));
        }
        for (; d < D; ++d) acc[d] += scores[j] * vj[d];
      }
      float* out = y + b * C + h * D;
      const float inverse = 1.0f / total;
      for (int64_t d = 0; d < D; ++d) out[d] = acc[d] * inverse;
    }
  });
}

// x[b] = wte[ids[b]] + wpe[positions[b]]: the token's row read from the (tied) embedding in its own format,
// widened exactly as gpt2chat.kernels.packing's gather functions widen it (the module path's lookup).
void embed(const int64_t* ids, const int64_t* positions, int64_t B, int64_t C, int64_t format, at::TensorList wte,
           const float* wpe, float* x) {
  const int64_t chunks = (C + 7) / 8, groups = (C + 31) / 32;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = ids[b];
    float* dst = x + b * C;
    if (format == kF32) {
      std::copy_n(wte[0].data_ptr<float>() + n * C, C, dst);
    } else if (format == kF16 || format == kI8 || format == kI8Q8) {
      // packed 4x8: column c of row n at ((n / 4) * chunks + c / 8) * 32 + (n % 4) * 8 + c % 8
      const int64_t base = (n / 4) * chunks * 32 + (n % 4) * 8;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t at = base + (c / 8) * 32 + c % 8;
        dst[c] = format == kF16 ? _cvtsh_ss(static_cast<uint16_t>(wte[0].data_ptr<int16_t>()[at]))
                                : static_cast<float>(wte[0].data_ptr<int8_t>()[at]) *
                                      wte[1].data_ptr<float>()[n * groups + c / 32];
      }
    } else {  // int4: byte h*32 + r*8 + c of group g of block n / 4 holds columns 16h + c (low), 16h + 8 + c
      const uint8_t* lines = wte[0].data_ptr<uint8_t>() + (n / 4) * groups * 64 + (n % 4) * 8;
      const uint16_t* scales = reinterpret_cast<const uint16_t*>(wte[1].data_ptr<int16_t>()) + (n / 4) * groups * 4;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t g = c / 32, within = c % 32, h = within / 16, nibble = (within % 16) / 8;
        const uint8_t byte = lines[g * 64 + h * 32 + within % 8];
        const int q = nibble ? byte >> 4 : byte & 0x0F;
        dst[c] = static_cast<float>(q - 8) * _cvtsh_ss(scales[g * 4 + n % 4]);
      }
    }
    const float* row = wpe + positions[b] * C;
    for (int64_t c = 0; c < C; ++c) dst[c] += row[c];
  }
}

// The embedding's tensors as decode_step takes them: [weight] for fp32 / fp16, [weight, scale] for int8 /
// int4 (the tied head's packed tensors); returns its row count.
int64_t check_embedding(int64_t format, at::TensorList wte, int64_t C) {
  const char* op = "gpt2chat::decode_step";
  TORCH_CHECK(format >= kF32 && format <= kI4Q8, op, ": unknown embedding format ", format);
  const bool scaled = format == kI8 || format == kI8Q8 || format == kI4Q8;
  TORCH_CHECK(static_cast<int64_t>(wte.size()) == (scaled ? 2 : 1), op, ": the embedding of format ", format,
              " takes ", scaled ? 2 : 1, " tensors, got ", wte.size());
  for (const at::Tensor& t : wte) TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), op, ": embedding tensors must be contiguous CPU tensors");
  const at::Tensor& w = wte[0];
  const int64_t chunks = (C + 7) / 8, groups = (C + 31) / 32;
  if (format == kF32) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(1) == C, op, ": fp32 embedding must be [V, ", C, "]");
    return w.size(0);
  }
  if (format == kF16 || format == kI8 || format == kI8Q8) {
    TORCH_CHECK(w.scalar_type() == (format == kF16 ? at::kShort : at::kChar) && w.dim() == 4 && w.size(1) == chunks,
                op, ": packed embedding must be [ceil(V/4), ", chunks, ", 4, 8], got ", w.sizes());
    if (format == kF16) return w.size(0) * 4;
    TORCH_CHECK(wte[1].scalar_type() == at::kFloat && wte[1].dim() == 2 && wte[1].size(1) == groups, op,
                ": int8 embedding scales must be float32 [V, ", groups, "]");
    return std::min(w.size(0) * 4, wte[1].size(0));
  }
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && w.size(1) == groups && w.size(2) == 64 &&
                  wte[1].scalar_type() == at::kShort && wte[1].dim() == 3 && wte[1].size(0) == w.size(0),
              op, ": int4 embedding must be uint8 [ceil(V/4), ", groups, ", 64] with int16 scales");
  return w.size(0) * 4;
}

void add_into(float* x, const float* a, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(a + i)));
  for (; i < n; ++i) x[i] += a[i];
}

void check_f32(const at::Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel,
              "gpt2chat::decode_step: ", what, " must be a contiguous float32 CPU tensor of ", numel,
              " elements, got ", t.scalar_type(), " ", t.sizes());
}

at::Tensor decode_step(const at::Tensor& ids, at::TensorList wte, int64_t wte_format, int64_t vocab,
                       const at::Tensor& wpe, const at::Tensor& positions,
                       const std::optional<at::Tensor>& rows, int64_t first_row, at::TensorList keys,
                       at::TensorList values, at::TensorList weights, at::IntArrayRef formats, int64_t n_head,
                       int64_t inner, double eps) {
  const char* op = "gpt2chat::decode_step";
  const int64_t C = wpe.size(-1), B = ids.numel();
  const int64_t layers = static_cast<int64_t>(keys.size());
  TORCH_CHECK(n_head > 0 && C % n_head == 0, op, ": ", C, " features do not split into ", n_head, " heads");
  const int64_t D = C / n_head;
  TORCH_CHECK(static_cast<int64_t>(values.size()) == layers, op, ": ", layers, " key tensors but ", values.size(),
              " value tensors");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kPerLayer + 2, op, ": expected ",
              layers * kPerLayer + 2, " weight tensors for ", layers, " layers, got ", weights.size());
  TORCH_CHECK(static_cast<int64_t>(formats.size()) == layers * kFormatsPerLayer, op, ": expected ",
              layers * kFormatsPerLayer, " formats, got ", formats.size());
  TORCH_CHECK(B > 0, op, ": no rows");
  TORCH_CHECK(wpe.scalar_type() == at::kFloat && wpe.dim() == 2 && wpe.is_contiguous() && wpe.device().is_cpu(), op,
              ": wpe must be a contiguous float32 [positions, features] CPU matrix");
  const int64_t rows_in_wte = check_embedding(wte_format, wte, C);
  TORCH_CHECK(vocab > 0 && vocab <= rows_in_wte, op, ": vocab ", vocab, " but the embedding holds ", rows_in_wte,
              " rows");
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong, op, ": token ids must be int64 on the CPU");
  const at::Tensor tokens = ids.reshape({-1}).contiguous();
  const int64_t* token = tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(token[b] >= 0 && token[b] < vocab, op, ": token id ", token[b], " of row ", b,
                " is outside the vocabulary (", vocab, ")");
  const at::Tensor pos = positions.reshape({-1}).to(at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == B, op, ": ", B, " rows but ", pos.numel(), " positions");
  std::vector<int64_t> cache_rows(B);
  if (rows.has_value()) {
    const at::Tensor r = rows->reshape({-1}).to(at::kLong).contiguous();
    TORCH_CHECK(r.numel() == B, op, ": ", B, " rows but ", r.numel(), " cache rows");
    std::copy_n(r.data_ptr<int64_t>(), B, cache_rows.begin());
  } else {
    for (int64_t b = 0; b < B; ++b) cache_rows[b] = first_row + b;
  }
  TORCH_CHECK(layers > 0, op, ": no layers");
  const at::Tensor& k0 = keys[0];
  TORCH_CHECK(k0.dim() == 4 && k0.size(1) == n_head && k0.size(3) == D, op, ": the KV cache must be [rows, ",
              n_head, ", max_len, ", D, "], got ", k0.sizes());
  const int64_t cache_batch = k0.size(0), max_len = k0.size(2);
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] < max_len && p[b] < wpe.size(0), op, ": position ", p[b], " of row ", b,
                " is outside the cache (", max_len, ") or the context (", wpe.size(0), ")");
    TORCH_CHECK(cache_rows[b] >= 0 && cache_rows[b] < cache_batch, op, ": cache row ", cache_rows[b],
                " of batch row ", b, " is outside the cache's ", cache_batch, " rows");
  }
  for (int64_t l = 0; l < layers; ++l) {
    check_f32(keys[l], cache_batch * n_head * max_len * D, "every cache key tensor");
    check_f32(values[l], cache_batch * n_head * max_len * D, "every cache value tensor");
  }

  const at::TensorOptions options = wpe.options();
  at::Tensor x = at::empty({B, C}, options), h = at::empty({B, C}, options), y = at::empty({B, C}, options);
  float* xp = x.data_ptr<float>();
  embed(token, p, B, C, wte_format, wte, wpe.data_ptr<float>(), xp);

  const float epsf = static_cast<float>(eps);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = weights.data() + l * kPerLayer;
    const int64_t* f = formats.data() + l * kFormatsPerLayer;
    check_f32(w[kLn1W], C, "ln_1.weight");
    check_f32(w[kLn1B], C, "ln_1.bias");
    check_f32(w[kLn2W], C, "ln_2.weight");
    check_f32(w[kLn2B], C, "ln_2.bias");
    layer_norm(xp, B, C, w[kLn1W].data_ptr<float>(), w[kLn1B].data_ptr<float>(), epsf, h.data_ptr<float>());
    const at::Tensor qkv = project(h, f[0], w[kAttnW], w[kAttnS], w[kAttnB], 3 * C).contiguous();
    TORCH_CHECK(qkv.numel() == B * 3 * C, op, ": c_attn of layer ", l, " gave ", qkv.sizes(), ", not [", B, ", ",
                3 * C, "]");
    attend(qkv.data_ptr<float>(), B, n_head, D, cache_rows.data(), p, keys[l].data_ptr<float>(),
           values[l].data_ptr<float>(), max_len, y.data_ptr<float>());
    const at::Tensor a = project(y, f[1], w[kAProjW], w[kAProjS], w[kAProjB], C).contiguous();
    TORCH_CHECK(a.numel() == B * C, op, ": attn.c_proj of layer ", l, " gave ", a.sizes());
    add_into(xp, a.data_ptr<float>(), B * C);
    layer_norm(xp, B, C, w[kLn2W].data_ptr<float>(), w[kLn2B].data_ptr<float>(), epsf, h.data_ptr<float>());
    at::Tensor hidden = project(h, f[2], w[kFcW], w[kFcS], w[kFcB], inner).contiguous();
    TORCH_CHECK(hidden.numel() == B * inner, op, ": c_fc of layer ", l, " gave ", hidden.sizes(), ", not [", B,
                ", ", inner, "]");
    gelu(hidden.data_ptr<float>(), B * inner);
    const at::Tensor m = project(hidden, f[3], w[kMProjW], w[kMProjS], w[kMProjB], C).contiguous();
    TORCH_CHECK(m.numel() == B * C, op, ": mlp.c_proj of layer ", l, " gave ", m.sizes());
    add_into(xp, m.data_ptr<float>(), B * C);
  }
  const at::Tensor& lnf_w = weights[layers * kPerLayer];
  const at::Tensor& lnf_b = weights[layers * kPerLayer + 1];
  check_f32(lnf_w, C, "ln_f.weight");
  check_f32(lnf_b, C, "ln_f.bias");
  layer_norm(xp, B, C, lnf_w.data_ptr<float>(), lnf_b.data_ptr<float>(), epsf, h.data_ptr<float>());
  return h.view({B, 1, C});
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt2chat, CPU, m) {
  m.impl("decode_step", &decode_step);
}
