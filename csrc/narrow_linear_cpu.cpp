// narrow_linear: y = x @ weight^T (+ bias) for few rows of x (a verification forward: B * q tokens),
// float32 on the CPU.
//
// Why: a speculative step's target forward runs every linear layer on M = B * q rows with q = 2..33.
// MKL's sgemm is tuned for large M; on a small M it costs about as much as M separate matrix-vector
// products (measured on a 2-core AMD EPYC, 1 thread: the 211 SmolLM2-135M linears take 40 ms at M = 1,
// 70-104 ms at M = 2..8), so drafting even one token nearly doubles the forward. The weights are the
// bytes that matter (0.5 GB against a few KB of activations), and this kernel reads each weight row
// once for all M rows: 32 ms at M = 1, 35-37 ms at M = 2..4, 80 ms at 10, 176 ms at 32 against
// sgemm's 195 (benchmarks/results/narrow_linear_cpu.csv; at 2 threads 24, 33, 47 and 87 ms against 42,
// 88, 110 and 126).
//
// Layout: weight [N, K] row-major (nn.Linear), x [M, K]. Up to 4 rows of x: for each weight row n,
// the rows of x keep MB * U independent FMA chains (the K loop unrolled U times) so the FMA latency
// is hidden, then reduce them. From 5 rows: register tiles of 4 weight rows x 3 rows of x (tile4).
// x stays in L1/L2; the weight streams once.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPECDEC_NARROW_AVX2 1
#endif

namespace specdec {
namespace {

#ifdef SPECDEC_NARROW_AVX2
inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_hadd_ps(a, a);
  a = _mm_hadd_ps(a, a);
  return _mm_cvtss_f32(a);
}

// One weight row w [K] against MB rows of x (stride K): y[j * N] = dot(w, x_j).
template <int MB, int U>
inline void row_block(const float* w, const float* x, float* y, int64_t K, int64_t N) {
  __m256 acc[U][MB];
  for (int u = 0; u < U; ++u)
    for (int j = 0; j < MB; ++j) acc[u][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    for (int u = 0; u < U; ++u) {
      const __m256 v = _mm256_loadu_ps(w + k + 8 * u);
      for (int j = 0; j < MB; ++j)
        acc[u][j] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + j * K + k + 8 * u), acc[u][j]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(w + k);
    for (int j = 0; j < MB; ++j) acc[0][j] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + j * K + k), acc[0][j]);
  }
  for (int j = 0; j < MB; ++j) {
    __m256 a = acc[0][j];
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[u][j]);
    float s = hsum(a);
    for (int64_t kk = k; kk < K; ++kk) s += w[kk] * x[j * K + kk];
    y[j * N] = s;
  }
}

// Unroll so that every block has 8 independent FMA chains.
inline void one_row(const float* w, const float* x, float* y, int64_t M, int64_t K, int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) row_block<4, 2>(w, x + m * K, y + m * N, K, N);
  switch (M - m) {
    case 3: row_block<3, 3>(w, x + m * K, y + m * N, K, N); break;
    case 2: row_block<2, 4>(w, x + m * K, y + m * N, K, N); break;
    case 1: row_block<1, 8>(w, x + m * K, y + m * N, K, N); break;
    default: break;
  }
}

