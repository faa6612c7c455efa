// The DDPM and DDIM sampler steps and the dynamic threshold on the CPU (genfast/reference/diffusion.py):
// x_prev = A·x_t + B·y + C·x̂₀' + σ·z with x̂₀ = P·x_t + Q·y clipped to [−r, r], thresholded (clamp(x̂₀, −s, s)/s)
// or kept; kept, the step is the affine map (A + C·P)·x_t + (B + C·Q)·y + σ·z of diffusion.cpp. Per-sample
// coefficients are combined in float64 from the schedule's tables, then rounded to fp32 once; math in fp32.
// x̂₀ rounds its two products as the reference's separate multiplications do (no FMA), so that the threshold's
// quantile equals the reference's bitwise.
#include <ATen/ops/empty.h>
#include <ATen/ops/quantile.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "diffusion_cpu.h"

namespace genfast::cpu {
namespace {

// Per-sample float64 coefficients of a step: x̂₀ = p·x_t + q·y, out = a·x_t + b·y + c·x̂₀' + sigma·z.
struct StepCoefficients {
  double p, q, a, b, c, sigma;
};

// (P, Q, R, S) of x̂₀ = P·x_t + Q·y and ε̂ = R·x_t + S·y by prediction type.
struct PredictionCoefficients {
  double p, q, r, s;
};

PredictionCoefficients prediction_coefficients(Prediction pred, double sqrt_ac, double sqrt_1m_ac) {
  switch (pred) {
    case Prediction::kEpsilon: {
      const double p = 1.0 / sqrt_ac;
      return {p, -sqrt_1m_ac * p, 0.0, 1.0};
    }
    case Prediction::kV:
      return {sqrt_ac, -sqrt_1m_ac, sqrt_1m_ac, sqrt_ac};
    default: {
      const double r = 1.0 / sqrt_1m_ac;
      return {0.0, 1.0, r, -sqrt_ac * r};
    }
  }
}

// The schedule at a step's timesteps: ᾱ_t, √ᾱ_t, √(1−ᾱ_t), and ᾱ_p, √ᾱ_p at t_prev (1 for t_prev < 0).
struct Alphas {
  double ac, sqrt_ac, sqrt_1m_ac, ac_prev, sqrt_ac_prev;
};

// The three tables of a step (STEP_TABLES), read per sample; a timestep outside them is refused.
class StepTables {
 public:
  StepTables(const at::Tensor& ac, const at::Tensor& sqrt_ac, const at::Tensor& sqrt_1m_ac, const char* op)
      : ac_(ac, "alphas_cumprod", op),
        sqrt_ac_(sqrt_ac, "sqrt_alphas_cumprod", op),
        sqrt_1m_ac_(sqrt_1m_ac, "sqrt_one_minus_alphas_cumprod", op) {}

  Alphas at(int64_t t, int64_t t_prev) const {
    const bool has_prev = t_prev >= 0;
    return {ac_[t], sqrt_ac_[t], sqrt_1m_ac_[t], has_prev ? ac_.at(t_prev, "t_prev") : 1.0,
            has_prev ? sqrt_ac_.at(t_prev, "t_prev") : 1.0};
  }

