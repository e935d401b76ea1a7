// Building blocks shared by the CPU ops: AVX2 exp/log, loads of fp32/fp16/bf16 as float, a logit
// row seen through its token bitmask (Logits), per-(row, position) statistics of a logit row, the
// top-k/top-p threshold, and the exponential race. specdec/reference.py is the specification; comments say
// where the float32 arithmetic here stands in for the reference's float64 (only near-ties differ).
//
// Vocabulary-sized work is split into chunks of kChunk entries so that at::parallel_for has
// enough tasks even when B * (K + 1) is 1 or 2; each chunk is small enough (64 KB of fp32) to stay
// in L2 between its two sweeps, so every logit is read from memory once.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "philox.h"

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "specdec CPU kernels need -mavx2 -mfma -mf16c (setup.py passes them on x86-64)"
#endif

namespace specdec {

constexpr int64_t kChunk = 16384;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Run `fn.template operator()<T>()`-style code for the three logit dtypes we support.
template <typename F>
inline void dispatch_float(at::ScalarType t, const char* what, F&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK(false, what, " must be float32, float16 or bfloat16, got ", t);
  }
}

// ---------------------------------------------------------------------------------------------
// Loads: 8 values as float. fp16 through F16C, bf16 is the top half of a float.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const at::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
// The last n < 8 values of a row, padded with `fill` (never reads past the row).
template <typename T>
inline __m256 load_partial(const T* p, int64_t n, float fill) {
  alignas(32) float b[8];
  for (int i = 0; i < 8; ++i) b[i] = i < n ? static_cast<float>(p[i]) : fill;
  return _mm256_load_ps(b);
}
template <typename T>
inline __m256 load_any(const T* p, int64_t n, float fill) {
  return n >= 8 ? load8(p) : load_partial(p, n, fill);
}

// Store the first n (<= 8: all 8) of v at out[j ..].
inline void store_row(float* out, int64_t j, int64_t n, __m256 v) {
  if (n >= 8) {
    _mm256_storeu_ps(out + j, v);
    return;
  }
  alignas(32) float b[8];
  _mm256_store_ps(b, v);
  for (int64_t l = 0; l < n; ++l) out[j + l] = b[l];
}

// ---------------------------------------------------------------------------------------------
// One position's logits as every kernel reads them: ids the position's token bitmask bans (bit
// id % 32 of word id / 32 clear, or id >= 32 * nwords) read as -inf, as in reference._masked, so
// the statistics, filters, acceptance tests and races all see the target restricted to the
// allowed ids without a masked copy: the mask is applied in the loads (8 bits per 8 logits).
// bits == nullptr: no mask (one predictable branch per load). The functions below take either a
// Logits or a plain `const T*`; raw() is the unmasked row (raw logprobs are log_softmax without it).
template <typename T>
struct Logits {
  const T* x;
  const int32_t* bits = nullptr;  // the position's mask words, nullptr = every id allowed
  int64_t nwords = 0;             // W
  int64_t id = 0;                 // the id of x[0] (x advances with +, the mask stays the row's)
  Logits operator+(int64_t i) const { return {x + i, bits, nwords, id + i}; }
  uint32_t word(int64_t w) const { return w < nwords ? uint32_t(bits[w]) : 0u; }
  bool allowed(int64_t i) const {
    const int64_t j = id + i;
    return bits == nullptr || ((word(j >> 5) >> (j & 31)) & 1u);
  }
  float operator[](int64_t i) const { return allowed(i) ? static_cast<float>(x[i]) : kNegInf; }
  // the allowed-bits of ids id + i .. id + i + 7, lowest id in bit 0 (needs bits != nullptr). The
  // kernels' sweeps start at multiples of 8: then one byte of the little-endian words (x86).
  uint32_t bits8(int64_t i) const {
    const int64_t j = id + i;
    if ((j & 7) == 0) return (j >> 3) < 4 * nwords ? reinterpret_cast<const uint8_t*>(bits)[j >> 3] : 0u;
    const int64_t w = j >> 5, sh = j & 31;
    const uint64_t two = uint64_t(word(w)) | (sh > 24 ? uint64_t(word(w + 1)) << 32 : 0);
    return uint32_t(two >> sh) & 0xFFu;
  }
};
template <typename T>
inline __m256 load_any(const Logits<T>& p, int64_t n, float fill) {
  if (p.bits == nullptr) return load_any(p.x, n, fill);
  const uint32_t b8 = p.bits8(0);
  if (b8 == 0) return _mm256_set1_ps(kNegInf);  // 8 banned ids: their logits are not read (sparse masks)
  // lane k's bit shifted to the sign bit, which blendv reads: banned lanes take -inf
  const __m256i sign = _mm256_sllv_epi32(_mm256_set1_epi32(int32_t(b8)),
                                         _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24));
  return _mm256_blendv_ps(_mm256_set1_ps(kNegInf), load_any(p.x, n, fill), _mm256_castsi256_ps(sign));
}
template <typename T>
inline const T* raw(const T* p) { return p; }
template <typename T>
inline const T* raw(const Logits<T>& p) { return p.x; }
template <typename T>
inline bool is_masked(const T*) { return false; }
template <typename T>
inline bool is_masked(const Logits<T>& p) { return p.bits != nullptr; }

