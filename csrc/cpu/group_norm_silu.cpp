// GroupNorm + SiLU with the time-embedding add and the scale-shift on the CPU: forward and backward
// (genfast/reference/group_norm.py is the specification).
//
//   h = x + add,  x̂ = (h − mean)·rstd,  m = x̂·α + β  with  α = w·(1 + scale),  β = b·(1 + scale) + shift,
//   y = silu(m) = m·σ(m)  (or y = m)
//
// x is read as (B, C, S): NCHW (spatial stride 1) or NHWC (channel stride 1), in place; any other layout is made
// contiguous first. Math in fp32 with at::vec::Vectorized (bf16/fp16 spans are converted to fp32 in a scratch
// buffer); statistics relative to the pivot K = h at the group's first element, so a large mean costs no precision:
// with d = h − K, fp32 sums of d and d² over blocks of at most BLOCK elements are added in double, and
// var = Σd²/N − (Σd/N)². Writing t = K − add (per channel) and μ = mean − K, the group's x̂ = ((x − t) − μ)·rstd.
//
// Parallel work: NCHW runs one (b, g) group per task (the group is contiguous: one read from memory, the second
// pass from cache); NHWC runs one sample per task (a position holds all groups' channels side by side).
//
// Backward, with dm = dy·silu'(m), per-(b, c) sums over space P = Σ dm, Q = Σ dm·x̂, R = Σ x̂ and per group
// (N = C/G·S elements) m1 = Σ_c α·P / N, m2 = Σ_c α·Q / N:
//   dx = rstd·(α·dm − m1 − x̂·m2)       dadd = rstd·(α·P − S·m1 − R·m2)
//   dshift = P    dscale = w·Q + b·P    dweight = Σ_b (1 + scale)·Q    dbias = Σ_b (1 + scale)·P
// dm is kept in a scratch buffer between the two passes. Every reduction runs in a fixed order: deterministic.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "group_norm_silu.h"

#include <cmath>
#include <tuple>
#include <vector>

namespace genfast {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t BLOCK = 1024;         // elements summed in fp32 before the partial sum is added in double
constexpr int64_t NHWC_BLOCK = 64;      // positions summed in fp32 per channel before adding in double
constexpr int64_t TASK_ELEMENTS = 32768;  // about the least work per parallel task

// ---- fp32 views of spans of x, y, dy, dx ---------------------------------------------------------------------
template <typename T>
const float* read_span(const T* src, int64_t n, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    at::vec::convert(src, scratch, n);
    return scratch;
  }
}

template <typename T>
float* write_span(T* dst, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    return scratch;
  }
}

template <typename T>
void commit_span(T* dst, const float* scratch, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    at::vec::convert(scratch, dst, n);
  }
}

double hsum(const Vec& v) {
  float lanes[kVec];
  v.store(lanes);
  double total = 0.0;
  for (int64_t i = 0; i < kVec; ++i) total += lanes[i];
  return total;
}

// Per-channel constants of a span: one value for a whole span (NCHW: a span is one channel) or one per element
// (NHWC: a span is one position, its elements are the channels).
struct Uniform {
  Vec v;
  explicit Uniform(float value) : v(value) {}
  Vec at(int64_t) const { return v; }
  Vec at(int64_t, int64_t) const { return v; }
};

struct PerElement {
  const float* p;
  Vec at(int64_t i) const { return Vec::loadu(p + i); }
  Vec at(int64_t i, int64_t count) const { return Vec::loadu(p + i, count); }
};

Vec sigmoid(const Vec& m) {
  const Vec one(1.f);
  return one / (one + m.neg().exp_u20());
}