 private:
  Table ac_, sqrt_ac_, sqrt_1m_ac_;
};

// The DDPM variance (diffusers' variance_type): the posterior's β̃ ("fixed_small") or β' ("fixed_large").
bool fixed_small(c10::string_view variance_type, const char* op) {
  if (variance_type == "fixed_small") return true;
  TORCH_CHECK(variance_type == "fixed_large", op, ": variance_type must be one of 'fixed_small', 'fixed_large', got '",
              std::string(variance_type), "'");
  return false;
}

// t_prev (B,), t − 1 when absent.
std::vector<int64_t> previous(const std::vector<int64_t>& t, const std::optional<at::Tensor>& t_prev, const char* op) {
  if (t_prev.has_value()) return timesteps(*t_prev, static_cast<int64_t>(t.size()), "t_prev", op);
  std::vector<int64_t> prev(t);
  for (int64_t& v : prev) --v;
  return prev;
}

// DDPM, β' = 1 − ᾱ_t/ᾱ_p: A = √(ᾱ_t/ᾱ_p)·(1−ᾱ_p)/(1−ᾱ_t), B = 0, C = √ᾱ_p·β'/(1−ᾱ_t), σ² = (1−ᾱ_p)/(1−ᾱ_t)·β'
// (fixed_small) or β' (fixed_large), σ = 0 at t = 0.
std::vector<StepCoefficients> ddpm_coefficients(const at::Tensor& t_in, const std::optional<at::Tensor>& t_prev_in,
                                                int64_t batch, Prediction pred, bool small, const StepTables& tables,
                                                const char* op) {
  const std::vector<int64_t> t = timesteps(t_in, batch, "t", op), t_prev = previous(t, t_prev_in, op);
  std::vector<StepCoefficients> k(batch);
  for (int64_t i = 0; i < batch; ++i) {
    const Alphas al = tables.at(t[i], t_prev[i]);
    const PredictionCoefficients x0 = prediction_coefficients(pred, al.sqrt_ac, al.sqrt_1m_ac);
    const double alpha = al.ac / al.ac_prev, beta = 1.0 - alpha;
    const double inv_one_minus = 1.0 / (al.sqrt_1m_ac * al.sqrt_1m_ac);
    const double variance = small ? (1.0 - al.ac_prev) * inv_one_minus * beta : beta;
    const double sigma = t[i] > 0 ? std::sqrt(std::max(variance, 0.0)) : 0.0;
    k[i] = {x0.p, x0.q, std::sqrt(alpha) * (1.0 - al.ac_prev) * inv_one_minus, 0.0,
            al.sqrt_ac_prev * beta * inv_one_minus, sigma};
  }
  return k;
}

// DDIM: σ = η·√((1−ᾱ_p)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_p)) (exactly 0 for η = 0), d = √(1−ᾱ_p−σ²); A = d·R, B = d·S,
// C = √ᾱ_p, or with use_clipped_model_output A = d/√(1−ᾱ_t), B = 0, C = √ᾱ_p − A·√ᾱ_t.
std::vector<StepCoefficients> ddim_coefficients(const at::Tensor& t_in, const at::Tensor& t_prev_in, int64_t batch,
                                                double eta, Prediction pred, bool use_clipped,
                                                const StepTables& tables, const char* op) {
  const std::vector<int64_t> t = timesteps(t_in, batch, "t", op), t_prev = timesteps(t_prev_in, batch, "t_prev", op);
  std::vector<StepCoefficients> k(batch);
  for (int64_t i = 0; i < batch; ++i) {
    const Alphas al = tables.at(t[i], t_prev[i]);
    const PredictionCoefficients x0 = prediction_coefficients(pred, al.sqrt_ac, al.sqrt_1m_ac);
    const double variance = (1.0 - al.ac_prev) / (1.0 - al.ac) * (1.0 - al.ac / al.ac_prev);
    const double sigma = eta > 0 ? eta * std::sqrt(variance) : 0.0;
    const double d = std::sqrt(1.0 - al.ac_prev - sigma * sigma);
    if (use_clipped) {
      const double d_over = d / al.sqrt_1m_ac;
      k[i] = {x0.p, x0.q, d_over, 0.0, al.sqrt_ac_prev - d_over * al.sqrt_ac, sigma};
    } else {
      k[i] = {x0.p, x0.q, d * x0.r, d * x0.s, al.sqrt_ac_prev, sigma};
    }
  }
  return k;
}

// The unclipped step's affine map: a = A + C·P, b = B + C·Q, c = σ (combined in float64).
Coefficients affine_coefficients(const std::vector<StepCoefficients>& k) {
  Coefficients out(static_cast<int64_t>(k.size()));
  for (size_t i = 0; i < k.size(); ++i) {
    out.a[i] = static_cast<float>(k[i].a + k[i].c * k[i].p);
    out.b[i] = static_cast<float>(k[i].b + k[i].c * k[i].q);
    out.c[i] = static_cast<float>(k[i].sigma);
  }
  return out;
}

// Per-sample fp32 coefficients of a clipped or thresholded step: x̂₀' = clamp(x̂₀, −bound, bound)·inv with
// (bound, inv) = (r, 1) clipping or (s, 1/s) thresholding.
struct Clipped {
  std::vector<float> p, q, a, b, c, sigma, bound, inv;
};

Clipped clipped_coefficients(const std::vector<StepCoefficients>& k, const std::optional<double>& clip,
                             const std::optional<at::Tensor>& threshold, const char* op) {
  const int64_t batch = static_cast<int64_t>(k.size());
  Clipped out;
  for (const StepCoefficients& ki : k) {
    out.p.push_back(static_cast<float>(ki.p));
    out.q.push_back(static_cast<float>(ki.q));
    out.a.push_back(static_cast<float>(ki.a));
    out.b.push_back(static_cast<float>(ki.b));
    out.c.push_back(static_cast<float>(ki.c));
    out.sigma.push_back(static_cast<float>(ki.sigma));
  }
  if (threshold.has_value()) {  // thresholding wins over clipping, as in the reference
    out.bound = per_sample_values(*threshold, batch, "threshold", op);
    for (const float s : out.bound) out.inv.push_back(1.0f / s);
  } else {
    out.bound.assign(batch, static_cast<float>(*clip));
    out.inv.assign(batch, 1.0f);
  }
  return out;
}

// ``v`` as it is, hidden from the compiler's contraction of a product and a sum into one FMA (GCC's default
// -ffp-contract=fast): x̂₀ rounds P·x and Q·y, as the reference's separate multiplications do.
inline Vec rounded(Vec v) {
#if defined(__GNUC__) && defined(CPU_CAPABILITY_AVX2)
  __m256 raw = v;
  __asm__("" : "+x"(raw));
  return Vec(raw);
#elif defined(__GNUC__)
  __asm__("" : "+m"(v));
  return v;
#else
  return v;
#endif
}

// x̂₀ = P·x + Q·y.
inline Vec x0_hat(const Vec& p, const Vec& x, const Vec& q, const Vec& y) { return rounded(p * x) + rounded(q * y); }

// The step with x̂₀ clipped or thresholded, in x's dtype and batch-major layout.
at::Tensor clipped_step(const at::Tensor& y_in, const at::Tensor& x_in, const std::optional<at::Tensor>& noise_in,
                        const std::optional<at::Tensor>& seed, const Clipped& k, const char* op) {
  const at::Tensor x_t = batch_major(x_in);
  const at::Tensor y_t = in_layout_of(y_in, "model_output", x_t, "x_t", op);
  const Noise noise(noise_in, seed, x_t, "x_t", op);
  const bool has_noise = noise.present();
  at::Tensor out = at::empty_like(x_t);
  const Input x(x_t), y(y_t);
  const Output o(out);
  for_each_block(dims(x_t), [&](const Block& blk) {
    BlockBuffer x_buf, y_buf, eps_buf, out_buf;
    const float* xb = x.block(blk.offset, blk.n, x_buf.data);
    const float* yb = y.block(blk.offset, blk.n, y_buf.data);
    const float* eps = noise.block(blk, eps_buf.data);
    float* ob = o.buffer(blk.offset, out_buf.data);
    const int64_t s = blk.sample;
    const Vec p(k.p[s]), q(k.q[s]), a(k.a[s]), b(k.b[s]), c(k.c[s]), sigma(k.sigma[s]);
    const Vec bound(k.bound[s]), neg_bound(-k.bound[s]), inv(k.inv[s]);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      const Vec xv = Vec::loadu(xb + i, count), yv = Vec::loadu(yb + i, count);
      const Vec x0 = at::vec::minimum(at::vec::maximum(x0_hat(p, xv, q, yv), neg_bound), bound) * inv;
      Vec acc = a * xv + b * yv + c * x0;
      if (has_noise) acc = acc + sigma * Vec::loadu(eps + i, count);
      acc.store(ob + i, count);
    });
    o.commit(blk.offset, blk.n, ob);
  });
  return out;
}