// From 5 rows of x on, one pass of row_block re-reads each weight row from L1 for every block of 4 x
// rows and spends 5 loads per 4 FMAs: load bound. A tile of NR = 4 weight rows against MB <= 3 x
// rows keeps 4 * MB accumulators (12 of the 16 ymm registers) and spends 4 + MB loads per 4 * MB FMAs.
// `pf`: the next tile's bytes, touched 128 per K step (software prefetch), so the weight stream from
// memory overlaps the FMAs instead of stalling them at each new tile (1 thread, SmolLM2's linears, a
// quiet spell of the machine: 62 ms instead of 79 at 10 rows, 88 instead of 117 at 16).
template <int MB>
inline void tile4(const float* w, const float* x, float* y, int64_t K, int64_t N, const char* pf, int64_t pf_end) {
  constexpr int NR = 4;
  __m256 acc[NR][MB];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  int64_t p = 0;
  for (int64_t k = 0; k < K8; k += 8) {
    if (p < pf_end) {  // only inside the next tile: a hint, but never past the weight tensor either
      _mm_prefetch(pf + p, _MM_HINT_T0);
      if (p + 64 < pf_end) _mm_prefetch(pf + p + 64, _MM_HINT_T0);
      p += 128;
    }
    __m256 xv[MB];
    for (int j = 0; j < MB; ++j) xv[j] = _mm256_loadu_ps(x + j * K + k);
    for (int r = 0; r < NR; ++r) {
      const __m256 v = _mm256_loadu_ps(w + r * K + k);
      for (int j = 0; j < MB; ++j) acc[r][j] = _mm256_fmadd_ps(v, xv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < MB; ++j) {
      float s = hsum(acc[r][j]);
      for (int64_t kk = K8; kk < K; ++kk) s += w[r * K + kk] * x[j * K + kk];
      y[j * N + r] = s;
    }
}

// Weight rows n0 .. n0 + 4 against all M >= 5 rows of x, in blocks of 3 (a last block of 1 becomes
// two of 2). `next`: the following tile's weights to prefetch, or nullptr.
inline void four_rows(const float* w, const float* x, float* y, int64_t M, int64_t K, int64_t N, const float* next) {
  const int64_t tile_bytes = 4 * K * int64_t(sizeof(float));
  const char* pf = reinterpret_cast<const char*>(next);
  int64_t done = 0;  // prefetched bytes of the next tile so far
  int64_t m = 0;
  while (m < M) {
    const int64_t left = M - m;
    const int mb = left == 4 || left == 2 ? 2 : (left == 1 ? 1 : 3);
    const int64_t budget = next ? std::max<int64_t>(0, tile_bytes - done) : 0;
    const int64_t steps = K / 8;
    const int64_t here = std::min(budget, steps * 128);
    const char* p = next ? pf + done : nullptr;
    if (mb == 3) tile4<3>(w, x + m * K, y + m * N, K, N, p, here);
    else if (mb == 2) tile4<2>(w, x + m * K, y + m * N, K, N, p, here);
    else tile4<1>(w, x + m * K, y + m * N, K, N, p, here);
    done += here;
    m += mb;
  }
}

inline void rows(const float* wp, const float* xp, float* yp, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (M >= 5) {
    for (; n + 4 <= n1; n += 4)
      four_rows(wp + n * K, xp, yp + n, M, K, N, n + 8 <= n1 ? wp + (n + 4) * K : nullptr);
  }
  for (; n < n1; ++n) one_row(wp + n * K, xp, yp + n, M, K, N);
}
#else
// Portable fallback (no AVX2/FMA at build time): the same loop order, left to the compiler.
inline void rows(const float* wp, const float* xp, float* yp, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t j = 0; j < M; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += wp[n * K + k] * xp[j * K + k];
      yp[j * N + n] = s;
    }
}
#endif

at::Tensor narrow_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "narrow_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "narrow_linear: x and weight must be float32, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "narrow_linear: x must have at least one dimension");
  TORCH_CHECK(weight.dim() == 2, "narrow_linear: weight must be [N, K], got ", weight.sizes());
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(x.size(-1) == K, "narrow_linear: x's last dimension (", x.size(-1), ") must equal weight's K (", K, ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat, "narrow_linear: bias must be float32 on the CPU");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "narrow_linear: bias must be [N] = [", N, "], got ", bias->sizes());
  }
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  int64_t M = 1;  // rows: the product of x's leading dimensions (reshape(-1, 0) would be ambiguous)
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  const at::Tensor x2 = x.reshape({M, K}).contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0) {
    const float* xp = x2.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    // grain: enough rows per task that a thread streams a few hundred KB of weights
    const int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(K, 1));
    // tasks split N in multiples of 4 weight rows (the tiles), the last task takes the rest
    const int64_t tiles = (N + 3) / 4;
    at::parallel_for(0, tiles, std::max<int64_t>(1, grain / 4), [&](int64_t t0, int64_t t1) {
      rows(wp, xp, yp, M, K, N, 4 * t0, std::min(N, 4 * t1));
    });
  }
  if (bias.has_value()) y.add_(*bias);
  return y.view(out_sizes);
}

at::Tensor narrow_linear_meta(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1), "narrow_linear: shape mismatch");
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = weight.size(0);
  return at::empty(out_sizes, x.options());
}

}  // namespace
}  // namespace specdec

TORCH_LIBRARY_FRAGMENT(specdec_cpp, m) {
  m.def("narrow_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(specdec_cpp, CPU, m) { m.impl("narrow_linear", &specdec::narrow_linear_cpu); }
TORCH_LIBRARY_IMPL(specdec_cpp, Meta, m) { m.impl("narrow_linear", &specdec::narrow_linear_meta); }