// Non-finite logits (NaN, +-inf) count as -inf, as in the reference's _clean.
inline __m256 clean8(__m256 x) {
  const __m256 absx = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 fin = _mm256_cmp_ps(absx, _mm256_set1_ps(INFINITY), _CMP_LT_OQ);  // NaN: false
  return _mm256_blendv_ps(_mm256_set1_ps(kNegInf), x, fin);
}
inline float clean1(float x) { return std::isfinite(x) ? x : kNegInf; }
// A draft probability as the kernels read it: NaN counts as 0 (reference._draft_q, every backend).
inline double draft_q1(float q) { return q == q ? double(q) : 0.0; }

// ---------------------------------------------------------------------------------------------
// exp and log for 8 floats (Cephes single-precision polynomials, ~1 ulp). Written here rather
// than taken from at::vec because an extension build does not define CPU_CAPABILITY_AVX2, so
// at::vec::Vectorized<float>::exp would fall back to a scalar loop.

// exp(x) for x <= 88; x < -87 (and -inf) gives 0: such weights are < 2e-38 of the largest and can
// neither win a race nor move a sum.
inline __m256 exp8(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n*ln2, ln2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(pow2n)), tiny);
}

// log(x) for positive normal x. Relative accuracy holds near x = 1, which matters: the race's
// uniforms reach 1 - 2^-24, where log(x) ~ x - 1 must not lose its digits.
inline __m256 log8(__m256 x) {
  const __m256i xi = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(126)));
  // mantissa in [0.5, 1)
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007FFFFF)),
                                                 _mm256_set1_epi32(0x3F000000)));
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(_mm256_set1_ps(1.0f), small));
  const __m256 f = _mm256_add_ps(_mm256_sub_ps(m, _mm256_set1_ps(1.0f)), _mm256_and_ps(m, small));
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
inline double hsum4d(__m256d v) {
  alignas(32) double b[4];
  _mm256_store_pd(b, v);
  return (b[0] + b[1]) + (b[2] + b[3]);
}

// ---------------------------------------------------------------------------------------------
// Statistics of one logit row at one position. `thr` encodes top-k/top-p: an entry is kept iff it
// is finite and x >= thr (logits are compared unscaled: dividing by a positive temperature keeps
// their order and their ties, so the reference's thresholds on scaled values select the same
// set). Then p_j = exp((x_j - max) / t) / z for kept j, else 0.
struct PosStats {
  float max = kNegInf;   // largest finite logit; -inf when the row has none
  int64_t argmax = 0;    // lowest id attaining it (torch.argmax)
  float thr = kNegInf;   // keep iff x >= thr
  double z = 0.0;        // sum over kept of exp((x - max) / t)
  float max_raw = kNegInf;  // want_raw: the largest finite logit without the mask (= max unmasked)
  double z_raw = 0.0;    // sum over finite of exp(x - max_raw), no mask: log-softmax at T = 1 (want_raw only)
  bool finite() const { return max > kNegInf; }
};

// One chunk's part of PosStats, z relative to the chunk's own max (merged by merge_chunks).
struct ChunkStats {
  float max;
  int64_t argmax;
  double z;
  float max_raw = kNegInf;  // want_raw: the chunk's largest finite logit without the mask
  double z_raw = 0.0;       // relative to max_raw, at T = 1, without the mask (want_raw only)
};

// Max/argmax over x[0, n) (ids base + i) and, if want_sum, sum exp((x - max) * inv_t), one race
// block (kRaceBlock ids, see below) at a time: the block's max on the way, then its sum of exps
// re-reading the block from L1. Each block's (max, sum relative to it) goes to bmax/bsum (block
// number within the chunk) when given: they are the block weights of the two-level race, so a
// race at this position needs no second sweep. Floats are summed per lane within a block, blocks
// in double. inv_t is float: the reference divides in double, a relative 1e-7 on each probability.
constexpr int64_t kRaceBlock = 256;
static_assert(kChunk % kRaceBlock == 0, "chunks must hold whole race blocks");