// (dy, dx_t) = ((B + C·m·Q·inv)·g, (A + C·m·P·inv)·g), m = 1 where −bound ≤ x̂₀ ≤ bound, in grad's dtype and
// batch-major layout.
std::tuple<at::Tensor, at::Tensor> clipped_step_backward(const at::Tensor& grad_in,
                                                         const std::optional<at::Tensor>& y_in,
                                                         const std::optional<at::Tensor>& x_in, const Clipped& k,
                                                         const char* op) {
  TORCH_CHECK(y_in.has_value() && x_in.has_value(), op,
              ": model_output and x_t must be given when x̂₀ is clipped or thresholded");
  const at::Tensor grad_t = batch_major(grad_in);
  const at::Tensor x_t = in_layout_of(*x_in, "x_t", grad_t, "grad", op);
  const at::Tensor y_t = in_layout_of(*y_in, "model_output", grad_t, "grad", op);
  at::Tensor grad_x = at::empty_like(grad_t), grad_y = at::empty_like(grad_t);
  const Input g(grad_t), x(x_t), y(y_t);
  const Output x_out(grad_x), y_out(grad_y);
  for_each_block(dims(grad_t), [&](const Block& blk) {
    BlockBuffer g_buf, x_buf, y_buf, gx_buf, gy_buf;
    const float* gb = g.block(blk.offset, blk.n, g_buf.data);
    const float* xb = x.block(blk.offset, blk.n, x_buf.data);
    const float* yb = y.block(blk.offset, blk.n, y_buf.data);
    float* gxb = x_out.buffer(blk.offset, gx_buf.data);
    float* gyb = y_out.buffer(blk.offset, gy_buf.data);
    const int64_t s = blk.sample;
    const Vec p(k.p[s]), q(k.q[s]), a(k.a[s]), b(k.b[s]), c(k.c[s]);
    const Vec bound(k.bound[s]), neg_bound(-k.bound[s]), inv(k.inv[s]);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      const Vec gv = Vec::loadu(gb + i, count);
      const Vec x0 = x0_hat(p, Vec::loadu(xb + i, count), q, Vec::loadu(yb + i, count));
      const Vec passed = (x0.ge(neg_bound) & x0.le(bound)) * inv * c * gv;
      (a * gv + p * passed).store(gxb + i, count);
      (b * gv + q * passed).store(gyb + i, count);
    });
    x_out.commit(blk.offset, blk.n, gxb);
    y_out.commit(blk.offset, blk.n, gyb);
  });
  return {grad_y, grad_x};
}