// ---- forward ------------------------------------------------------------------------------------------------
// y = silu(((x − t) − μ)·A + B) over a span; A = rstd·α.
template <typename C>
void apply_span(const float* x, float* y, int64_t n, const C& t, const C& mu, const C& a, const C& b, bool silu) {
  auto one = [&](Vec v, Vec tv, Vec muv, Vec av, Vec bv) {
    Vec m = at::vec::fmadd((v - tv) - muv, av, bv);
    return silu ? m * sigmoid(m) : m;
  };
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) one(Vec::loadu(x + i), t.at(i), mu.at(i), a.at(i), b.at(i)).store(y + i);
  if (i < n) {
    const int64_t r = n - i;
    one(Vec::loadu(x + i, r), t.at(i, r), mu.at(i, r), a.at(i, r), b.at(i, r)).store(y + i, r);
  }
}

// (Σ d, Σ d²) of d = x − t over a span, fp32 within blocks of BLOCK elements, in double across blocks.
void shifted_sums(const float* x, int64_t n, float t, double& sum, double& sumsq) {
  const Vec tv(t);
  for (int64_t start = 0; start < n; start += BLOCK) {
    const int64_t end = std::min(n, start + BLOCK);
    Vec s0(0.f), s1(0.f), q0(0.f), q1(0.f);
    int64_t i = start;
    for (; i + 2 * kVec <= end; i += 2 * kVec) {
      Vec d0 = Vec::loadu(x + i) - tv, d1 = Vec::loadu(x + i + kVec) - tv;
      s0 = s0 + d0;
      s1 = s1 + d1;
      q0 = at::vec::fmadd(d0, d0, q0);
      q1 = at::vec::fmadd(d1, d1, q1);
    }
    for (; i < end; i += kVec) {
      const int64_t r = std::min(kVec, end - i);
      Vec d = Vec::set(Vec(0.f), Vec::loadu(x + i, r) - tv, r);
      s0 = s0 + d;
      q0 = at::vec::fmadd(d, d, q0);
    }
    sum += hsum(s0 + s1);
    sumsq += hsum(q0 + q1);
  }
}

// Everything the kernels read, as fp32 (B, C) tables (weight/bias as (C,)), plus the geometry.
struct Problem : GroupNormGeometry {
  std::vector<float> w, bias, add, gain, shift;  // gain = 1 + scale
};

std::vector<float> table(const c10::optional<at::Tensor>& t, int64_t n, float fill) {
  std::vector<float> out(n, fill);
  if (t.has_value()) {
    at::Tensor f = t->to(at::kFloat).contiguous();
    std::copy(f.data_ptr<float>(), f.data_ptr<float>() + n, out.begin());
  }
  return out;
}

Problem make_problem(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
                     const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                     int64_t num_groups, const char* op) {
  Problem p{group_norm_geometry(x, weight, bias, add, scale, shift, num_groups, op)};
  const int64_t B = p.B, C = p.C;
  p.w = table(weight, C, 1.f);
  p.bias = table(bias, C, 0.f);
  p.add = table(add, B * C, 0.f);
  p.gain = table(scale, B * C, 0.f);
  for (float& g : p.gain) g += 1.f;
  p.shift = table(shift, B * C, 0.f);
  return p;
}

// Group statistics from per-channel (Σd, Σd²): μ = Σd/N (relative to the pivot) and rstd.
void finish_stats(double sum, double sumsq, int64_t n, double eps, float& mu, float& rstd) {
  const double mean = n > 0 ? sum / n : 0.0;
  const double var = n > 0 ? std::max(sumsq / n - mean * mean, 0.0) : 0.0;
  mu = static_cast<float>(mean);
  rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
}