// want_raw (logprobs): also z_raw, the sum of exp(x - max) at temperature 1 over the unmasked row,
// in the same sweep (the block re-read from L1; no extra exp when want_sum already sums at
// inv_t = 1 and there is no mask).
template <typename T>
inline double block_raw_sum(const T* x, int64_t g0, int64_t g1, float bmax) {
  const __m256 m = _mm256_set1_ps(bmax);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = g0; i < g1; i += 8)
    acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(clean8(load_any(x + i, g1 - i, kNegInf)), m)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  double sum = 0.0;
  for (int l = 0; l < 8; ++l) sum += double(lanes[l]);
  return sum;
}

template <typename P>
inline ChunkStats chunk_stats(P x, int64_t n, int64_t base, float inv_t, bool want_sum,
                              float* bmax = nullptr, double* bsum = nullptr, bool want_raw = false) {
  float bm_local[kChunk / kRaceBlock];
  double bs_local[kChunk / kRaceBlock];
  double br[kChunk / kRaceBlock];  // want_raw: each block's sum of exp(x - block max), unmasked
  float rm[kChunk / kRaceBlock];   // want_raw: each block's unmasked max
  if (bmax == nullptr) bmax = bm_local, bsum = bs_local;
  const bool masked_raw = want_raw && is_masked(x);  // the raw sums need the unmasked values
  __m256 vmax = _mm256_set1_ps(kNegInf), vmax_raw = vmax;
  __m256i vidx = _mm256_set1_epi32(-1);
  __m256i cur = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  const __m256 it = _mm256_set1_ps(inv_t);
  alignas(32) float lanes[8];
  const int64_t nblock = (n + kRaceBlock - 1) / kRaceBlock;
  for (int64_t k = 0; k < nblock; ++k) {
    const int64_t g0 = k * kRaceBlock, g1 = std::min(n, g0 + kRaceBlock);
    __m256 bm = _mm256_set1_ps(kNegInf), bmr = bm;
    for (int64_t i = g0; i < g1; i += 8) {
      const __m256 v = clean8(load_any(x + i, g1 - i, kNegInf));
      const __m256 gt = _mm256_cmp_ps(v, vmax, _CMP_GT_OQ);  // strict: each lane keeps its first max
      vmax = _mm256_max_ps(vmax, v);
      vidx = _mm256_blendv_epi8(vidx, cur, _mm256_castps_si256(gt));
      cur = _mm256_add_epi32(cur, step);
      bm = _mm256_max_ps(bm, v);
      if (masked_raw) bmr = _mm256_max_ps(bmr, clean8(load_any(raw(x) + i, g1 - i, kNegInf)));
    }
    if (want_raw) {
      bmax[k] = hmax8(bm);
      rm[k] = masked_raw ? hmax8(bmr) : bmax[k];
      vmax_raw = _mm256_max_ps(vmax_raw, masked_raw ? bmr : bm);
      br[k] = 0.0;
      if (!want_sum) bsum[k] = 0.0;
      if (rm[k] > kNegInf && !(want_sum && inv_t == 1.0f && !masked_raw)) br[k] = block_raw_sum(raw(x), g0, g1, rm[k]);
    }
    if (!want_sum) continue;
    bmax[k] = hmax8(bm);
    bsum[k] = 0.0;
    if (!(bmax[k] > kNegInf)) continue;
    const __m256 m = _mm256_set1_ps(bmax[k]);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = g0; i < g1; i += 8) {
      const __m256 v = clean8(load_any(x + i, g1 - i, kNegInf));
      acc = _mm256_add_ps(acc, exp8(_mm256_mul_ps(_mm256_sub_ps(v, m), it)));
    }
    _mm256_store_ps(lanes, acc);
    for (int l = 0; l < 8; ++l) bsum[k] += double(lanes[l]);
    if (want_raw && inv_t == 1.0f && !masked_raw) br[k] = bsum[k];  // the same sum: T = 1, no mask
  }
  ChunkStats out{hmax8(vmax), 0, 0.0};
  if (want_raw) {  // before the return below: a chunk the mask bans entirely still has raw mass
    out.max_raw = hmax8(vmax_raw);
    for (int64_t k = 0; k < nblock; ++k)
      if (br[k] > 0.0) out.z_raw += br[k] * std::exp(double(rm[k]) - double(out.max_raw));
  }
  if (!(out.max > kNegInf)) return out;
  alignas(32) float mv[8];
  alignas(32) int32_t iv[8];
  _mm256_store_ps(mv, vmax);
  _mm256_store_si256(reinterpret_cast<__m256i*>(iv), vidx);
  int64_t best = INT64_MAX;
  for (int l = 0; l < 8; ++l)
    if (mv[l] == out.max && iv[l] >= 0) best = std::min<int64_t>(best, iv[l]);  // lowest id on ties
  out.argmax = base + best;
  if (want_sum)
    for (int64_t k = 0; k < nblock; ++k)
      if (bsum[k] > 0.0) out.z += bsum[k] * std::exp((double(bmax[k]) - double(out.max)) * double(inv_t));
  return out;
}