// The step's output: the affine map, or the clipped step when ``clip`` or ``threshold`` is given.
at::Tensor step(const at::Tensor& y, const at::Tensor& x_t, const std::optional<at::Tensor>& noise,
                const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& threshold,
                const std::optional<double>& clip, const std::vector<StepCoefficients>& k, const char* op) {
  if (!clip.has_value() && !threshold.has_value()) {
    return affine(x_t, "x_t", y, noise, seed, affine_coefficients(k), op);
  }
  return clipped_step(y, x_t, noise, seed, clipped_coefficients(k, clip, threshold, op), op);
}

// (dy, dx_t) of ``step``.
std::tuple<at::Tensor, at::Tensor> step_backward(const at::Tensor& grad, const std::optional<at::Tensor>& y,
                                                 const std::optional<at::Tensor>& x_t,
                                                 const std::optional<at::Tensor>& threshold,
                                                 const std::optional<double>& clip,
                                                 const std::vector<StepCoefficients>& k, const char* op) {
  if (!clip.has_value() && !threshold.has_value()) return affine_backward(grad, affine_coefficients(k), true, op);
  return clipped_step_backward(grad, y, x_t, clipped_coefficients(k, clip, threshold, op), op);
}

at::Tensor ddpm_step(const at::Tensor& model_output, const at::Tensor& t, const std::optional<at::Tensor>& t_prev,
                     const at::Tensor& x_t, const std::optional<at::Tensor>& noise,
                     const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& threshold,
                     const at::Tensor& alphas_cumprod, const at::Tensor& sqrt_alphas_cumprod,
                     const at::Tensor& sqrt_one_minus_alphas_cumprod, c10::string_view prediction_type,
                     c10::string_view variance_type, std::optional<double> clip) {
  constexpr const char* op = "cpp_ddpm_step";
  check_samples(x_t, "x_t", op);
  const StepTables tables(alphas_cumprod, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, op);
  const auto k = ddpm_coefficients(t, t_prev, x_t.size(0), prediction(prediction_type, op),
                                   fixed_small(variance_type, op), tables, op);
  return step(model_output, x_t, noise, seed, threshold, clip, k, op);
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& model_output, const std::optional<at::Tensor>& x_t,
    const std::optional<at::Tensor>& threshold, const at::Tensor& t, const std::optional<at::Tensor>& t_prev,
    const at::Tensor& alphas_cumprod, const at::Tensor& sqrt_alphas_cumprod,
    const at::Tensor& sqrt_one_minus_alphas_cumprod, c10::string_view prediction_type,
    c10::string_view variance_type, std::optional<double> clip) {
  constexpr const char* op = "cpp_ddpm_step_backward";
  check_samples(grad, "grad", op);
  const StepTables tables(alphas_cumprod, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, op);
  const auto k = ddpm_coefficients(t, t_prev, grad.size(0), prediction(prediction_type, op),
                                   fixed_small(variance_type, op), tables, op);
  return step_backward(grad, model_output, x_t, threshold, clip, k, op);
}

