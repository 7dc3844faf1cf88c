// y = x W^T + b on the CPU for weights stored as fp32, fp16 or int8 (+ one fp32 scale per 32 columns of
// each row: the scale of a group of 32 weights, like llama.cpp's q8_0 blocks).
//
// Built for x86-64 with AVX2 + FMA + F16C (gpt2chat/kernels/__init__.py compiles it on first use and
// only loads it where the CPU has them). Registered as the CPU kernels of the `gpt2chat::linear_*` ops,
// whose schemas, fake (meta) kernels and portable kernels for other devices live in Python.
//
// Layouts (gpt2chat/kernels/packing.py writes the packed one):
//  - fp32: row-major [N, K], nn.Linear's own tensor. Each row is a long sequential stream that the
//    hardware prefetcher follows at full speed.
//  - fp16 / int8: "packed 4x8", [ceil(N/4), ceil(K/8), 4, 8]: the 8-column chunk j of rows 4b..4b+3 sits
//    at one 32-element spot, so a 4-row block is one sequential stream, 32 or 64 bytes per step, and a
//    software prefetch runs ahead of it. Read row by row, a 1- or 2-byte weight advances each of 4 streams
//    by only 8 or 16 bytes a step, too slowly for the prefetcher: measured here, it halved int8's rate.
//    Padding rows / columns are zeros.
//
// Two paths, chosen by the number of input rows M:
//  - few rows (decode; M <= small_m_max): one pass over the weight, which is read from memory once
//    (fp32 at M = 1: `gemv_f32`, one row at a time).
//    Each block of output rows is dotted with every input row while it sits in L1/L2; the compact
//    forms are widened to fp32 in registers (vpmovsxbd + vcvtdq2ps for int8, vcvtph2ps for fp16), so
//    the rate is bound by reading the weight, not by the conversion.
//  - many rows (prefill): matmul-bound. fp32 goes straight to MKL's sgemm (at::addmm); fp16 / int8
//    weights are widened a tile of rows at a time (scales folded in) into an fp32 buffer that stays in
//    cache and multiplied by sgemm into the output columns of that tile.
// Threads: at::parallel_for over blocks of output rows (torch's own OpenMP pool and thread count).

#include <torch/library.h>

#include "common.h"
#include "ops.h"

#include <type_traits>