// Whether x[0, n) holds a finite value; stops at the first one (normally x[0]).
template <typename P>
inline bool has_finite(P x, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = clean8(load_any(x + i, n - i, kNegInf));
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(kNegInf), _CMP_GT_OQ))) return true;
  }
  return false;
}

// Chunks in id order -> PosStats (max, argmax with lowest id on ties, z rescaled to the max).
inline PosStats merge_chunks(const ChunkStats* c, int64_t nchunk, double inv_t) {
  PosStats s;
  for (int64_t i = 0; i < nchunk; ++i)
    if (c[i].max > s.max) s.max = c[i].max, s.argmax = c[i].argmax;  // strict: earlier chunk wins ties
  if (!s.finite()) return s;
  for (int64_t i = 0; i < nchunk; ++i)
    if (c[i].max > kNegInf) s.z += c[i].z * std::exp((double(c[i].max) - double(s.max)) * inv_t);
  for (int64_t i = 0; i < nchunk; ++i) s.max_raw = std::max(s.max_raw, c[i].max_raw);
  for (int64_t i = 0; i < nchunk; ++i)  // logprobs' raw denominator (0 unless chunk_stats had want_raw)
    if (c[i].z_raw > 0.0) s.z_raw += c[i].z_raw * std::exp(double(c[i].max_raw) - double(s.max_raw));
  return s;
}

// Logprobs of token `tok` (in [0, V)) of logit row x at a position with statistics st (max_raw and
// z_raw from chunk_stats' want_raw; z the kept set's, as the race uses): *processed = log p(tok)
// under the distribution it was drawn from (the mask, then temperature, top-k, top-p), -inf
// outside the kept set (greedy rows: log_softmax at T = 1 of the masked row, which needs z at
// inv_t = 1, so callers sum it for masked greedy rows); *raw = log_softmax(x)[tok] at temperature
// 1 without the mask. Only x[tok] is read. Double arithmetic on float statistics: the reference's
// float64 up to the sums' float32 exps (~1e-7 relative).
template <typename P>
inline void token_logprobs(P x, int64_t tok, const PosStats& st, double inv_t, bool greedy, float* processed,
                           float* raw_lp) {
  const float xt = clean1(static_cast<float>(x[tok]));
  if (!(xt > kNegInf) || !st.finite()) {
    *processed = *raw_lp = kNegInf;
    return;
  }
  const double d = double(xt) - double(st.max);
  const float xr = clean1(static_cast<float>(raw(x)[tok]));  // = xt without a mask
  *raw_lp = float(double(xr) - double(st.max_raw) - std::log(st.z_raw));
  if (greedy && !is_masked(x)) *processed = *raw_lp;
  else *processed = xt >= st.thr && st.z > 0.0 ? float(d * inv_t - std::log(st.z)) : kNegInf;
}

// sum exp((v - max) * inv_t) over v in buf[0, n) with v >= thr; float exps, double accumulation.
inline double sum_exp_kept(const float* buf, int64_t n, float max, float inv_t, float thr) {
  const __m256 m = _mm256_set1_ps(max), it = _mm256_set1_ps(inv_t), th = _mm256_set1_ps(thr);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = load_any(buf + i, n - i, kNegInf);
    const __m256 keep = _mm256_cmp_ps(v, th, _CMP_GE_OQ);
    const __m256 w = _mm256_and_ps(exp8(_mm256_mul_ps(_mm256_sub_ps(v, m), it)), keep);
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(w)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(w, 1)));
  }
  return hsum4d(_mm256_add_pd(acc0, acc1));
}

// Order-preserving map of a float to 32 bits (a larger float has a larger key), for bucketing.
inline uint32_t float_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Per-thread scratch of filter_stats (never a [B, K+1, V] buffer).
struct FilterScratch {
  static constexpr int kBinShift = 20;  // bucket = top 12 bits of the key: sign, exponent, 3 bits
  static constexpr int kBins = 1 << (32 - kBinShift);
  std::vector<float> vals;       // the row's finite logits
  std::vector<float> weights;    // exp((v - max) * inv_t) of each
  std::vector<float> bucket;     // the values of one bucket
  std::vector<int64_t> count;    // per bucket
  std::vector<double> mass;      // per bucket: the kept weights
};

