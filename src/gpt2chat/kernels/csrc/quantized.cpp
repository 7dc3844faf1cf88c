// y = q8(x) W^T + b on the CPU for int8 or int4 weights, where q8(x) is the activation rounded to int8 in
// blocks of 32 (one fp32 scale a block: d = max|x| / 127, q = round(x * 127 / max|x|), ties to even), as
// llama.cpp's q8_0 / q4_0 matmuls do. The product of a weight block and an activation block is computed in
// integer arithmetic (AVX2 maddubs + madd: 32 multiply-adds in two instructions), exact, and scaled by the
// two blocks' scales into an fp32 accumulator. Registered as the CPU kernels of `gpt2chat::linear_i8_q8`
// and `gpt2chat::linear_i4_q8` (schemas and the portable kernels, which compute the same numbers with plain
// torch, live in Python: gpt2chat/kernels/__init__.py and portable.py).
//
// Layouts (gpt2chat/kernels/packing.py writes them):
//  - int8: packed 4x8 as in linear.cpp, scales fp32 [N, ceil(K/32)]. One 32-byte load is an 8-column chunk
//    of 4 rows; it meets the 8 activation bytes of that chunk broadcast to the 4 rows, and the madd's eight
//    int32 lanes are (row 0, row 0, row 1, row 1, ...). llama.cpp's trick makes maddubs (unsigned x signed)
//    take signed weights: |w| times x with w's sign.
//  - int4: [ceil(N/4), ceil(K/32), 64] bytes: the 32 columns of a block of 4 rows in one 64-byte line.
//    Byte h*32 + r*8 + c holds column 16h + c of row r in its low nibble and column 16h + 8 + c in its
//    high one, as q + 8 in [0, 15] (the weight is (q - 8) * scale). Scales fp16 [ceil(N/4), ceil(K/32), 4].
//    An AND and a shift give four 4x8 chunks ready for maddubs (the unsigned nibble times the signed
//    activation); the "- 8" is one integer correction per block, 8 * sum(q8(x) of the block).
//    Padding rows have scale 0; padding columns hold q = 8 (weight 0).
// Every number of input rows M runs the same integer kernel by default: each weight block (4 rows, a few KB,
// in L1) meets kInputs input rows per pass (a register block over weight rows x input rows), so a loaded
// weight vector serves kInputs rows; threads split the output columns. Measured on this 2-core Zen 3, one
// core, weights in cache (benchmarks/kernel_speed.py --working-set 0): int8 90-106% and int4 116-135% of
// the fp32 sgemm peak at M = 4..512, 1.2-1.5x the widened-sgemm path at every M up to 512, so that path
// (weights widened by tiles to fp32 and multiplied by sgemm with the dequantized activations, the same
// numbers up to fp32 rounding) runs only past an explicit `small_m_max` (tests, benchmarks).

#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common.h"
#include "ops.h"

namespace {

using gpt2chat_kernels::kThreadWork;
using gpt2chat_kernels::linear_frame;
using gpt2chat_kernels::rows_in_passes;

constexpr int64_t kBlock = 32;          // activation / weight block (columns per scale)

struct QuantizedRows {
  int64_t M = 0, G = 0;
  std::vector<int8_t> q;    // [M, G * 32], zero padded
  std::vector<float> d;     // [M, G]
  std::vector<int32_t> s;   // [M, G]: sum of q over the block (int4's correction)
};

// q8(x): the per-block rounding described at the top, bit for bit what portable.quantize_activations does.
QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K) {
  QuantizedRows out;
  out.M = M;
  out.G = (K + kBlock - 1) / kBlock;
  out.q.assign(M * out.G * kBlock, 0);
  out.d.assign(M * out.G, 0.0f);
  out.s.assign(M * out.G, 0);
  at::parallel_for(0, M * out.G, std::max<int64_t>(1, kThreadWork / kBlock), [&](int64_t a, int64_t b) {
    float buffer[kBlock];
    for (int64_t index = a; index < b; ++index) {
      const int64_t m = index / out.G, g = index % out.G;
      const int64_t n = std::min(kBlock, K - g * kBlock);
      const float* src = x + m * K + g * kBlock;
      for (int64_t i = 0; i < kBlock; ++i) buffer[i] = i < n ? src[i] : 0.0f;
      const __m256 sign = _mm256_set1_ps(-0.0f);
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(buffer + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float top = _mm_cvtss_f32(m4);
      const float inverse = top > 0.0f ? 127.0f / top : 0.0f;
      const __m256 iv = _mm256_set1_ps(inverse);
      __m256i q32[4];
      for (int i = 0; i < 4; ++i) {
        q32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], iv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
      // int32 x 32 -> int8 x 32 in column order (packs work within 128-bit lanes; the permute undoes it)
      const __m256i p16a = _mm256_packs_epi32(q32[0], q32[1]);
      const __m256i p16b = _mm256_packs_epi32(q32[2], q32[3]);
      __m256i p8 = _mm256_packs_epi16(p16a, p16b);
      p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      int8_t* dst = out.q.data() + index * kBlock;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), p8);
      int32_t total = 0;
      for (int i = 0; i < kBlock; ++i) total += dst[i];
      out.d[index] = top / 127.0f;
      out.s[index] = total;
    }
  });
  return out;
}

