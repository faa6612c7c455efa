// Counter-based Philox-4x32-10 normal noise on the CPU: the stream of genfast/reference/random.py.
//
// Element j of sample b (memory order) is lane j % 4 of Philox4x32-10(key = seed[0], counter = (j / 4, b,
// offset_lo, offset_hi)) with offset = seed[1], turned into normals by Box-Muller on pairs of 24-bit uniforms:
// u = ((x0 >> 8) + 1)·2⁻²⁴ ∈ (0, 1], v = (x1 >> 8)·2⁻²⁴ − ½, r = √(−2 ln u), θ = 2πv, (n0, n1) = (r cos θ,
// r sin θ), and (x2, x3) → (n2, n3) likewise. kLanes counters run at once in GCC/Clang vector types (compiled to
// the widest SIMD the build enables); log and sqrt are at::vec's (SLEEF, 1 ulp), sin and cos polynomials of the
// exact turn fraction v (sincos_2pi). On a CPU with AVX-512 (as ATen detects it: ATEN_CPU_CAPABILITY can lower
// it) a 16-lane twin written with intrinsics runs instead, about twice as fast, with SLEEF's log at 16 lanes; the
// extension itself is built for AVX2.
#pragma once

#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <limits>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#define GENFAST_NOISE_AVX512 1
// SLEEF (linked into libtorch_cpu) declares its 16-lane functions only when the whole file is compiled for
// AVX-512; the kernel below is, by its target attribute alone. Declared for AVX-512 too, so that __m512 passes in
// zmm registers (the ABI the library was built with).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq")
extern "C" {
__m512 Sleef_logf16_u10(__m512);
}
#pragma GCC pop_options
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

// (sin 2πv, cos 2πv) for v ∈ [−½, ½] on GCC vector types (F floats, I int32 of as many lanes): q = round(4v)
// quarter turns, x = 2π(v − q/4) ∈ [−π/4, π/4] (v − q/4 exact), Taylor polynomials to x⁹ and x¹⁰ (truncation
// < 4e-9), rotated by q. Absolute error ~1e-7: the reference's sin/cos of θ = fp32(2π·v) differ by as much.
template <typename F, typename I>
inline void sincos_2pi(F v, F& sin_out, F& cos_out) {
  const F round_magic = F{} + 12582912.0f;  // 1.5·2²³: adding and subtracting it rounds to an integer
  const F q = (v * 4.0f + round_magic) - round_magic;
  const F x = (v - q * 0.25f) * static_cast<float>(6.283185307179586);
  const F x2 = x * x;
  const F sin_x = x + x * x2 * (-1.0f / 6 + x2 * (1.0f / 120 + x2 * (-1.0f / 5040 + x2 * (1.0f / 362880))));
  const F cos_x = 1.0f + x2 * (-0.5f + x2 * (1.0f / 24 + x2 * (-1.0f / 720 + x2 * (1.0f / 40320 + x2 * (-1.0f / 3628800)))));
  const I quarter = __builtin_convertvector(q, I);
  const I sign_bit = I{} + std::numeric_limits<int32_t>::min();
  const I swap = (quarter & 1) != 0;  // all ones where q is odd: sin ↔ cos
  const I sin_sign = ((quarter & 2) != 0) & sign_bit, cos_sign = (((quarter + 1) & 2) != 0) & sign_bit;
  const I s = reinterpret_cast<const I&>(sin_x), c = reinterpret_cast<const I&>(cos_x);
  const I sin_bits = ((s & ~swap) | (c & swap)) ^ sin_sign;
  const I cos_bits = ((c & ~swap) | (s & swap)) ^ cos_sign;
  sin_out = reinterpret_cast<const F&>(sin_bits);
  cos_out = reinterpret_cast<const F&>(cos_bits);
}

// (r cos θ, r sin θ) of the Box-Muller transform of the words (x_u, x_v).
inline void box_muller(U32xL x_u, U32xL x_v, Vec& n_cos, Vec& n_sin) {
  constexpr float two_pow_m24 = 5.9604644775390625e-08f;
  const Vec u = to_vec(__builtin_convertvector(I32xL((x_u >> 8) + 1u), F32xL) * two_pow_m24);
  const F32xL v = __builtin_convertvector(I32xL(x_v >> 8), F32xL) * two_pow_m24 - 0.5f;
  const Vec r = (u.log() * Vec(-2.0f)).sqrt();
  F32xL sin_theta, cos_theta;
  sincos_2pi<F32xL, I32xL>(v, sin_theta, cos_theta);
  n_cos = r * to_vec(cos_theta);
  n_sin = r * to_vec(sin_theta);
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

// philox_normal (below) with at::vec at kLanes lanes.
inline void philox_normal_vec(const PhiloxKey& key, int64_t sample, int64_t col, int64_t n, float* out) {
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

#if GENFAST_NOISE_AVX512
#define GENFAST_AVX512 __attribute__((target("avx512f,avx512dq")))
typedef float F32x16 __attribute__((vector_size(64)));
typedef int32_t I32x16 __attribute__((vector_size(64)));

GENFAST_AVX512 inline void mul_hi_lo_avx512(uint32_t a, __m512i b, __m512i& hi, __m512i& lo) {
  const __m512i m = _mm512_set1_epi32(int(a));
  const __m512i even = _mm512_mul_epu32(b, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(b, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

GENFAST_AVX512 inline void box_muller_avx512(__m512i x_u, __m512i x_v, __m512& n_cos, __m512& n_sin) {
  const __m512 two_pow_m24 = _mm512_set1_ps(5.9604644775390625e-08f);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_srli_epi32(x_u, 8), one)), two_pow_m24);
  const __m512 v = _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(x_v, 8)), two_pow_m24),
                                 _mm512_set1_ps(0.5f));
  const __m512 r = _mm512_sqrt_ps(_mm512_mul_ps(Sleef_logf16_u10(u), _mm512_set1_ps(-2.0f)));
  F32x16 sin_theta, cos_theta;
  sincos_2pi<F32x16, I32x16>((F32x16)v, sin_theta, cos_theta);
  n_cos = _mm512_mul_ps(r, (__m512)cos_theta);
  n_sin = _mm512_mul_ps(r, (__m512)sin_theta);
}