namespace {

using gpt2chat_kernels::hsum;
using gpt2chat_kernels::kThreadWork;
using gpt2chat_kernels::linear_frame;
using gpt2chat_kernels::rows_in_passes;
using gpt2chat_kernels::with_count;

// Default small_m_max per weight form: up to this many input rows the one-pass kernel beat sgemm on the
// 124M shapes (`python -m benchmarks.kernel_speed --crossover --working-set 0 --threads 1 --clock thread`,
// this 2-core Zen 3, session 3): fp32 (4 x 3 block) up to 64 (past 128 sgemm wins at K = 3072), fp16 to
// 128, the widening int8 (fp32 activations: 4 operations per 8 weights) only to 16.
constexpr int64_t kSmallMaxF32 = 64;
constexpr int64_t kSmallMaxF16 = 128;
constexpr int64_t kSmallMaxI8 = 16;

// int8's scales: one float per 32 columns (4 chunks of 8) of every row, [N, ceil(K / 32)] row-major.
constexpr int64_t kGroupChunks = 4;
struct Scales {
  const float* p = nullptr;
  int64_t groups = 0;  // per row
  float at(int64_t n, int64_t chunk) const { return p[n * groups + chunk / kGroupChunks]; }
};

// How each stored form becomes fp32 (8 at a time, and one at a time for the K % 8 tail), and where its
// rows are: row(w, n, K) points at column 0 of row n; column chunk j (8 columns) is `kStep * j` further.
struct F32 {
  using T = float;
  static constexpr int64_t kStep = 8;
  static constexpr int64_t kPrefetch = 0;  // the hardware prefetcher already keeps up with fp32 rows
  static constexpr bool kScaled = false;
  static __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
  static float load1(const T* p) { return *p; }
  static const T* row(const T* w, int64_t n, int64_t K) { return w + n * K; }
};
struct Packed {
  static constexpr int64_t kStep = 32;
  static int64_t padded(int64_t K) { return (K + 7) / 8 * 8; }
};
struct F16 : Packed {
  using T = uint16_t;  // IEEE half bit patterns
  static constexpr int64_t kPrefetch = 2048;  // bytes ahead of the stream (measured: 1-4 KB all help)
  static constexpr bool kScaled = false;
  static __m256 load8(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static float load1(const T* p) { return _cvtsh_ss(*p); }
  static const T* row(const T* w, int64_t n, int64_t K) { return w + (n / 4) * 4 * padded(K) + (n % 4) * 8; }
};
struct I8 : Packed {
  using T = int8_t;
  static constexpr int64_t kPrefetch = 1024;
  static constexpr bool kScaled = true;  // one fp32 scale per group of kGroupChunks chunks (32 columns)
  static __m256 load8(const T* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static float load1(const T* p) { return static_cast<float>(*p); }
  static const T* row(const T* w, int64_t n, int64_t K) { return w + (n / 4) * 4 * padded(K) + (n % 4) * 8; }
};

// out[i][r] = dot(weight row n + r, x row i) for R weight rows and I input rows, over K.
template <class W, int R, int I>
inline void dot_block(const typename W::T* w, int64_t n, int64_t K, const float* x, const Scales& s,
                      float out[I][R]) {
  const typename W::T* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = W::row(w, n + r, K);
  __m256 acc[I][R];
  for (int i = 0; i < I; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  const int64_t chunks = K / 8;
  // Scaled weights are widened and multiplied by their group's scale before the FMAs: one extra multiply
  // per 8 weights, no extra accumulators.
  const int64_t group = W::kScaled ? kGroupChunks : std::max<int64_t>(1, chunks);
  for (int64_t j0 = 0; j0 < chunks; j0 += group) {
    __m256 sv[R];
    if constexpr (W::kScaled) {
      for (int r = 0; r < R; ++r) sv[r] = _mm256_set1_ps(s.at(n + r, j0));
    }
    const int64_t j1 = std::min(chunks, j0 + group);
    for (int64_t j = j0; j < j1; ++j) {
      if constexpr (W::kPrefetch > 0 && R == 4 && I == 1) {  // decode reads a packed block as one stream
        _mm_prefetch(reinterpret_cast<const char*>(rows[0] + j * W::kStep) + W::kPrefetch, _MM_HINT_T0);
      }
      __m256 wv[R];
      for (int r = 0; r < R; ++r) {
        wv[r] = W::load8(rows[r] + j * W::kStep);
        if constexpr (W::kScaled) wv[r] = _mm256_mul_ps(wv[r], sv[r]);
      }
      for (int i = 0; i < I; ++i) {
        const __m256 xv = _mm256_loadu_ps(x + i * K + j * 8);
        for (int r = 0; r < R; ++r) acc[i][r] = _mm256_fmadd_ps(wv[r], xv, acc[i][r]);
      }
    }
  }
  for (int i = 0; i < I; ++i)
    for (int r = 0; r < R; ++r) out[i][r] = hsum(acc[i][r]);
  for (int64_t k = chunks * 8; k < K; ++k)
    for (int r = 0; r < R; ++r) {
      float wk = W::load1(rows[r] + chunks * W::kStep + (k - chunks * 8));
      if constexpr (W::kScaled) wk *= s.at(n + r, chunks);
      for (int i = 0; i < I; ++i) out[i][r] += wk * x[i * K + k];
    }
}

template <class W, int R, int I>
inline void block_rows(const typename W::T* w, int64_t n, int64_t K, int64_t N, const float* x, int64_t m,
                       const Scales& scale, const float* bias, float* y) {
  float out[I][R];
  dot_block<W, R, I>(w, n, K, x + m * K, scale, out);
  for (int i = 0; i < I; ++i)
    for (int r = 0; r < R; ++r) {
      float v = out[i][r];
      if (bias) v += bias[n + r];
      y[(m + i) * N + n + r] = v;
    }
}

// R weight rows starting at n against every input row, I input rows per pass.
template <class W, int R, int I>
inline void block_all_inputs(const typename W::T* w, int64_t n, int64_t K, int64_t N, const float* x, int64_t M,
                             const Scales& scale, const float* bias, float* y) {
  rows_in_passes<I>(M, [&](auto rows, int64_t m) {
    block_rows<W, R, decltype(rows)::value>(w, n, K, N, x, m, scale, bias, y);
  });
}

// The weight rows [n, n + rows) (rows <= R) against every input row.
template <class W, int R, int I>
inline void rows_all_inputs(int64_t rows, const typename W::T* w, int64_t n, int64_t K, int64_t N,
                            const float* x, int64_t M, const Scales& scale, const float* bias, float* y) {
  with_count<R>(rows, [&](auto r) { block_all_inputs<W, decltype(r)::value, I>(w, n, K, N, x, M, scale, bias, y); });
}

// One pass over the weight for M input rows. Block shapes (accumulators = R * I <= 12 of the 16 ymm
// registers): a decode row (M = 1) dots 4 weight rows at once (a packed block), four independent FMA
// chains that hide the FMA latency. Several rows take a whole block of 4 weight rows (one sequential
// stream in the packed layouts) against 3 input rows for fp32 (12 accumulators; the x operands come
// straight from memory into the FMAs) and 2 for fp16 / int8 (8 accumulators: their widened weight
// vectors must sit in registers). Measured against the 2 x 6 block this replaced, one core, in cache
// (benchmarks/kernel_speed.py --crossover --working-set 0), M = 2..64: fp32 +10-30%, fp16 +5-20%.
template <class W, int R, int I>
void few_rows_blocked(const float* x, int64_t M, int64_t K, const typename W::T* w, int64_t N,
                      const Scales& scale, const float* bias, float* y) {
  const int64_t blocks = (N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, kThreadWork / std::max<int64_t>(1, R * K * M));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * R;
      rows_all_inputs<W, R, I>(std::min<int64_t>(R, N - n), w, n, K, N, x, M, scale, bias, y);
    }
  });
}

// fp32 decode (M = 1): one weight row at a time, so a thread's rows [a, b) are ONE sequential stream (rows
// are contiguous), the pattern the hardware prefetcher follows best; four accumulators over 32 columns hide
// the FMA latency. Measured A/B in one process, one core (thread CPU time): 22-25 GB/s against 15 GB/s for
// four interleaved row streams on the 768-column shapes (equal at K = 3072); 2 threads 24-30 vs 19-21.
void gemv_f32(const float* x, int64_t K, const float* w, int64_t N, const float* bias, float* y) {
  const int64_t grain = std::max<int64_t>(1, kThreadWork / std::max<int64_t>(1, K));
  at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      const float* row = w + n * K;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
             acc3 = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + k), _mm256_loadu_ps(x + k), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(row + k + 8), _mm256_loadu_ps(x + k + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(row + k + 16), _mm256_loadu_ps(x + k + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(row + k + 24), _mm256_loadu_ps(x + k + 24), acc3);
      }
      for (; k + 8 <= K; k += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + k), _mm256_loadu_ps(x + k), acc0);
      float v = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
      for (; k < K; ++k) v += row[k] * x[k];
      y[n] = bias ? v + bias[n] : v;
    }
  });
}

