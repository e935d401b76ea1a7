// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
// counter-based generator every specdec backend shares. specdec/reference.py is the specification:
//
//   key     = (seed & 0xFFFFFFFF, seed >> 32)
//   counter = (index, (stream << 16) | position, offset & 0xFFFFFFFF, offset >> 32)
//   bits    = first output word
//
// Stateless: any thread can draw the number for any (seed, offset, stream, position, index)
// without coordination, which is what lets the C++, Triton and reference backends agree token for
// token. Two forms: scalar (acceptance tests, a handful per row) and AVX2 with 8 consecutive
// indices per call (the exponential race over the vocabulary).
#pragma once

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace specdec {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

constexpr int kStreamAccept = 0;    // acceptance test, index 0
constexpr int kStreamResample = 1;  // residual / bonus token, index = vocabulary id
constexpr int kStreamSample = 2;    // the sample op, position 0
constexpr int kStreamResampleBlock = 3;  // block level of the two-level race: index = block number
constexpr int kStreamSampleBlock = 4;
constexpr int kStreamAcceptPrefix = 5;  // block verification: "keep drafts 0..j", index j

struct PhiloxOut {
  uint32_t w[4];
};

// All four output words; the reference uses only w[0], the tests check all four against the
// Random123 known-answer vectors.
inline PhiloxOut philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(c0) * kPhiloxM0;
    const uint64_t p1 = uint64_t(c2) * kPhiloxM1;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return {{c0, c1, c2, c3}};
}

// The per-draw context: everything in the counter and key except the index.
struct PhiloxKey {
  uint32_t k0, k1;  // seed words
  uint32_t c1;      // (stream << 16) | position
  uint32_t c2, c3;  // offset words
  PhiloxKey(int64_t seed, int64_t offset, int stream, int64_t position)
      : k0(uint32_t(uint64_t(seed))),
        k1(uint32_t(uint64_t(seed) >> 32)),
        c1((uint32_t(stream) << 16) | (uint32_t(position) & 0xFFFFu)),
        c2(uint32_t(uint64_t(offset))),
        c3(uint32_t(uint64_t(offset) >> 32)) {}
  uint32_t bits(int64_t index) const {
    return philox4x32_10(uint32_t(index), c1, c2, c3, k0, k1).w[0];
  }
};

// Uniform in (0, 1]: ((bits >> 8) + 1) * 2^-24, exact in float (and double).
inline double uniform_open_closed(uint32_t bits) {
  return double((bits >> 8) + 1u) * (1.0 / 16777216.0);
}

// Uniform in (0, 1): (2 * (bits >> 9) + 1) * 2^-24, exact in float. Its largest value is
// 1 - 2^-24, so the exponential -log(v) is at least -log(1 - 2^-24) > 2^-24: 1/e < 2^24.
inline float uniform_open(uint32_t bits) {
  return float(2u * (bits >> 9) + 1u) * (1.0f / 16777216.0f);
}

#if defined(__AVX2__)
// 32x32 -> 64-bit products of 8 lanes, split into high and low words. _mm256_mul_epu32 only
// multiplies the even lanes, so the odd lanes are shifted down and multiplied separately.
static inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// First output word for indices index0 .. index0 + 7 (one per lane), same key/counter otherwise.
static inline __m256i philox8_first_word(const PhiloxKey& k, uint32_t index0) {
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(int(index0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(int(k.c1));
  __m256i c2 = _mm256_set1_epi32(int(k.c2));
  __m256i c3 = _mm256_set1_epi32(int(k.c3));
  const __m256i m0 = _mm256_set1_epi32(int(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(int(kPhiloxM1));
  uint32_t k0 = k.k0, k1 = k.k1;
  for (int r = 0; r < 10; ++r) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(c0, m0, hi0, lo0);
    mulhilo8(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(int(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(int(k1)));
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c0;
}
#endif

}  // namespace specdec