at::Tensor ddim_step(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& t_prev,
                     const at::Tensor& x_t, const std::optional<at::Tensor>& noise,
                     const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& threshold,
                     const at::Tensor& alphas_cumprod, const at::Tensor& sqrt_alphas_cumprod,
                     const at::Tensor& sqrt_one_minus_alphas_cumprod, double eta, c10::string_view prediction_type,
                     bool use_clipped_model_output, std::optional<double> clip) {
  constexpr const char* op = "cpp_ddim_step";
  check_samples(x_t, "x_t", op);
  const StepTables tables(alphas_cumprod, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, op);
  const auto k = ddim_coefficients(t, t_prev, x_t.size(0), eta, prediction(prediction_type, op),
                                   use_clipped_model_output, tables, op);
  return step(model_output, x_t, noise, seed, threshold, clip, k, op);
}

std::tuple<at::Tensor, at::Tensor> ddim_step_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& model_output, const std::optional<at::Tensor>& x_t,
    const std::optional<at::Tensor>& threshold, const at::Tensor& t, const at::Tensor& t_prev,
    const at::Tensor& alphas_cumprod, const at::Tensor& sqrt_alphas_cumprod,
    const at::Tensor& sqrt_one_minus_alphas_cumprod, double eta, c10::string_view prediction_type,
    bool use_clipped_model_output, std::optional<double> clip) {
  constexpr const char* op = "cpp_ddim_step_backward";
  check_samples(grad, "grad", op);
  const StepTables tables(alphas_cumprod, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, op);
  const auto k = ddim_coefficients(t, t_prev, grad.size(0), eta, prediction(prediction_type, op),
                                   use_clipped_model_output, tables, op);
  return step_backward(grad, model_output, x_t, threshold, clip, k, op);
}

// ---- the dynamic threshold: s_b = min(max(quantile(|x̂₀_b|, ratio), 1), max_value) ----------------------------