template <class W>
void few_rows(const float* x, int64_t M, int64_t K, const typename W::T* w, int64_t N, const Scales& scale,
              const float* bias, float* y) {
  if constexpr (std::is_same<W, F32>::value) {
    if (M == 1) return gemv_f32(x, K, w, N, bias, y);
  }
  if (M == 1) {
    few_rows_blocked<W, 4, 1>(x, M, K, w, N, scale, bias, y);
  } else if constexpr (std::is_same<W, F32>::value) {
    few_rows_blocked<W, 4, 3>(x, M, K, w, N, scale, bias, y);
  } else {
    few_rows_blocked<W, 4, 2>(x, M, K, w, N, scale, bias, y);
  }
}

// rows [n0, n1) of the weight as fp32 (times scale) into dst [n1 - n0, K].
template <class W>
void widen_rows(const typename W::T* w, int64_t n0, int64_t n1, int64_t K, const Scales& scale, float* dst) {
  at::parallel_for(n0, n1, std::max<int64_t>(1, kThreadWork / std::max<int64_t>(1, K)), [&](int64_t a, int64_t b) {
    const int64_t chunks = K / 8;
    for (int64_t n = a; n < b; ++n) {
      const typename W::T* src = W::row(w, n, K);
      float* out = dst + (n - n0) * K;
      for (int64_t j = 0; j < chunks; ++j) {
        __m256 v = W::load8(src + j * W::kStep);
        if constexpr (W::kScaled) v = _mm256_mul_ps(v, _mm256_set1_ps(scale.at(n, j)));
        _mm256_storeu_ps(out + 8 * j, v);
      }
      for (int64_t k = chunks * 8; k < K; ++k) {
        out[k] = W::load1(src + chunks * W::kStep + (k - chunks * 8));
        if constexpr (W::kScaled) out[k] *= scale.at(n, chunks);
      }
    }
  });
}

template <class W>
void many_rows(const at::Tensor& x2d, const typename W::T* w, int64_t N, int64_t K, const Scales& scale,
               const std::optional<at::Tensor>& bias, at::Tensor& y2d) {
  gpt2chat_kernels::widened_sgemm(
      x2d, N, K, [&](int64_t n0, int64_t n1, float* dst) { widen_rows<W>(w, n0, n1, K, scale, dst); }, bias, y2d);
}

