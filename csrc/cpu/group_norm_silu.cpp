// GroupNorm + SiLU with the time-embedding add and the scale-shift on the CPU: the forward, and the schemas of
// both ops (genfast/reference/group_norm_silu.py is the specification; the backward is in
// group_norm_silu_backward.cpp, the helpers both share in group_norm_silu_cpu.h).
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
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "group_norm_silu.h"
#include "group_norm_silu_cpu.h"

#include <cmath>
#include <tuple>
#include <vector>

namespace genfast::group_norm_cpu {
namespace {

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

}  // namespace
}  // namespace genfast::group_norm_cpu

TORCH_LIBRARY_FRAGMENT(genfast, m) {
  m.def("cpp_group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, Tensor? add, Tensor? scale, Tensor? shift, "
        "int num_groups, float eps, bool silu) -> (Tensor, Tensor, Tensor)");
  m.def("cpp_group_norm_silu_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor? add, "
        "Tensor? scale, Tensor? shift, Tensor mean, Tensor rstd, int num_groups, bool silu) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("cpp_group_norm_silu", &genfast::group_norm_cpu::group_norm_silu_cpu);
}