// Top-k then top-p for one (row, position) whose max/argmax are already in `s`; sets s.thr and
// s.z (sum over what is kept). Semantics of reference._keep_mask: top-k keeps x >= the k-th
// largest value (all ties; off when k <= 0 or k >= V; the k-th largest is -inf when fewer than k
// are finite, i.e. everything finite is kept). Top-p then takes, in descending order of what is
// kept, the smallest prefix whose probability mass reaches top_p (cumulative sums in double) and
// keeps x >= the last value of that prefix (ties again kept); if rounding keeps every prefix
// below top_p, everything kept stays. Nothing is sorted but one bucket: the values are bucketed
// by the top 12 bits of their order-preserving key, a walk down the bucket counts (top-k) or
// masses (top-p) finds the bucket where the k-th value or the top_p mass lies, and only that
// bucket's values are selected (nth_element) or sorted.
template <typename P>
inline void filter_stats(P x, int64_t V, double inv_t_d, int64_t top_k, double top_p,
                         PosStats& s, FilterScratch& sc) {
  if (!s.finite()) return;
  using S = FilterScratch;
  const float inv_t = float(std::min(inv_t_d, double(FLT_MAX)));
  sc.vals.resize(V);
  sc.count.assign(S::kBins, 0);
  int64_t n = 0;
  for (int64_t j = 0; j < V; ++j) {
    const float v = static_cast<float>(x[j]);
    if (!std::isfinite(v)) continue;
    sc.vals[n++] = v;
    ++sc.count[float_key(v) >> S::kBinShift];
  }
  const float* vals = sc.vals.data();
  // the values of bucket b that are >= floor, into sc.bucket
  auto collect = [&](int64_t b, float floor) {
    sc.bucket.clear();
    for (int64_t i = 0; i < n; ++i)
      if ((float_key(vals[i]) >> S::kBinShift) == uint32_t(b) && vals[i] >= floor) sc.bucket.push_back(vals[i]);
  };
  float thr = kNegInf;
  if (top_k > 0 && top_k < V && top_k <= n) {
    int64_t above = 0, b = S::kBins - 1;
    while (above + sc.count[b] < top_k) above += sc.count[b--];
    collect(b, kNegInf);
    const int64_t r = top_k - above - 1;  // rank of the k-th largest inside its bucket
    std::nth_element(sc.bucket.begin(), sc.bucket.begin() + r, sc.bucket.end(), std::greater<float>());
    thr = sc.bucket[r];
  }
  if (top_p < 1.0) {
    sc.weights.resize(n);
    const __m256 m = _mm256_set1_ps(s.max), it = _mm256_set1_ps(inv_t);
    for (int64_t i = 0; i < n; i += 8) {
      const __m256 w = exp8(_mm256_mul_ps(_mm256_sub_ps(load_any(vals + i, n - i, kNegInf), m), it));
      store_row(sc.weights.data(), i, n - i, w);
    }
    sc.mass.assign(S::kBins, 0.0);
    double zk = 0.0;
    float lowest = std::numeric_limits<float>::infinity();  // smallest kept value
    for (int64_t i = 0; i < n; ++i) {
      if (!(vals[i] >= thr)) continue;
      sc.mass[float_key(vals[i]) >> S::kBinShift] += sc.weights[i];
      zk += sc.weights[i];
      lowest = std::min(lowest, vals[i]);
    }
    // Down the buckets: whole buckets while the mass stays below top_p, then value by value
    // (sorted) inside the bucket where it gets there. Rounding may push the crossing into a later
    // bucket, hence the loop; if no prefix reaches top_p everything kept stays.
    double cum = 0.0;
    float pthr = lowest;
    bool found = false;
    for (int64_t b = S::kBins - 1; b >= 0 && !found; --b) {
      if (sc.mass[b] == 0.0) continue;
      if (cum + sc.mass[b] / zk < top_p) {
        cum += sc.mass[b] / zk;
        continue;
      }
      collect(b, thr);
      std::sort(sc.bucket.begin(), sc.bucket.end(), std::greater<float>());
      for (const float v : sc.bucket) {
        cum += std::exp((double(v) - double(s.max)) * inv_t_d) / zk;
        if (!(cum < top_p)) {  // first prefix whose mass is not below top_p
          pthr = v;
          found = true;
          break;
        }
      }
    }
    thr = pthr;
  }
  s.thr = thr;
  s.z = sum_exp_kept(vals, n, s.max, inv_t, thr);
}

