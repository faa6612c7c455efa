// Counter-based Philox-4x32-10 normal noise on the CPU: the stream of genfast/reference/random.py.
//
// Element j of sample b (memory order) is lane j % 4 of Philox4x32-10(key = seed[0], counter = (j / 4, b,
// offset_lo, offset_hi)) with offset = seed[1], turned into normals by Box-Muller on pairs of 24-bit uniforms:
// u = ((x0 >> 8) + 1)·2⁻²⁴ ∈ (0, 1], v = (x1 >> 8)·2⁻²⁴ − ½, r = √(−2 ln u), θ = 2πv, (n0, n1) = (r cos θ,
// r sin θ), and (x2, x3) → (n2, n3) likewise. kLanes counters run at once in GCC/Clang vector types (compiled to
// the widest SIMD the build enables); log, sqrt, sin and cos are at::vec's (SLEEF, 1 ulp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#if defined(__AVX2__) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace genfast::cpu {

using Vec = at::vec::Vectorized<float>;

// Philox counters processed at once: one per lane of a Vectorized<float>, so 4·kLanes normals a call.
constexpr int64_t kLanes = Vec::size();
// The per-sample counter j / 4 is one 32-bit word (reference: MAX_SAMPLE_NUMEL).
constexpr int64_t kMaxNoiseSampleNumel = int64_t(1) << 34;

typedef uint32_t U32xL __attribute__((vector_size(4 * kLanes)));
typedef int32_t I32xL __attribute__((vector_size(4 * kLanes)));
typedef float F32xL __attribute__((vector_size(4 * kLanes)));

// The seed [key, offset] of a Philox stream, split into 32-bit words.
struct PhiloxKey {
  uint32_t k0, k1, offset_lo, offset_hi;
};

// Reads the int64 tensor ``seed`` = [key, offset] (checked: 2 elements, integer dtype).
inline PhiloxKey read_seed(const at::Tensor& seed, const char* op) {
  TORCH_CHECK(!seed.is_floating_point() && !seed.is_complex() && seed.numel() == 2, op,
              ": seed must be an integer tensor [key, offset] of 2 elements, got dtype ", seed.scalar_type(),
              " and shape ", seed.sizes());
  const at::Tensor words = seed.to(at::kCPU, at::kLong).contiguous();
  const auto key = static_cast<uint64_t>(words.data_ptr<int64_t>()[0]);
  const auto offset = static_cast<uint64_t>(words.data_ptr<int64_t>()[1]);
  return {uint32_t(key), uint32_t(key >> 32), uint32_t(offset), uint32_t(offset >> 32)};
}

// High and low words of the 64-bit products a·b. On x86 the even and odd 32-bit lanes multiply as 32×32→64 with
// vpmuludq (compilers turn the portable form into a 64×64 multiplication by shifts and adds, 4× slower).
inline void mul_hi_lo(uint32_t a, U32xL b, U32xL& hi, U32xL& lo) {
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(kLanes == 16);
  const __m512i v = (__m512i)b, m = _mm512_set1_epi32(int(a));
  const __m512i even = _mm512_mul_epu32(v, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(v, 32), m);
  lo = (U32xL)_mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = (U32xL)_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
#elif defined(__AVX2__)
  static_assert(kLanes == 8);
  const __m256i v = (__m256i)b, m = _mm256_set1_epi32(int(a));
  const __m256i even = _mm256_mul_epu32(v, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(v, 32), m);
  lo = (U32xL)_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = (U32xL)_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
#else
  for (int64_t i = 0; i < kLanes; ++i) {
    const uint64_t product = uint64_t(a) * b[i];
    hi[i] = uint32_t(product >> 32);
    lo[i] = uint32_t(product);
  }
#endif
}

// Philox4x32-10 on kLanes counters (c0, c1, c2, c3) with key (k0, k1), in place.
inline void philox4x32_10(U32xL& c0, U32xL& c1, U32xL& c2, U32xL& c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    U32xL hi_b, lo_b, hi_a, lo_a;
    mul_hi_lo(0xCD9E8D57u, c2, hi_b, lo_b);
    mul_hi_lo(0xD2511F53u, c0, hi_a, lo_a);
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

inline Vec to_vec(F32xL v) {
  return Vec::loadu(&v);
}

// (r cos θ, r sin θ) of the Box-Muller transform of the words (x_u, x_v).
inline void box_muller(U32xL x_u, U32xL x_v, Vec& n_cos, Vec& n_sin) {
  constexpr float two_pow_m24 = 5.9604644775390625e-08f;
  const Vec u = to_vec(__builtin_convertvector(I32xL((x_u >> 8) + 1u), F32xL) * two_pow_m24);
  const Vec v = to_vec(__builtin_convertvector(I32xL(x_v >> 8), F32xL) * two_pow_m24 - 0.5f);
  const Vec r = (u.log() * Vec(-2.0f)).sqrt();
  const Vec theta = v * Vec(static_cast<float>(6.283185307179586));
  n_cos = r * theta.cos();
  n_sin = r * theta.sin();
}

// Stores the normals of kLanes counters in memory order: out[4k + i] = n_i[k], for 4·kLanes floats.
inline void store_interleaved(const Vec& n0, const Vec& n1, const Vec& n2, const Vec& n3, float* out) {
  using VecD = at::vec::Vectorized<double>;
  const auto [p_lo, p_hi] = at::vec::interleave2<float>(n0, n1);  // (n0[k], n1[k]) pairs
  const auto [q_lo, q_hi] = at::vec::interleave2<float>(n2, n3);  // (n2[k], n3[k]) pairs
  const auto [r0, r1] = at::vec::interleave2<double>(at::vec::cast<double>(p_lo), at::vec::cast<double>(q_lo));
  const auto [r2, r3] = at::vec::interleave2<double>(at::vec::cast<double>(p_hi), at::vec::cast<double>(q_hi));
  at::vec::cast<float>(r0).store(out);
  at::vec::cast<float>(r1).store(out + kLanes);
  at::vec::cast<float>(r2).store(out + 2 * kLanes);
  at::vec::cast<float>(r3).store(out + 3 * kLanes);
}

// fp32 normals of elements [col, col + n) of sample ``sample``: ``col`` is a multiple of 4 and ``out`` holds
// n rounded up to a multiple of 4·kLanes floats (the values past n are further elements of the stream).
inline void philox_normal(const PhiloxKey& key, int64_t sample, int64_t col, int64_t n, float* out) {
  U32xL lane;
  for (int64_t i = 0; i < kLanes; ++i) lane[i] = uint32_t(i);
  const U32xL c1 = U32xL{} + uint32_t(sample);
  const U32xL c2 = U32xL{} + key.offset_lo;
  const U32xL c3 = U32xL{} + key.offset_hi;
  for (int64_t done = 0; done < n; done += 4 * kLanes) {
    U32xL x0 = lane + uint32_t((col + done) / 4), x1 = c1, x2 = c2, x3 = c3;
    philox4x32_10(x0, x1, x2, x3, key.k0, key.k1);
    Vec n0, n1, n2, n3;
    box_muller(x0, x1, n0, n1);
    box_muller(x2, x3, n2, n3);
    store_interleaved(n0, n1, n2, n3, out + done);
  }
}

}  // namespace genfast::cpu
