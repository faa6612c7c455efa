// GroupNorm + SiLU on the CPU: the backward of group_norm_silu.cpp (its layouts, pivot K, t = K − add and
// μ = mean − K), with x̂ = ((x − t) − μ)·rstd recomputed from the saved mean and rstd.
//
// With dm = dy·silu'(m), per-(b, c) sums over space P = Σ dm, Q = Σ dm·x̂, R = Σ x̂ and per group
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
#include "group_norm_silu_cpu.h"

#include <tuple>
#include <vector>

namespace genfast::group_norm_cpu {
namespace {

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
  // A tensor for the gradient of each input given (separate: the returned gradients must not share storage); the
  // tables of absent inputs and the per-(b, c) terms of dweight and dbias are scratch (a tensor costs ~0.4 µs of
  // host time, the whole backward of a tiny input ~10 µs). Each task writes only its own (b, c): no race.
  const int64_t BC = p.B * p.C;
  std::vector<float> gq(BC), gp(BC), absent(add && scale && shift ? 0 : BC);
  auto table = [&](const c10::optional<at::Tensor>& t, at::IntArrayRef shape) {
    return t.has_value() ? at::empty(shape, x.options().dtype(at::kFloat)) : at::Tensor();
  };
  auto target = [&](at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : absent.data(); };
  at::Tensor dscale = table(scale, {p.B, p.C}), dshift = table(shift, {p.B, p.C}), dadd = table(add, {p.B, p.C});
  const ChannelGrads out{gq.data(), gp.data(), target(dscale), target(dshift), target(dadd)};
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    auto run = p.nhwc ? backward_nhwc<scalar_t> : backward_nchw<scalar_t>;
    run(p, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean.const_data_ptr<float>(),
        rstd.const_data_ptr<float>(), dx.data_ptr<scalar_t>(), out, silu);
  });
  // dweight, dbias: Σ_b in a fixed order (double accumulators).
  at::Tensor dw = table(weight, {p.C}), db = table(bias, {p.C});
  float* dwp = dw.defined() ? dw.data_ptr<float>() : nullptr;
  float* dbp = db.defined() ? db.data_ptr<float>() : nullptr;
  for (int64_t c = 0; c < p.C && (dwp || dbp); ++c) {
    double sw = 0.0, sb = 0.0;
    for (int64_t b = 0; b < p.B; ++b) {
      sw += gq[b * p.C + c];
      sb += gp[b * p.C + c];
    }
    if (dwp) dwp[c] = static_cast<float>(sw);
    if (dbp) dbp[c] = static_cast<float>(sb);
  }
  if (!x.is_same(x_in)) dx = at::empty_like(x_in).copy_(dx);
  return {dx, input_grad(dw, weight, x), input_grad(db, bias, x), input_grad(dadd, add, x),
          input_grad(dscale, scale, x), input_grad(dshift, shift, x)};
}

}  // namespace
}  // namespace genfast::group_norm_cpu

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("cpp_group_norm_silu_backward", &genfast::group_norm_cpu::group_norm_silu_backward_cpu);
}