inline __m256i broadcast8(const int8_t* p) {
  int64_t bits;
  std::memcpy(&bits, p, 8);
  return _mm256_set1_epi64x(bits);
}

// Sums of the 8 lanes (row 0, row 0, row 1, row 1, ...) into rows[0..3].
inline void lanes_to_rows(__m256 acc, float rows[4]) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (int r = 0; r < 4; ++r) rows[r] = lanes[2 * r] + lanes[2 * r + 1];
}

// The I input rows m0 .. m0 + I - 1 of xq: their q8 blocks and scales.
template <int I>
struct InputRows {
  const int8_t* q[I];
  const float* d[I];
  const int32_t* s[I];
  InputRows(const QuantizedRows& xq, int64_t m0) {
    for (int i = 0; i < I; ++i) {
      q[i] = xq.q.data() + (m0 + i) * xq.G * kBlock;
      d[i] = xq.d.data() + (m0 + i) * xq.G;
      s[i] = xq.s.data() + (m0 + i) * xq.G;
    }
  }
};

// int8 weights (packed 4x8) x I q8 rows: rows[i][r] = dot(weight row r of the block, input row i). Each
// 32-byte weight load (and its |w|) serves all I input rows; per row and chunk: a broadcast, the sign, the
// maddubs and the madd. I = 1 is the decode GEMV, which also prefetches the weight stream.
template <int I>
inline void dot4_i8(const int8_t* block, int64_t chunks, const float* const srow[4], const InputRows<I>& in,
                    int64_t G, float rows[I][4]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[I];
  for (int i = 0; i < I; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t j0 = g * 4, j1 = std::min(chunks, j0 + 4);
    __m256i isum[I];
    for (int i = 0; i < I; ++i) isum[i] = _mm256_setzero_si256();
    for (int64_t j = j0; j < j1; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(block + j * 32) + 1024, _MM_HINT_T0);
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + j * 32));
      const __m256i aw = _mm256_sign_epi8(w, w);
      for (int i = 0; i < I; ++i) {
        const __m256i xv = broadcast8(in.q[i] + j * 8);
        const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w));
        isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(p, ones));
      }
    }
    const __m256 sv = _mm256_setr_ps(srow[0][g], srow[0][g], srow[1][g], srow[1][g], srow[2][g], srow[2][g],
                                     srow[3][g], srow[3][g]);
    for (int i = 0; i < I; ++i) {
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), _mm256_mul_ps(sv, _mm256_set1_ps(in.d[i][g])), acc[i]);
    }
  }
  for (int i = 0; i < I; ++i) lanes_to_rows(acc[i], rows[i]);
}

// int4 weights x I q8 rows: rows[i][r] as above for the block whose 64-byte lines start at `block`. The
// four unpacked 4x8 nibble chunks of a line serve all I input rows; per row and line: four broadcasts and
// maddubs summed in int16 (|sum| <= 4 * 2 * 15 * 127), one madd and the "- 8" correction.
template <int I>
inline void dot4_i4(const uint8_t* block, const uint16_t* scales, const InputRows<I>& in, int64_t G,
                    float rows[I][4]) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i first_lanes = _mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0);  // one lane per row
  __m256 acc[I];
  for (int i = 0; i < I; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* p = block + g * 64;
    _mm_prefetch(reinterpret_cast<const char*>(p) + 1024, _MM_HINT_T0);
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
    const __m256i w0 = _mm256_and_si256(v0, low), w1 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
    const __m256i w2 = _mm256_and_si256(v1, low), w3 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
    __m128i half = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales + g * 4));
    half = _mm_unpacklo_epi16(half, half);  // s0 s0 s1 s1 s2 s2 s3 s3
    const __m256 sv = _mm256_cvtph_ps(half);
    for (int i = 0; i < I; ++i) {
      const int8_t* xb = in.q[i] + g * kBlock;
      __m256i s16 = _mm256_maddubs_epi16(w0, broadcast8(xb));
      s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w1, broadcast8(xb + 8)));
      s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w2, broadcast8(xb + 16)));
      s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w3, broadcast8(xb + 24)));
      // sum (q - 8) x = sum q x - 8 sum x, taken off one lane per row
      const __m256i correction = _mm256_and_si256(_mm256_set1_epi32(8 * in.s[i][g]), first_lanes);
      const __m256i isum = _mm256_sub_epi32(_mm256_madd_epi16(s16, ones), correction);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(sv, _mm256_set1_ps(in.d[i][g])), acc[i]);
    }
  }
  for (int i = 0; i < I; ++i) lanes_to_rows(acc[i], rows[i]);
}