// philox_normal (below) at 16 lanes with AVX-512 intrinsics: 64 normals a step.
GENFAST_AVX512 inline void philox_normal_avx512(const PhiloxKey& key, int64_t sample, int64_t col, int64_t n,
                                                float* out) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t done = 0; done < n; done += 64) {
    __m512i c0 = _mm512_add_epi32(lane, _mm512_set1_epi32(int(uint32_t((col + done) / 4))));
    __m512i c1 = _mm512_set1_epi32(int(uint32_t(sample)));
    __m512i c2 = _mm512_set1_epi32(int(key.offset_lo)), c3 = _mm512_set1_epi32(int(key.offset_hi));
    uint32_t k0 = key.k0, k1 = key.k1;
    for (int round = 0; round < 10; ++round) {
      __m512i hi_b, lo_b, hi_a, lo_a;
      mul_hi_lo_avx512(0xCD9E8D57u, c2, hi_b, lo_b);
      mul_hi_lo_avx512(0xD2511F53u, c0, hi_a, lo_a);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi_b, c1), _mm512_set1_epi32(int(k0)));
      c1 = lo_b;
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi_a, c3), _mm512_set1_epi32(int(k1)));
      c3 = lo_a;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    __m512 n0, n1, n2, n3;
    box_muller_avx512(c0, c1, n0, n1);
    box_muller_avx512(c2, c3, n2, n3);
    // out[4k + i] = n_i[k]: pair up within 128-bit lanes, then transpose the 4×4 grid of 128-bit lanes
    const __m512 a = _mm512_unpacklo_ps(n0, n1), b = _mm512_unpackhi_ps(n0, n1);
    const __m512 c = _mm512_unpacklo_ps(n2, n3), d = _mm512_unpackhi_ps(n2, n3);
    const __m512 e0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
    const __m512 e1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
    const __m512 e2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
    const __m512 e3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
    const __m512 t0 = _mm512_shuffle_f32x4(e0, e1, 0x44), t1 = _mm512_shuffle_f32x4(e2, e3, 0x44);
    const __m512 t2 = _mm512_shuffle_f32x4(e0, e1, 0xEE), t3 = _mm512_shuffle_f32x4(e2, e3, 0xEE);
    _mm512_storeu_ps(out + done, _mm512_shuffle_f32x4(t0, t1, 0x88));
    _mm512_storeu_ps(out + done + 16, _mm512_shuffle_f32x4(t0, t1, 0xDD));
    _mm512_storeu_ps(out + done + 32, _mm512_shuffle_f32x4(t2, t3, 0x88));
    _mm512_storeu_ps(out + done + 48, _mm512_shuffle_f32x4(t2, t3, 0xDD));
  }
}
#undef GENFAST_AVX512
#endif

// Whether philox_normal runs its AVX-512 twin: the CPU has it and ATen uses it (ATEN_CPU_CAPABILITY unset or
// "avx512"). Read once.
inline bool noise_uses_avx512() {
#if GENFAST_NOISE_AVX512
  static const bool avx512 = at::get_cpu_capability() == "AVX512";
  return avx512;
#else
  return false;
#endif
}

// fp32 normals of elements [col, col + n) of sample ``sample``: ``col`` is a multiple of 4 and ``out`` holds
// n rounded up to a multiple of 64 floats (the values past n are further elements of the stream).
inline void philox_normal(const PhiloxKey& key, int64_t sample, int64_t col, int64_t n, float* out) {
  static_assert(64 % (4 * kLanes) == 0, "both versions fill whole chunks of 64 normals");
#if GENFAST_NOISE_AVX512
  if (noise_uses_avx512()) return philox_normal_avx512(key, sample, col, n, out);
#endif
  philox_normal_vec(key, sample, col, n, out);
}

}  // namespace genfast::cpu