// ---------------------------------------------------------------------------------------------
// Parallel schedule. With at least two rows per thread, rows are the unit: one parallel region,
// rows taken from a shared counter (their costs differ). Parallel regions are barriers, and on a
// busy machine each one can cost a scheduler time slice, so a call should open few of them.
// With fewer rows, rows run one after another and each splits its vocabulary chunks over the
// threads: fn(row, exec) calls exec(n, f) to run f(0 .. n-1), inline or in parallel.
// Tiny inputs (rows * row_len below ~64K values) run on the calling thread.
template <typename F>
inline void for_rows(int64_t rows, int64_t row_len, int64_t grain_chunks, F&& fn) {
  auto inline_exec = [](int64_t n, auto&& f) {
    for (int64_t i = 0; i < n; ++i) f(i);
  };
  auto par_exec = [grain_chunks](int64_t n, auto&& f) {
    at::parallel_for(0, n, grain_chunks, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) f(i);
    });
  };
  const int64_t nt = at::get_num_threads();
  if (rows * row_len < 65536 || at::in_parallel_region()) {
    for (int64_t r = 0; r < rows; ++r) fn(r, inline_exec);
  } else if (nt > 1 && rows >= 2 * nt) {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
      for (int64_t r; (r = next.fetch_add(1)) < rows;) fn(r, inline_exec);
    });
  } else {
    for (int64_t r = 0; r < rows; ++r) fn(r, par_exec);
  }
}

// ---------------------------------------------------------------------------------------------
// The two-level exponential race of reference._race. Level 1: the vocabulary is cut into blocks
// of kRaceBlock ids and block b, weighing W_b = sum of its w_j, wins argmax_b W_b / e_b (Philox on
// the block stream, index b). Level 2: inside block b, argmax_j w_j / e_j (index j). Ties go to
// the lowest index at both levels. A one-level race would need a Philox draw and a log per
// vocabulary entry, several times the cost of the exp; this needs one sweep of exps (the block
// sums) plus V / kRaceBlock + kRaceBlock draws. kRaceBlock is defined with chunk_stats above.
// e = -log(v), v = (2 * (bits >> 9) + 1) * 2^-24 in (0, 1) (exact in float), for 8 draws.
inline __m256 exponential8(__m256i bits) {
  const __m256i k = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(bits, 9), 1), _mm256_set1_epi32(1));
  const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(k), _mm256_set1_ps(1.0f / 16777216.0f));
  return _mm256_sub_ps(_mm256_setzero_ps(), log8(v));
}

// The weights of ids j .. j+7 (n < 8: the row's last n; the rest weigh 0). The race samples from
//   p_j = exp((x_j - max) * inv_t) * inv_z   if x_j is finite and >= thr, else 0,
// or, after a rejection, from the residual r_j = max(0, p_j - q_j) with q_j = q[j] for j < vq (0
// beyond: target ids >= Vd have q = 0) or, when q == nullptr, the one-hot at `onehot`
// (deterministic drafter).
struct Weights {
  __m256 m, it, th, iz;
  // s.z == 0: the denominator was not computed (verify's bonus position: a race over p alone is
  // scale-free), so the weights stay unnormalised (the largest is 1).
  Weights(const PosStats& s, float inv_t)
      : m(_mm256_set1_ps(s.max)), it(_mm256_set1_ps(inv_t)), th(_mm256_set1_ps(s.thr)),
        iz(_mm256_set1_ps(s.z > 0.0 ? float(1.0 / s.z) : 1.0f)) {}
  template <typename P>
  __m256 p(P x, int64_t j, int64_t n) const {
    const __m256 v = clean8(load_any(x + j, n, kNegInf));
    const __m256 keep = _mm256_cmp_ps(v, th, _CMP_GE_OQ);
    return _mm256_mul_ps(_mm256_and_ps(exp8(_mm256_mul_ps(_mm256_sub_ps(v, m), it)), keep), iz);
  }
  template <typename Q>
  static __m256 residual(__m256 p, const Q* q, int64_t vq, int64_t onehot, int64_t j) {
    __m256 qv;
    if (q != nullptr) {
      qv = j + 8 <= vq ? load8(q + j) : (j < vq ? load_partial(q + j, vq - j, 0.0f) : _mm256_setzero_ps());
      qv = _mm256_and_ps(qv, _mm256_cmp_ps(qv, qv, _CMP_ORD_Q));  // NaN counts as 0 (draft_q1)
    } else {
      const __m256i ids = _mm256_add_epi32(_mm256_set1_epi32(int32_t(j)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      qv = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(ids, _mm256_set1_epi32(int32_t(onehot)))),
                         _mm256_set1_ps(1.0f));
    }
    return _mm256_max_ps(_mm256_sub_ps(p, qv), _mm256_setzero_ps());
  }
};

// Level-1 weights of the race blocks inside [j0, j1) (j0 a multiple of kRaceBlock): out[k] for
// block k = j / kRaceBlock, the sum of the residual's weights if `resid`, else of p's (floats
// summed per lane in float within the block, then in double). If probs_out is given, also
// writes p_j there (the sample op's output distribution).
template <typename Q, typename P>
inline void race_block_sums(P x, int64_t j0, int64_t j1, const Weights& w, bool resid, const Q* q,
                            int64_t vq, int64_t onehot, float* probs_out, double* out) {
  alignas(32) float lanes[8];
  for (int64_t b0 = j0; b0 < j1; b0 += kRaceBlock) {
    const int64_t b1 = std::min(j1, b0 + kRaceBlock);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = b0; j < b1; j += 8) {
      __m256 wt = w.p(x, j, b1 - j);
      if (probs_out) store_row(probs_out, j, b1 - j, wt);
      if (resid) wt = Weights::residual(wt, q, vq, onehot, j);
      acc = _mm256_add_ps(acc, wt);
    }
    _mm256_store_ps(lanes, acc);
    double sum = 0.0;
    for (int l = 0; l < 8; ++l) sum += double(lanes[l]);
    out[b0 / kRaceBlock] = sum;
  }
}