template <typename T>
void forward_nchw(const Problem& p, const T* x, T* y, float* mean, float* rstd, double eps, bool silu) {
  const int64_t S = p.S, N = p.CPG * S;
  at::parallel_for(0, p.B * p.G, std::max<int64_t>(1, TASK_ELEMENTS / std::max<int64_t>(N, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> xs(std::is_same_v<T, float> ? 0 : N), ys(std::is_same_v<T, float> ? 0 : S);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.G, c0 = (row % p.G) * p.CPG;
      const float* xf = read_span(x + row * N, N, xs.data());
      const float K = N > 0 ? xf[0] + p.add[b * p.C + c0] : 0.f;
      double sum = 0.0, sumsq = 0.0;
      for (int64_t j = 0; j < p.CPG; ++j) shifted_sums(xf + j * S, S, K - p.add[b * p.C + c0 + j], sum, sumsq);
      float mu, r;
      finish_stats(sum, sumsq, N, eps, mu, r);
      mean[row] = K + mu;
      rstd[row] = r;
      for (int64_t j = 0; j < p.CPG; ++j) {
        const int64_t c = c0 + j, bc = b * p.C + c;
        T* out = y + row * N + j * S;
        float* yf = write_span(out, ys.data());
        apply_span(xf + j * S, yf, S, Uniform(K - p.add[bc]), Uniform(mu), Uniform(r * p.w[c] * p.gain[bc]),
                   Uniform(p.bias[c] * p.gain[bc] + p.shift[bc]), silu);
        commit_span(out, yf, S);
      }
    }
  });
}

// Per-channel running sums over positions: fp32 for NHWC_BLOCK positions, then added into double.
struct ChannelSums {
  int64_t C;
  std::vector<float> part;
  std::vector<double> total;
  int64_t count = 0;
  ChannelSums(int64_t channels, int64_t sums) : C(channels), part(channels * sums, 0.f), total(channels * sums, 0.0) {}
  float* sums(int64_t k) { return part.data() + k * C; }
  void step() {
    if (++count % NHWC_BLOCK == 0) flush();
  }
  void flush() {
    for (size_t i = 0; i < part.size(); ++i) total[i] += part[i];
    std::fill(part.begin(), part.end(), 0.f);
  }
};

// acc[c] += v[c] over a span of channels (vectorised; v already masked).
void accumulate(float* acc, int64_t i, const Vec& v, int64_t count) {
  if (count == kVec) {
    (Vec::loadu(acc + i) + v).store(acc + i);
  } else {
    (Vec::loadu(acc + i, count) + v).store(acc + i, count);
  }
}

// The statistics pivot of each group of one NHWC sample: h = x + add at position 0 in the group's first channel
// (0 when there are no positions).
template <typename T>
std::vector<float> nhwc_pivots(const T* xb, const float* add, int64_t C, int64_t G, int64_t CPG, int64_t S,
                               float* scratch) {
  std::vector<float> K(G, 0.f);
  if (S > 0) {
    const float* x0 = read_span(xb, C, scratch);
    for (int64_t g = 0; g < G; ++g) K[g] = x0[g * CPG] + add[g * CPG];
  }
  return K;
}