// Where the ratio quantile of n values lies, as genfast._shared.quantile_position computes it for fp32 (the rank in
// double or in float, as the installed torch forms it): the order statistics lo ≤ hi (0-based, ascending) and the
// weight of torch.lerp between them.
struct QuantilePosition {
  int64_t lo, hi;
  float weight;
};

// Whether the installed torch.quantile forms a float input's ranks in double (torch 2.14; pytorch#187574) rather
// than in float (torch 2.11): asked of torch itself, once, by the quantile whose two answers differ (the values
// 0, …, 0, 1: the quantile is the weight); genfast._shared.TORCH_RANKS_IN_FLOAT64 asks the same.
bool torch_ranks_in_double() {
  static const bool in_double = [] {
    constexpr int64_t n = 70;
    constexpr double ratio = 0.995;
    at::Tensor values = at::zeros({n}, at::kFloat);
    values.data_ptr<float>()[n - 1] = 1.0f;
    const double rank = static_cast<double>(static_cast<float>(ratio)) * static_cast<double>(n - 1);
    const float weight = static_cast<float>(rank - std::floor(rank));
    return at::quantile(values, ratio).item<float>() == weight;
  }();
  return in_double;
}

QuantilePosition quantile_position(int64_t n, double ratio) {
  double rank = static_cast<double>(static_cast<float>(ratio)) * static_cast<double>(n - 1);
  if (!torch_ranks_in_double()) rank = static_cast<double>(static_cast<float>(rank));
  const int64_t lo = std::min(static_cast<int64_t>(rank), n - 1);
  const int64_t hi = std::min(lo + (rank > static_cast<double>(lo) ? 1 : 0), n - 1);
  return {lo, hi, static_cast<float>(rank - static_cast<double>(lo))};
}

// a < b with NaN above every number (torch.kthvalue's order).
inline bool nan_last(float a, float b) { return a < b || (std::isnan(b) && !std::isnan(a)); }

// The quantile of the n values at ``v`` (reordered): torch.lerp of the two order statistics, whose CPU kernel
// computes v_lo + w·(v_hi − v_lo) (w < ½) or v_hi + (w − 1)·(v_hi − v_lo) with one FMA.
float quantile(float* v, int64_t n, const QuantilePosition& pos) {
  std::nth_element(v, v + pos.lo, v + n, nan_last);
  const float below = v[pos.lo];
  const float above = pos.hi == pos.lo ? below : *std::min_element(v + pos.lo + 1, v + n, nan_last);
  const float w = pos.weight;
  return w < 0.5f ? std::fma(w, above - below, below) : std::fma(w - 1.0f, above - below, above);
}