inline void store4(const float* rows, int64_t n, int64_t N, int64_t m, const float* bias, float* y) {
  for (int r = 0; r < 4 && n + r < N; ++r) y[m * N + n + r] = rows[r] + (bias ? bias[n + r] : 0.0f);
}

// Rows [m0, m0 + I) of the output for one weight block of 4 rows: `dot(in, rows)` fills rows[I][4].
template <int I, class Dot>
inline void store_block(int64_t m0, const QuantizedRows& xq, int64_t n, int64_t N, const float* bias, float* y,
                        Dot dot) {
  float rows[I][4];
  const InputRows<I> in(xq, m0);
  dot(in, rows);
  for (int i = 0; i < I; ++i) store4(rows[i], n, N, m0 + i, bias, y);
}

// Every input row against one weight block: kInputs rows a pass (the register block), then the rest.
constexpr int kInputs = 4;
template <class Dot>
inline void all_inputs(const QuantizedRows& xq, int64_t n, int64_t N, const float* bias, float* y, Dot dot) {
  rows_in_passes<kInputs>(xq.M, [&](auto rows, int64_t m) {
    store_block<decltype(rows)::value>(m, xq, n, N, bias, y, dot);
  });
}

at::Tensor dequantized(const QuantizedRows& xq, int64_t K, const at::TensorOptions& options) {
  at::Tensor out = at::empty({xq.M, K}, options);
  float* dst = out.data_ptr<float>();
  for (int64_t m = 0; m < xq.M; ++m)
    for (int64_t k = 0; k < K; ++k) dst[m * K + k] = xq.q[m * xq.G * kBlock + k] * xq.d[m * xq.G + k / kBlock];
  return out;
}

// rows [n0, n1) of an int4 weight as fp32 into dst [n1 - n0, K]
void widen_i4(const uint8_t* w, const uint16_t* scales, int64_t G, int64_t K, int64_t n0, int64_t n1, float* dst) {
  at::parallel_for(n0, n1, std::max<int64_t>(1, kThreadWork / std::max<int64_t>(1, K)), [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      const int64_t blk = n / 4, r = n % 4;
      float* out = dst + (n - n0) * K;
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* p = w + (blk * G + g) * 64 + r * 8;
        const float d = _cvtsh_ss(scales[(blk * G + g) * 4 + r]);
        float col[kBlock];
        for (int h = 0; h < 2; ++h)
          for (int c = 0; c < 8; ++c) {
            const uint8_t byte = p[h * 32 + c];
            col[16 * h + c] = static_cast<float>((byte & 0x0F) - 8) * d;
            col[16 * h + 8 + c] = static_cast<float>((byte >> 4) - 8) * d;
          }
        const int64_t count = std::min(kBlock, K - g * kBlock);
        std::memcpy(out + g * kBlock, col, count * sizeof(float));
      }
    }
  });
}

void check_input(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t N,
                 const char* op) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": CPU kernel called with a non-CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32 on the CPU, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a feature dimension");
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N &&
                    bias->is_contiguous() && bias->device().is_cpu(),
                op, ": bias must be a contiguous float32 vector of ", N);
  }
}