template <typename T>
void forward_nhwc(const Problem& p, const T* x, T* y, float* mean, float* rstd, double eps, bool silu) {
  const int64_t C = p.C, S = p.S, G = p.G, CPG = p.CPG;
  at::parallel_for(0, p.B, std::max<int64_t>(1, TASK_ELEMENTS / std::max<int64_t>(C * S, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> xs(std::is_same_v<T, float> ? 0 : C), ys(std::is_same_v<T, float> ? 0 : C);
    std::vector<float> t(C), mu(C), a(C), bb(C);
    for (int64_t b = begin; b < end; ++b) {
      const T* xb = x + b * C * S;
      const float* add = p.add.data() + b * C;
      // Pivot of each group (h at position 0, its first channel), as t = K − add per channel.
      const std::vector<float> K = nhwc_pivots(xb, add, C, G, CPG, S, xs.data());
      for (int64_t c = 0; c < C; ++c) t[c] = K[c / CPG] - add[c];
      ChannelSums acc(C, 2);
      for (int64_t s = 0; s < S; ++s) {
        const float* xf = read_span(xb + s * C, C, xs.data());
        float *sum = acc.sums(0), *sq = acc.sums(1);
        for (int64_t i = 0; i < C; i += kVec) {
          const int64_t r = std::min(kVec, C - i);
          Vec d = Vec::set(Vec(0.f), Vec::loadu(xf + i, r) - Vec::loadu(t.data() + i, r), r);
          accumulate(sum, i, d, r);
          accumulate(sq, i, d * d, r);
        }
        acc.step();
      }
      acc.flush();
      for (int64_t g = 0; g < G; ++g) {
        double sum = 0.0, sumsq = 0.0;
        for (int64_t c = g * CPG; c < (g + 1) * CPG; ++c) {
          sum += acc.total[c];
          sumsq += acc.total[C + c];
        }
        float m, r;
        finish_stats(sum, sumsq, CPG * S, eps, m, r);
        mean[b * G + g] = K[g] + m;
        rstd[b * G + g] = r;
        for (int64_t c = g * CPG; c < (g + 1) * CPG; ++c) {
          const int64_t bc = b * C + c;
          mu[c] = m;
          a[c] = r * p.w[c] * p.gain[bc];
          bb[c] = p.bias[c] * p.gain[bc] + p.shift[bc];
        }
      }
      const PerElement tv{t.data()}, muv{mu.data()}, av{a.data()}, bv{bb.data()};
      for (int64_t s = 0; s < S; ++s) {
        const float* xf = read_span(xb + s * C, C, xs.data());
        T* out = y + (b * S + s) * C;
        float* yf = write_span(out, ys.data());
        apply_span(xf, yf, C, tv, muv, av, bv, silu);
        commit_span(out, yf, C);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& add, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, int64_t num_groups, double eps, bool silu) {
  const Problem p = make_problem(x_in, weight, bias, add, scale, shift, num_groups, "cpp_group_norm_silu");
  const at::Tensor x = kernel_layout(x_in);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({p.B, p.G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    auto run = p.nhwc ? forward_nhwc<scalar_t> : forward_nchw<scalar_t>;
    run(p, x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
        eps, silu);
  });
  if (!x.is_same(x_in)) y = at::empty_like(x_in).copy_(y);
  return {y, mean, rstd};
}

// ---- backward -----------------------------------------------------------------------------------------------
// Per-channel constants of the backward: t, μ, rstd and α, β (of m = x̂·α + β).
template <typename C>
struct BackwardConsts {
  C t, mu, rstd, alpha, beta;
};

// Pass 1 over a span: dm (stored) and the sums P, Q, R through `add(i, dm, dm·x̂, x̂, count)`.
template <typename C, typename Add>
void grad_span(const float* x, const float* dy, float* dm_out, int64_t n, const BackwardConsts<C>& k, bool silu,
               Add&& add) {
  for (int64_t i = 0; i < n; i += kVec) {
    const int64_t r = std::min(kVec, n - i);
    const bool full = r == kVec;
    Vec xv = full ? Vec::loadu(x + i) : Vec::loadu(x + i, r);
    Vec g = full ? Vec::loadu(dy + i) : Vec::loadu(dy + i, r);  // zero beyond the span
    Vec xhat = ((xv - k.t.at(i, r)) - k.mu.at(i, r)) * k.rstd.at(i, r);
    if (!full) xhat = Vec::set(Vec(0.f), xhat, r);
    if (silu) {
      Vec m = at::vec::fmadd(xhat, k.alpha.at(i, r), k.beta.at(i, r));
      Vec s = sigmoid(m);
      g = g * s * at::vec::fmadd(m, Vec(1.f) - s, Vec(1.f));
    }
    if (full) {
      g.store(dm_out + i);
    } else {
      g.store(dm_out + i, r);
    }
    add(i, g, g * xhat, xhat, r);
  }
}

// Pass 2 over a span: dx = k1·dm − k2·((x − t) − μ) − k3.
template <typename C>
void dx_span(const float* x, const float* dm, float* dx, int64_t n, const C& t, const C& mu, const C& k1,
             const C& k2, const C& k3) {
  for (int64_t i = 0; i < n; i += kVec) {
    const int64_t r = std::min(kVec, n - i);
    const bool full = r == kVec;
    Vec d = ((full ? Vec::loadu(x + i) : Vec::loadu(x + i, r)) - t.at(i, r)) - mu.at(i, r);
    Vec v = k1.at(i, r) * (full ? Vec::loadu(dm + i) : Vec::loadu(dm + i, r)) - k2.at(i, r) * d - k3.at(i, r);
    if (full) {
      v.store(dx + i);
    } else {
      v.store(dx + i, r);
    }
  }
}

// Per-(b, c) outputs of the backward, (B, C) fp32 each.
struct ChannelGrads {
  float *gq, *gp, *dscale, *dshift, *dadd;
};

// From one group's per-channel sums: the per-(b, c) gradients and the dx coefficients k1, k2, k3 per channel.
void finish_group(const Problem& p, int64_t b, int64_t g, const double* P, const double* Q, const double* R,
                  float group_rstd, const ChannelGrads& out, float* k1, float* k2, float* k3) {
  const int64_t c0 = g * p.CPG, N = p.CPG * p.S;
  double m1 = 0.0, m2 = 0.0;
  for (int64_t j = 0; j < p.CPG; ++j) {
    const float alpha = p.w[c0 + j] * p.gain[b * p.C + c0 + j];
    m1 += alpha * P[j];
    m2 += alpha * Q[j];
  }
  m1 = N > 0 ? m1 / N : 0.0;
  m2 = N > 0 ? m2 / N : 0.0;
  const double rstd = group_rstd;
  for (int64_t j = 0; j < p.CPG; ++j) {
    const int64_t c = c0 + j, bc = b * p.C + c;
    const double alpha = p.w[c] * p.gain[bc];
    out.gq[bc] = static_cast<float>(p.gain[bc] * Q[j]);
    out.gp[bc] = static_cast<float>(p.gain[bc] * P[j]);
    out.dscale[bc] = static_cast<float>(p.w[c] * Q[j] + p.bias[c] * P[j]);
    out.dshift[bc] = static_cast<float>(P[j]);
    out.dadd[bc] = static_cast<float>(rstd * (alpha * P[j] - p.S * m1 - R[j] * m2));
    k1[j] = static_cast<float>(rstd * alpha);
    k2[j] = static_cast<float>(rstd * rstd * m2);
    k3[j] = static_cast<float>(rstd * m1);
  }
}

template <typename T>
void backward_nchw(const Problem& p, const T* dy, const T* x, const float* mean, const float* rstd, T* dx,
                   const ChannelGrads& out, bool silu) {
  const int64_t S = p.S, N = p.CPG * S, CPG = p.CPG;
  at::parallel_for(0, p.B * p.G, std::max<int64_t>(1, TASK_ELEMENTS / std::max<int64_t>(N, 1)),
                   [&](int64_t begin, int64_t end) {
    constexpr bool f32 = std::is_same_v<T, float>;
    std::vector<float> xs(f32 ? 0 : N), gs(f32 ? 0 : S), ds(f32 ? 0 : S), dm(N);
    std::vector<double> P(CPG), Q(CPG), R(CPG);
    std::vector<float> k1(CPG), k2(CPG), k3(CPG), t(CPG);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.G, c0 = (row % p.G) * CPG;
      const float* xf = read_span(x + row * N, N, xs.data());
      const float K = N > 0 ? xf[0] + p.add[b * p.C + c0] : 0.f;
      const float mu = mean[row] - K, r = rstd[row];
      for (int64_t j = 0; j < CPG; ++j) {
        const int64_t bc = b * p.C + c0 + j;
        t[j] = K - p.add[bc];
        const BackwardConsts<Uniform> k{Uniform(t[j]), Uniform(mu), Uniform(r), Uniform(p.w[c0 + j] * p.gain[bc]),
                                        Uniform(p.bias[c0 + j] * p.gain[bc] + p.shift[bc])};
        Vec pv(0.f), qv(0.f), rv(0.f);
        double ps = 0.0, qs = 0.0, rs = 0.0;
        const float* gf = read_span(dy + row * N + j * S, S, gs.data());
        for (int64_t start = 0; start < S; start += BLOCK) {
          const int64_t len = std::min(BLOCK, S - start);
          grad_span(xf + j * S + start, gf + start, dm.data() + j * S + start, len, k, silu,
                    [&](int64_t, const Vec& a, const Vec& q, const Vec& x_hat, int64_t) {
                      pv = pv + a;
                      qv = qv + q;
                      rv = rv + x_hat;
                    });
          ps += hsum(pv);
          qs += hsum(qv);
          rs += hsum(rv);
          pv = qv = rv = Vec(0.f);
        }
        P[j] = ps;
        Q[j] = qs;
        R[j] = rs;
      }
      finish_group(p, b, row % p.G, P.data(), Q.data(), R.data(), r, out, k1.data(), k2.data(), k3.data());
      for (int64_t j = 0; j < CPG; ++j) {
        T* o = dx + row * N + j * S;
        float* of = write_span(o, ds.data());
        dx_span(xf + j * S, dm.data() + j * S, of, S, Uniform(t[j]), Uniform(mu), Uniform(k1[j]), Uniform(k2[j]),
                Uniform(k3[j]));
        commit_span(o, of, S);
      }
    }
  });
}

template <typename T>
void backward_nhwc(const Problem& p, const T* dy, const T* x, const float* mean, const float* rstd, T* dx,
                   const ChannelGrads& out, bool silu) {
  const int64_t C = p.C, S = p.S, G = p.G, CPG = p.CPG;
  at::parallel_for(0, p.B, std::max<int64_t>(1, TASK_ELEMENTS / std::max<int64_t>(C * S, 1)),
                   [&](int64_t begin, int64_t end) {
    constexpr bool f32 = std::is_same_v<T, float>;
    std::vector<float> xs(f32 ? 0 : C), gs(f32 ? 0 : C), ds(f32 ? 0 : C), dm(C * S);
    std::vector<float> t(C), mu(C), rs(C), alpha(C), beta(C), k1(C), k2(C), k3(C);
    for (int64_t b = begin; b < end; ++b) {
      const T* xb = x + b * C * S;
      const T* gb = dy + b * C * S;
      const float* add = p.add.data() + b * C;
      const std::vector<float> K = nhwc_pivots(xb, add, C, G, CPG, S, xs.data());
      for (int64_t c = 0; c < C; ++c) {
        const int64_t g = c / CPG, bc = b * C + c;
        t[c] = K[g] - add[c];
        mu[c] = mean[b * G + g] - K[g];
        rs[c] = rstd[b * G + g];
        alpha[c] = p.w[c] * p.gain[bc];
        beta[c] = p.bias[c] * p.gain[bc] + p.shift[bc];
      }
      const BackwardConsts<PerElement> k{{t.data()}, {mu.data()}, {rs.data()}, {alpha.data()}, {beta.data()}};
      ChannelSums acc(C, 3);
      float *P = acc.sums(0), *Q = acc.sums(1), *R = acc.sums(2);
      for (int64_t s = 0; s < S; ++s) {
        const float* xf = read_span(xb + s * C, C, xs.data());
        const float* gf = read_span(gb + s * C, C, gs.data());
        grad_span(xf, gf, dm.data() + s * C, C, k, silu,
                  [&](int64_t i, const Vec& a, const Vec& q, const Vec& x_hat, int64_t r) {
                    accumulate(P, i, a, r);
                    accumulate(Q, i, q, r);
                    accumulate(R, i, x_hat, r);
                  });
        acc.step();
      }
      acc.flush();
      for (int64_t g = 0; g < G; ++g) {
        const int64_t c0 = g * CPG;
        finish_group(p, b, g, acc.total.data() + c0, acc.total.data() + C + c0, acc.total.data() + 2 * C + c0,
                     rstd[b * G + g], out, k1.data() + c0, k2.data() + c0, k3.data() + c0);
      }
      const PerElement tv{t.data()}, muv{mu.data()}, k1v{k1.data()}, k2v{k2.data()}, k3v{k3.data()};
      for (int64_t s = 0; s < S; ++s) {
        const float* xf = read_span(xb + s * C, C, xs.data());
        T* o = dx + (b * S + s) * C;
        float* of = write_span(o, ds.data());
        dx_span(xf, dm.data() + s * C, of, C, tv, muv, k1v, k2v, k3v);
        commit_span(o, of, C);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, int64_t num_groups, bool silu) {
  const Problem p = make_problem(x_in, weight, bias, add, scale, shift, num_groups, "cpp_group_norm_silu_backward");
  check_backward_inputs(grad_y, x_in, mean_in, rstd_in, p, "cpp_group_norm_silu_backward");
  const at::Tensor x = kernel_layout(x_in);
  at::Tensor dy = grad_y;
  if (dy.strides() != x.strides() || dy.scalar_type() != x.scalar_type()) {
    dy = at::empty_like(x).copy_(grad_y);  // the kernels index dy with x's strides
  }
  const at::Tensor mean = mean_in.to(at::kFloat).contiguous(), rstd = rstd_in.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty_like(x);
  // Separate tensors: the returned gradients must not share storage.
  auto table_bc = [&] { return at::empty({p.B, p.C}, x.options().dtype(at::kFloat)); };
  at::Tensor gq = table_bc(), gp = table_bc(), dscale = table_bc(), dshift = table_bc(), dadd = table_bc();
  const ChannelGrads out{gq.data_ptr<float>(), gp.data_ptr<float>(), dscale.data_ptr<float>(),
                         dshift.data_ptr<float>(), dadd.data_ptr<float>()};
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    auto run = p.nhwc ? backward_nhwc<scalar_t> : backward_nchw<scalar_t>;
    run(p, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean.const_data_ptr<float>(),
        rstd.const_data_ptr<float>(), dx.data_ptr<scalar_t>(), out, silu);
  });
  // dweight, dbias: Σ_b in a fixed order (double accumulators).
  at::Tensor dw = at::empty({p.C}, x.options().dtype(at::kFloat)), db = at::empty_like(dw);
  for (int64_t c = 0; c < p.C; ++c) {
    double sw = 0.0, sb = 0.0;
    for (int64_t b = 0; b < p.B; ++b) {
      sw += out.gq[b * p.C + c];
      sb += out.gp[b * p.C + c];
    }
    dw.data_ptr<float>()[c] = static_cast<float>(sw);
    db.data_ptr<float>()[c] = static_cast<float>(sb);
  }
  if (!x.is_same(x_in)) dx = at::empty_like(x_in).copy_(dx);
  return {dx, input_grad(dw, weight, x), input_grad(db, bias, x), input_grad(dadd, add, x),
          input_grad(dscale, scale, x), input_grad(dshift, shift, x)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genfast, m) {
  m.def("cpp_group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, Tensor? add, Tensor? scale, Tensor? shift, "
        "int num_groups, float eps, bool silu) -> (Tensor, Tensor, Tensor)");
  m.def("cpp_group_norm_silu_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor? add, "
        "Tensor? scale, Tensor? shift, Tensor mean, Tensor rstd, int num_groups, bool silu) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("cpp_group_norm_silu", &group_norm_silu_cpu);
  m.impl("cpp_group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

}  // namespace genfast