at::Tensor dynamic_threshold(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& x_t_in,
                             const at::Tensor& sqrt_alphas_cumprod, const at::Tensor& sqrt_one_minus_alphas_cumprod,
                             c10::string_view prediction_type, double ratio, double max_value) {
  constexpr const char* op = "cpp_dynamic_threshold";
  check_samples(x_t_in, "x_t", op);
  const Prediction pred = prediction(prediction_type, op);
  const at::Tensor x_t = batch_major(x_t_in);
  const at::Tensor y_t = in_layout_of(model_output, "model_output", x_t, "x_t", op);
  const Dims d = dims(x_t);
  const Table sqrt_ac(sqrt_alphas_cumprod, "sqrt_alphas_cumprod", op);
  const Table sqrt_1m_ac(sqrt_one_minus_alphas_cumprod, "sqrt_one_minus_alphas_cumprod", op);
  const std::vector<int64_t> steps = timesteps(t, d.batch, "t", op);
  std::vector<float> p(d.batch), q(d.batch);
  for (int64_t i = 0; i < d.batch; ++i) {
    const PredictionCoefficients k = prediction_coefficients(pred, sqrt_ac[steps[i]], sqrt_1m_ac[steps[i]]);
    p[i] = static_cast<float>(k.p);
    q[i] = static_cast<float>(k.q);
  }
  at::Tensor out = at::empty({d.batch}, x_t.options().dtype(at::kFloat));
  float* s = out.data_ptr<float>();
  if (d.sample_numel == 0) {
    std::fill(s, s + d.batch, 1.0f);
    return out;
  }
  std::vector<float> values(static_cast<size_t>(d.batch * d.sample_numel));  // |x̂₀|, sample b at [b·D, (b+1)·D)
  const Input x(x_t), y(y_t);
  for_each_block(d, [&](const Block& blk) {
    BlockBuffer x_buf, y_buf;
    const float* xb = x.block(blk.offset, blk.n, x_buf.data);
    const float* yb = y.block(blk.offset, blk.n, y_buf.data);
    const Vec pv(p[blk.sample]), qv(q[blk.sample]);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      x0_hat(pv, Vec::loadu(xb + i, count), qv, Vec::loadu(yb + i, count)).abs().store(values.data() + blk.offset + i,
                                                                                       count);
    });
  });
  const QuantilePosition pos = quantile_position(d.sample_numel, ratio);
  const float upper = static_cast<float>(max_value);
  at::parallel_for(0, d.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float v = quantile(values.data() + b * d.sample_numel, d.sample_numel, pos);
      s[b] = std::isnan(v) ? v : std::min(std::max(v, 1.0f), upper);  // min first, then max, as torch.clamp
    }
  });
  return out;
}

}  // namespace
}  // namespace genfast::cpu

TORCH_LIBRARY_FRAGMENT(genfast, m) {
  m.def("cpp_ddpm_step(Tensor model_output, Tensor t, Tensor? t_prev, Tensor x_t, Tensor? noise, Tensor? seed,"
        " Tensor? threshold, Tensor alphas_cumprod, Tensor sqrt_alphas_cumprod,"
        " Tensor sqrt_one_minus_alphas_cumprod, str prediction_type, str variance_type, float? clip) -> Tensor");
  m.def("cpp_ddpm_step_backward(Tensor grad, Tensor? model_output, Tensor? x_t, Tensor? threshold, Tensor t,"
        " Tensor? t_prev, Tensor alphas_cumprod, Tensor sqrt_alphas_cumprod, Tensor sqrt_one_minus_alphas_cumprod,"
        " str prediction_type, str variance_type, float? clip) -> (Tensor, Tensor)");
  m.def("cpp_ddim_step(Tensor model_output, Tensor t, Tensor t_prev, Tensor x_t, Tensor? noise, Tensor? seed,"
        " Tensor? threshold, Tensor alphas_cumprod, Tensor sqrt_alphas_cumprod,"
        " Tensor sqrt_one_minus_alphas_cumprod, float eta, str prediction_type, bool use_clipped_model_output,"
        " float? clip) -> Tensor");
  m.def("cpp_ddim_step_backward(Tensor grad, Tensor? model_output, Tensor? x_t, Tensor? threshold, Tensor t,"
        " Tensor t_prev, Tensor alphas_cumprod, Tensor sqrt_alphas_cumprod, Tensor sqrt_one_minus_alphas_cumprod,"
        " float eta, str prediction_type, bool use_clipped_model_output, float? clip) -> (Tensor, Tensor)");
  m.def("cpp_dynamic_threshold(Tensor model_output, Tensor t, Tensor x_t, Tensor sqrt_alphas_cumprod,"
        " Tensor sqrt_one_minus_alphas_cumprod, str prediction_type, float ratio, float max_value) -> Tensor");
}

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("cpp_ddpm_step", &genfast::cpu::ddpm_step);
  m.impl("cpp_ddpm_step_backward", &genfast::cpu::ddpm_step_backward);
  m.impl("cpp_ddim_step", &genfast::cpu::ddim_step);
  m.impl("cpp_ddim_step_backward", &genfast::cpu::ddim_step_backward);
  m.impl("cpp_dynamic_threshold", &genfast::cpu::dynamic_threshold);
}