// Level 1: argmax_k sums[k] / e_k over sums[k] > 0 (ties to the lowest k), e_k drawn at index k of
// `key` (the block stream). -1 if no block has weight.
inline int64_t race_blocks(const double* sums, int64_t nb, const PhiloxKey& key) {
  double best = 0.0;
  int64_t idx = -1;
  alignas(32) float e[8];
  for (int64_t k0 = 0; k0 < nb; k0 += 8) {
    _mm256_store_ps(e, exponential8(philox8_first_word(key, uint32_t(k0))));
    for (int64_t l = 0; l < 8 && k0 + l < nb; ++l) {
      const double w = sums[k0 + l];
      if (w > 0.0 && w / double(e[l]) > best) best = w / double(e[l]), idx = k0 + l;
    }
  }
  return idx;
}

// Level 2: argmax_j w_j / e_j inside block k (ids [k * kRaceBlock, min(V, (k + 1) * kRaceBlock))),
// e_j drawn at index j of `key`; w is the residual if `resid`, else p. -1 if nothing weighs > 0.
template <typename Q, typename P>
inline int64_t race_in_block(P x, int64_t V, int64_t k, const Weights& w, bool resid, const Q* q,
                             int64_t vq, int64_t onehot, const PhiloxKey& key) {
  const int64_t j0 = k * kRaceBlock, j1 = std::min(V, j0 + kRaceBlock);
  float best = 0.0f;
  int64_t idx = -1;
  alignas(32) float sc[8];
  for (int64_t j = j0; j < j1; j += 8) {
    __m256 wt = w.p(x, j, j1 - j);
    if (resid) wt = Weights::residual(wt, q, vq, onehot, j);
    const __m256 score = _mm256_div_ps(wt, exponential8(philox8_first_word(key, uint32_t(j))));
    _mm256_store_ps(sc, score);  // w = 0 scores 0 and never beats best >= 0
    for (int64_t l = 0; l < 8 && j + l < j1; ++l)
      if (sc[l] > best) best = sc[l], idx = j + l;
  }
  return idx;
}

// p's race-block sums, normalised like Weights, from one position's statistics pass (chunk_stats
// with want_sum): block k's max logit bmax[k] and its sum of exp((x - bmax[k]) * inv_t) bsum[k].
inline void p_block_sums(const float* bmax, const double* bsum, int64_t nblock, const PosStats& st, double inv_t,
                         double* sums) {
  for (int64_t k = 0; k < nblock; ++k)
    sums[k] = bsum[k] > 0.0 ? bsum[k] * std::exp((double(bmax[k]) - double(st.max)) * inv_t) / st.z : 0.0;
}

// The two-level race over p at one position: row `x` of V logits with statistics `st`. Block sums
// from the statistics pass (bmax / bsum of this position) or, for top-k/top-p rows, one sweep
// (chunks through `exec`, as for_rows hands it out); the block race on `block_key`, the race inside
// the winning block on `key`. On the sample streams this is the target's own sample (the sample op's
// numbers). Returns the argmax if rounding zeroed every weight. `sums`: scratch of nblock doubles.
template <typename P, typename Exec>
inline int64_t race_p(P x, int64_t V, const PosStats& st, double inv_t, float inv_t_f, bool filtered,
                      const float* bmax, const double* bsum, double* sums, Exec&& exec, const PhiloxKey& block_key,
                      const PhiloxKey& key) {
  const int64_t nblock = (V + kRaceBlock - 1) / kRaceBlock, nchunk = (V + kChunk - 1) / kChunk;
  const Weights w(st, inv_t_f);
  if (filtered) {
    exec(nchunk, [&](int64_t c) {
      const int64_t j0 = c * kChunk, j1 = std::min(V, j0 + kChunk);
      race_block_sums<float>(x, j0, j1, w, false, nullptr, 0, -1, nullptr, sums);
    });
  } else {
    p_block_sums(bmax, bsum, nblock, st, inv_t, sums);
  }
  const int64_t k = race_blocks(sums, nblock, block_key);
  const int64_t t = k < 0 ? -1 : race_in_block<float>(x, V, k, w, false, nullptr, 0, -1, key);
  return t >= 0 ? t : st.argmax;
}