// Hands the one-pass kernel (`few`) or the prefill path (`many`) the quantized 2-D input.
template <class Few, class Many>
at::Tensor run(const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& bias, int64_t small_m_max, Few few,
               Many many) {
  return linear_frame(x, N, bias, [&](const at::Tensor& x2d, at::Tensor& y2d) {
    const int64_t M = x2d.size(0), K = x2d.size(1);
    const QuantizedRows xq = quantize_rows(x2d.data_ptr<float>(), M, K);
    if (small_m_max < 0 || M <= small_m_max) {
      const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
      float* y = y2d.data_ptr<float>();
      const int64_t blocks = (N + 3) / 4;
      const int64_t grain = std::max<int64_t>(1, kThreadWork / std::max<int64_t>(1, 4 * K * M));
      at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) few(blk, xq, b, y);
      });
    } else {
      at::Tensor xd = dequantized(xq, K, x.options());
      many(xd, y2d);
    }
  });
}

}  // namespace

namespace gpt2chat_kernels {

at::Tensor linear_i8_q8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                        const std::optional<at::Tensor>& bias, int64_t small_m_max) {
  const char* op = "gpt2chat::linear_i8_q8";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a feature dimension");
  const int64_t K = x.size(-1), G = (K + kBlock - 1) / kBlock;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 2 && scale.size(1) == G && scale.is_contiguous() &&
                  scale.device().is_cpu(),
              op, ": scale must be a contiguous float32 [N, ", G, "] matrix, got ", scale.scalar_type(), " ",
              scale.sizes());
  const int64_t N = scale.size(0);
  check_input(x, weight, bias, N, op);
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 4 && weight.size(0) == (N + 3) / 4 &&
                  weight.size(1) == (K + 7) / 8 && weight.size(2) == 4 && weight.size(3) == 8,
              op, ": weight must be int8 packed 4x8, [", (N + 3) / 4, ", ", (K + 7) / 8, ", 4, 8], got ",
              weight.scalar_type(), " ", weight.sizes());
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  const int64_t chunks = (K + 7) / 8;
  const std::vector<float> zeros(G, 0.0f);
  auto few = [&](int64_t blk, const QuantizedRows& xq, const float* b, float* y) {
    const int64_t n = blk * 4;
    const float* srow[4];
    for (int r = 0; r < 4; ++r) srow[r] = n + r < N ? s + (n + r) * G : zeros.data();
    const int8_t* block = w + blk * 4 * chunks * 8;
    all_inputs(xq, n, N, b, y, [&](const auto& in, auto& rows) { dot4_i8(block, chunks, srow, in, G, rows); });
  };
  auto many = [&](const at::Tensor& xd, at::Tensor& y2d) {
    y2d.copy_(linear_i8(xd, weight, scale, bias, 0));
  };
  return run(x, N, bias, small_m_max, few, many);
}

at::Tensor linear_i4_q8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t out_features,
                        const std::optional<at::Tensor>& bias, int64_t small_m_max) {
  const char* op = "gpt2chat::linear_i4_q8";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a feature dimension");
  const int64_t K = x.size(-1), G = (K + kBlock - 1) / kBlock, N = out_features, NB = (N + 3) / 4;
  check_input(x, weight, bias, N, op);
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 3 && weight.size(0) == NB && weight.size(1) == G &&
                  weight.size(2) == 64,
              op, ": weight must be uint8 packed int4, [", NB, ", ", G, ", 64] (gpt2chat.kernels.pack_int4), got ",
              weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kShort && scale.dim() == 3 && scale.size(0) == NB && scale.size(1) == G &&
                  scale.size(2) == 4 && scale.is_contiguous() && scale.device().is_cpu(),
              op, ": scale must be a contiguous int16 (fp16 bits) [", NB, ", ", G, ", 4] tensor, got ",
              scale.scalar_type(), " ", scale.sizes());
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<int16_t>());
  auto few = [&](int64_t blk, const QuantizedRows& xq, const float* b, float* y) {
    const uint8_t* block = w + blk * G * 64;
    const uint16_t* scales = s + blk * G * 4;
    all_inputs(xq, blk * 4, N, b, y, [&](const auto& in, auto& rows) { dot4_i4(block, scales, in, G, rows); });
  };
  auto many = [&](const at::Tensor& xd, at::Tensor& y2d) {
    gpt2chat_kernels::widened_sgemm(
        xd, N, K, [&](int64_t n0, int64_t n1, float* dst) { widen_i4(w, s, G, K, n0, n1, dst); }, bias, y2d);
  };
  return run(x, N, bias, small_m_max, few, many);
}

}  // namespace gpt2chat_kernels

TORCH_LIBRARY_IMPL(gpt2chat, CPU, m) {
  m.impl("linear_i8_q8", &gpt2chat_kernels::linear_i8_q8);
  m.impl("linear_i4_q8", &gpt2chat_kernels::linear_i4_q8);
}