void check_common(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t N,
                  at::ScalarType stored, const char* stored_name, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": CPU kernel called with a non-CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32 on the CPU, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a feature dimension");
  TORCH_CHECK(weight.scalar_type() == stored, op, ": weight must be ", stored_name, ", got ", weight.scalar_type());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N &&
                    bias->is_contiguous() && bias->device().is_cpu(),
                op, ": bias must be a contiguous float32 vector of ", N);
  }
}

void check_packed(const at::Tensor& x, const at::Tensor& weight, int64_t N, const char* op) {
  const int64_t K = x.size(-1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == (N + 3) / 4 && weight.size(1) == (K + 7) / 8 &&
                  weight.size(2) == 4 && weight.size(3) == 8,
              op, ": weight must be packed 4x8 for ", N, " outputs and ", K, " features, i.e. [", (N + 3) / 4,
              ", ", (K + 7) / 8, ", 4, 8] (gpt2chat.kernels.pack_rows), got ", weight.sizes());
}

template <class W>
at::Tensor linear_impl(const at::Tensor& x, const at::Tensor& weight, int64_t N, const Scales& scale,
                       const std::optional<at::Tensor>& bias, int64_t small_m_max, int64_t default_small) {
  return linear_frame(x, N, bias, [&](const at::Tensor& x2d, at::Tensor& y2d) {
    const int64_t M = x2d.size(0), K = x2d.size(1);
    const auto* w = reinterpret_cast<const typename W::T*>(weight.data_ptr());
    const int64_t limit = small_m_max < 0 ? default_small : small_m_max;
    if (M <= limit) {
      few_rows<W>(x2d.data_ptr<float>(), M, K, w, N, scale, bias.has_value() ? bias->data_ptr<float>() : nullptr,
                  y2d.data_ptr<float>());
    } else if (std::is_same<W, F32>::value) {
      if (bias.has_value()) at::addmm_out(y2d, *bias, x2d, weight.t()); else at::mm_out(y2d, x2d, weight.t());
    } else {
      many_rows<W>(x2d, w, N, K, scale, bias, y2d);
    }
  });
}

}  // namespace

namespace gpt2chat_kernels {

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      int64_t small_m_max) {
  const char* op = "gpt2chat::linear_f32";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be an [N, K] matrix, got ", weight.sizes());
  check_common(x, weight, bias, weight.size(0), at::kFloat, "float32", op);
  TORCH_CHECK(x.size(-1) == weight.size(1), op, ": x has ", x.size(-1), " features but the weight has ",
              weight.size(1), " columns");
  return linear_impl<F32>(x, weight, weight.size(0), Scales{}, bias, small_m_max, kSmallMaxF32);
}

at::Tensor linear_f16(const at::Tensor& x, const at::Tensor& weight, int64_t out_features,
                      const std::optional<at::Tensor>& bias, int64_t small_m_max) {
  const char* op = "gpt2chat::linear_f16";
  check_common(x, weight, bias, out_features, at::kShort, "int16 (IEEE half bit patterns)", op);
  check_packed(x, weight, out_features, op);
  return linear_impl<F16>(x, weight, out_features, Scales{}, bias, small_m_max, kSmallMaxF16);
}

at::Tensor linear_i8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                     const std::optional<at::Tensor>& bias, int64_t small_m_max) {
  const char* op = "gpt2chat::linear_i8";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a feature dimension");
  const int64_t groups = (x.size(-1) + 8 * kGroupChunks - 1) / (8 * kGroupChunks);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 2 && scale.size(1) == groups &&
                  scale.is_contiguous() && scale.device().is_cpu(),
              op, ": scale must be a contiguous float32 [N, ", groups, "] matrix (one scale per 32 of the ",
              x.size(-1), " columns of each row), got ", scale.scalar_type(), " ", scale.sizes());
  const int64_t N = scale.size(0);
  check_common(x, weight, bias, N, at::kChar, "int8", op);
  check_packed(x, weight, N, op);
  return linear_impl<I8>(x, weight, N, Scales{scale.data_ptr<float>(), groups}, bias, small_m_max, kSmallMaxI8);
}

}  // namespace gpt2chat_kernels

TORCH_LIBRARY_IMPL(gpt2chat, CPU, m) {
  m.impl("linear_f32", &gpt2chat_kernels::linear_f32);
  m.impl("linear_f16", &gpt2chat_kernels::linear_f16);
  m.impl("linear_i8", &gpt2chat_kernels::linear_i8);
}