// The token bitmask argument of an op: undefined (no mask) or int32 [lead..., W] with W >= 1,
// contiguous; `lead` is the logits' leading shape ([B, K+1], [B, N+1] or [B]). Shapes are checked
// here, always: a wrong one must raise, never read outside the tensor.
inline at::Tensor check_bitmask(const c10::optional<at::Tensor>& opt, at::IntArrayRef lead, const char* op) {
  if (!opt.has_value() || !opt->defined()) return at::Tensor();
  const at::Tensor& m = *opt;
  TORCH_CHECK(m.scalar_type() == at::kInt, op, ": token_bitmask must be int32, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == int64_t(lead.size()) + 1 && m.sizes().slice(0, lead.size()) == lead && m.size(-1) >= 1, op,
              ": token_bitmask must be [", lead, ", W] with W >= 1, got ", m.sizes());
  return m.contiguous();
}

// Per-row sampling parameters ([B] each) normalised to the dtypes the kernels read; the copies cost
// nothing at this size. `op` names the caller in the error message.
struct RowParams {
  at::Tensor temperature_t, top_k_t, top_p_t, seed_t, offset_t;
  const float* temperature;
  const int64_t* top_k;
  const float* top_p;
  const int64_t* seed;
  const int64_t* offset;

  RowParams(const at::Tensor& temperature_in, const at::Tensor& top_k_in, const at::Tensor& top_p_in,
            const at::Tensor& seed_in, const at::Tensor& offset_in, int64_t B, const char* op)
      : temperature_t(temperature_in.to(at::kFloat).contiguous()),
        top_k_t(top_k_in.to(at::kLong).contiguous()),
        top_p_t(top_p_in.to(at::kFloat).contiguous()),
        seed_t(seed_in.to(at::kLong).contiguous()),
        offset_t(offset_in.to(at::kLong).contiguous()) {
    for (const auto* t : {&temperature_t, &top_k_t, &top_p_t, &seed_t, &offset_t})
      TORCH_CHECK(t->numel() == B, op, ": temperature/top_k/top_p/seed/offset must have B entries");
    temperature = temperature_t.data_ptr<float>();
    top_k = top_k_t.data_ptr<int64_t>();
    top_p = top_p_t.data_ptr<float>();
    seed = seed_t.data_ptr<int64_t>();
    offset = offset_t.data_ptr<int64_t>();
  }
};

// How row b samples: greedy (temperature <= 0; NaN too, which the dispatcher never passes),
// top-k/top-p active (sampled rows only: greedy rows need just the argmax), and 1 / temperature
// (1 for greedy rows, as in the reference) in double and in float (clamped: 0 * inv_t stays 0).
struct RowSampling {
  bool greedy = true;
  bool filtered = false;
  double inv_t = 1.0;
  float inv_t_f = 1.0f;
  void set(const RowParams& rp, int64_t b, int64_t V) {
    const double t = rp.temperature[b];
    greedy = !(t > 0.0);
    inv_t = greedy ? 1.0 : 1.0 / t;
    inv_t_f = float(std::min(inv_t, double(FLT_MAX)));
    filtered = !greedy && ((rp.top_k[b] > 0 && rp.top_k[b] < V) || double(rp.top_p[b]) < 1.0);
  }
};

// The statistics of one (row, position), x a row of V logits: chunk_stats over the vocabulary
// chunks through `exec` (as for_rows hands it out), with each race block's max and sum into
// bmax / bsum (the row's [nblock] scratch, or nullptr) when want_sum, and the raw sums when
// want_raw (logprobs); merged; then, for a filtered row with a finite logit, the top-k/top-p
// threshold and kept sum (filter_stats). cs: the row's [nchunk] scratch.
template <typename P, typename Exec>
inline PosStats position_stats(P x, int64_t V, const RowSampling& r, int64_t top_k, double top_p, bool want_sum,
                               bool want_raw, float* bmax, double* bsum, ChunkStats* cs, Exec&& exec) {
  const int64_t nchunk = (V + kChunk - 1) / kChunk;
  exec(nchunk, [&](int64_t c) {
    const int64_t j0 = c * kChunk, nb0 = j0 / kRaceBlock;
    cs[c] = chunk_stats(x + j0, std::min(kChunk, V - j0), j0, r.inv_t_f, want_sum, bmax ? bmax + nb0 : nullptr,
                        bsum ? bsum + nb0 : nullptr, want_raw);
  });
  PosStats st = merge_chunks(cs, nchunk, r.inv_t);
  if (st.finite() && r.filtered) {
    thread_local FilterScratch scratch;
    filter_stats(x, V, r.inv_t, top_k, top_p, st, scratch);
  }
  return st;
}

}  // namespace specdec
