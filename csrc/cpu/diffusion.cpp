// Diffusion ops on the CPU (genfast/reference/diffusion.py): q_sample, the DDPM and DDIM steps (per-sample affine
// maps out = a_b·x + b_b·y + c_b·ε with dx = a_b·g, dy = b_b·g) and the ε-prediction MSE mean((ε̂ − ε)²) with ε
// regenerated from the seed in its forward and backward. The coefficients are combined in float64 from the
// schedule's float64 tables at each sample's timestep, then rounded to fp32, as in the reference.
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "per_sample.h"

namespace genfast::cpu {
namespace {

// Per-sample fp32 coefficients (a, b, c) of out = a·x + b·y + c·ε.
struct Coefficients {
  std::vector<float> a, b, c;
  explicit Coefficients(int64_t batch) : a(batch), b(batch), c(batch) {}
};

// A float64 schedule table read at timesteps.
class Table {
 public:
  Table(const at::Tensor& table, const char* name, const char* op)
      : values_(table.to(at::kCPU, at::kDouble).contiguous()), name_(name), op_(op) {
    TORCH_CHECK(table.is_floating_point() && table.dim() == 1, op, ": ", name,
                " must be a 1-dim floating tensor (one entry per timestep), got ", table.scalar_type(), " of shape ",
                table.sizes());
  }
  double operator[](int64_t t) const {
    TORCH_CHECK(t >= 0 && t < values_.numel(), op_, ": timestep ", t, " is outside [0, ", values_.numel(), ") of ",
                name_);
    return values_.data_ptr<double>()[t];
  }

 private:
  at::Tensor values_;
  const char* name_;
  const char* op_;
};

// Timesteps (B,) as int64 values.
std::vector<int64_t> timesteps(const at::Tensor& t, int64_t batch, const char* name, const char* op) {
  TORCH_CHECK(!t.is_floating_point() && !t.is_complex() && t.dim() == 1 && t.numel() == batch, op, ": ", name,
              " must be an integer tensor of shape (", batch, "), got ", t.scalar_type(), " of shape ", t.sizes());
  const at::Tensor values = t.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(values.data_ptr<int64_t>(), values.data_ptr<int64_t>() + batch);
}

// (√ᾱ_t, ·, √(1−ᾱ_t)) of x_t = a·x_0 + c·ε.
Coefficients q_sample_coefficients(const at::Tensor& t_in, int64_t batch, const at::Tensor& sqrt_ac_in,
                                   const at::Tensor& sqrt_1m_ac_in, const char* op) {
  const Table sqrt_ac(sqrt_ac_in, "sqrt_alphas_cumprod", op), sqrt_1m_ac(sqrt_1m_ac_in, "sqrt_one_minus_alphas_cumprod", op);
  const std::vector<int64_t> t = timesteps(t_in, batch, "t", op);
  Coefficients k(batch);
  for (int64_t i = 0; i < batch; ++i) {
    k.a[i] = static_cast<float>(sqrt_ac[t[i]]);
    k.c[i] = static_cast<float>(sqrt_1m_ac[t[i]]);
  }
  return k;
}

// a = c2 + c1/√ᾱ_t, b = −c1·√(1−ᾱ_t)/√ᾱ_t, c = √β̃_t of the DDPM step.
Coefficients ddpm_coefficients(const at::Tensor& t_in, int64_t batch, const at::Tensor& sqrt_ac_in,
                               const at::Tensor& sqrt_1m_ac_in, const at::Tensor& coef1_in,
                               const at::Tensor& coef2_in, const at::Tensor& variance_in, const char* op) {
  const Table sqrt_ac(sqrt_ac_in, "sqrt_alphas_cumprod", op), sqrt_1m_ac(sqrt_1m_ac_in, "sqrt_one_minus_alphas_cumprod", op);
  const Table coef1(coef1_in, "posterior_mean_coef1", op), coef2(coef2_in, "posterior_mean_coef2", op);
  const Table variance(variance_in, "posterior_variance", op);
  const std::vector<int64_t> t = timesteps(t_in, batch, "t", op);
  Coefficients k(batch);
  for (int64_t i = 0; i < batch; ++i) {
    const double s = sqrt_ac[t[i]], c1 = coef1[t[i]];
    k.a[i] = static_cast<float>(coef2[t[i]] + c1 / s);
    k.b[i] = static_cast<float>(-c1 * sqrt_1m_ac[t[i]] / s);
    k.c[i] = static_cast<float>(std::sqrt(variance[t[i]]));
  }
  return k;
}

// a = √ᾱ_p/√ᾱ_t, b = √(1−ᾱ_p−σ²) − a·√(1−ᾱ_t), c = σ = η·√((1−ᾱ_p)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_p) of the DDIM step,
// ᾱ_p = ᾱ_{t_prev} (1 when t_prev < 0); σ is exactly 0 for η = 0.
Coefficients ddim_coefficients(const at::Tensor& t_in, const at::Tensor& t_prev_in, double eta, int64_t batch,
                               const at::Tensor& ac_in, const at::Tensor& sqrt_ac_in, const at::Tensor& sqrt_1m_ac_in,
                               const char* op) {
  const Table ac(ac_in, "alphas_cumprod", op), sqrt_ac(sqrt_ac_in, "sqrt_alphas_cumprod", op);
  const Table sqrt_1m_ac(sqrt_1m_ac_in, "sqrt_one_minus_alphas_cumprod", op);
  const std::vector<int64_t> t = timesteps(t_in, batch, "t", op), t_prev = timesteps(t_prev_in, batch, "t_prev", op);
  Coefficients k(batch);
  for (int64_t i = 0; i < batch; ++i) {
    const bool has_prev = t_prev[i] >= 0;
    const double ac_t = ac[t[i]];
    const double ac_prev = has_prev ? ac[t_prev[i]] : 1.0, sqrt_ac_prev = has_prev ? sqrt_ac[t_prev[i]] : 1.0;
    const double variance = (1.0 - ac_prev) / (1.0 - ac_t) * (1.0 - ac_t / ac_prev);
    const double sigma = eta > 0 ? eta * std::sqrt(variance) : 0.0;
    const double a = sqrt_ac_prev / sqrt_ac[t[i]];
    k.a[i] = static_cast<float>(a);
    k.b[i] = static_cast<float>(std::sqrt(1.0 - ac_prev - sigma * sigma) - a * sqrt_1m_ac[t[i]]);
    k.c[i] = static_cast<float>(sigma);
  }
  return k;
}

// out = a·x + b·y + c·ε in x's dtype and batch-major layout; ``y`` may be absent (q_sample); ε is ``noise`` when
// given, else the Philox stream of ``seed``, else absent.
at::Tensor affine(const at::Tensor& x_in, const char* x_name, const std::optional<at::Tensor>& y_in,
                  const std::optional<at::Tensor>& noise_in, const std::optional<at::Tensor>& seed,
                  const Coefficients& k, const char* op) {
  const at::Tensor x_t = batch_major(x_in);
  const Dims d = dims(x_t);
  const bool has_y = y_in.has_value(), has_noise = noise_in.has_value() || seed.has_value();
  const at::Tensor y_t = has_y ? in_layout_of(*y_in, "model_output", x_t, x_name, op) : x_t;
  const at::Tensor noise_t = noise_in.has_value() ? in_layout_of(*noise_in, "noise", x_t, x_name, op) : x_t;
  PhiloxKey key{};
  if (has_noise && !noise_in.has_value()) {
    check_noise_numel(d, op);
    key = read_seed(*seed, op);
  }
  at::Tensor out = at::empty_like(x_t);
  const Input x(x_t), y(y_t), noise(noise_t);
  const Output o(out);
  for_each_block(d, [&](const Block& blk) {
    BlockBuffer x_buf, y_buf, eps_buf, out_buf;
    const float* xb = x.block(blk.offset, blk.n, x_buf.data);
    const float* yb = has_y ? y.block(blk.offset, blk.n, y_buf.data) : nullptr;
    const float* eps = has_noise ? block_noise(noise_in ? &noise : nullptr, key, blk, eps_buf.data) : nullptr;
    float* ob = o.buffer(blk.offset, out_buf.data);
    const Vec a(k.a[blk.sample]), b(k.b[blk.sample]), c(k.c[blk.sample]);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      Vec acc = a * Vec::loadu(xb + i, count);
      if (has_y) acc = acc + b * Vec::loadu(yb + i, count);
      if (has_noise) acc = acc + c * Vec::loadu(eps + i, count);
      acc.store(ob + i, count);
    });
    o.commit(blk.offset, blk.n, ob);
  });
  return out;
}

// (b·g, a·g) (or a·g alone when not ``want_y``) in grad's dtype and batch-major layout.
std::tuple<at::Tensor, at::Tensor> affine_backward(const at::Tensor& grad_in, const Coefficients& k, bool want_y,
                                                   const char* op) {
  check_samples(grad_in, "grad", op);
  const at::Tensor grad_t = batch_major(grad_in);
  const Dims d = dims(grad_t);
  at::Tensor grad_x = at::empty_like(grad_t);
  at::Tensor grad_y = want_y ? at::empty_like(grad_t) : grad_t.new_empty({0});
  const Input g(grad_t);
  const Output x_out(grad_x), y_out(grad_y);
  for_each_block(d, [&](const Block& blk) {
    BlockBuffer g_buf, x_buf, y_buf;
    const float* gb = g.block(blk.offset, blk.n, g_buf.data);
    float* xb = x_out.buffer(blk.offset, x_buf.data);
    float* yb = want_y ? y_out.buffer(blk.offset, y_buf.data) : nullptr;
    const Vec a(k.a[blk.sample]), b(k.b[blk.sample]);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      const Vec gv = Vec::loadu(gb + i, count);
      (a * gv).store(xb + i, count);
      if (want_y) (b * gv).store(yb + i, count);
    });
    x_out.commit(blk.offset, blk.n, xb);
    if (want_y) y_out.commit(blk.offset, blk.n, yb);
  });
  return {grad_y, grad_x};
}

at::Tensor q_sample(const at::Tensor& x0, const at::Tensor& t, const std::optional<at::Tensor>& noise,
                    const std::optional<at::Tensor>& seed, const at::Tensor& sqrt_alphas_cumprod,
                    const at::Tensor& sqrt_one_minus_alphas_cumprod) {
  constexpr const char* op = "cpp_q_sample";
  check_samples(x0, "x0", op);
  const Coefficients k = q_sample_coefficients(t, x0.size(0), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, op);
  return affine(x0, "x0", std::nullopt, noise, seed, k, op);
}

at::Tensor q_sample_backward(const at::Tensor& grad, const at::Tensor& t, const at::Tensor& sqrt_alphas_cumprod,
                             const at::Tensor& sqrt_one_minus_alphas_cumprod) {
  constexpr const char* op = "cpp_q_sample_backward";
  check_samples(grad, "grad", op);
  const Coefficients k = q_sample_coefficients(t, grad.size(0), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, op);
  return std::get<1>(affine_backward(grad, k, false, op));
}

at::Tensor ddpm_step(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& x_t,
                     const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
                     const at::Tensor& sqrt_alphas_cumprod, const at::Tensor& sqrt_one_minus_alphas_cumprod,
                     const at::Tensor& posterior_mean_coef1, const at::Tensor& posterior_mean_coef2,
                     const at::Tensor& posterior_variance) {
  constexpr const char* op = "cpp_ddpm_step";
  check_samples(x_t, "x_t", op);
  const Coefficients k = ddpm_coefficients(t, x_t.size(0), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                                           posterior_mean_coef1, posterior_mean_coef2, posterior_variance, op);
  return affine(x_t, "x_t", model_output, noise, seed, k, op);
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_backward(
    const at::Tensor& grad, const at::Tensor& t, const at::Tensor& sqrt_alphas_cumprod,
    const at::Tensor& sqrt_one_minus_alphas_cumprod, const at::Tensor& posterior_mean_coef1,
    const at::Tensor& posterior_mean_coef2, const at::Tensor& posterior_variance) {
  constexpr const char* op = "cpp_ddpm_step_backward";
  check_samples(grad, "grad", op);
  const Coefficients k = ddpm_coefficients(t, grad.size(0), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                                           posterior_mean_coef1, posterior_mean_coef2, posterior_variance, op);
  return affine_backward(grad, k, true, op);
}

at::Tensor ddim_step(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& t_prev,
                     const at::Tensor& x_t, const std::optional<at::Tensor>& noise,
                     const std::optional<at::Tensor>& seed, double eta, const at::Tensor& alphas_cumprod,
                     const at::Tensor& sqrt_alphas_cumprod, const at::Tensor& sqrt_one_minus_alphas_cumprod) {
  constexpr const char* op = "cpp_ddim_step";
  check_samples(x_t, "x_t", op);
  const Coefficients k = ddim_coefficients(t, t_prev, eta, x_t.size(0), alphas_cumprod, sqrt_alphas_cumprod,
                                           sqrt_one_minus_alphas_cumprod, op);
  return affine(x_t, "x_t", model_output, noise, seed, k, op);
}

std::tuple<at::Tensor, at::Tensor> ddim_step_backward(
    const at::Tensor& grad, const at::Tensor& t, const at::Tensor& t_prev, double eta,
    const at::Tensor& alphas_cumprod, const at::Tensor& sqrt_alphas_cumprod,
    const at::Tensor& sqrt_one_minus_alphas_cumprod) {
  constexpr const char* op = "cpp_ddim_step_backward";
  check_samples(grad, "grad", op);
  const Coefficients k = ddim_coefficients(t, t_prev, eta, grad.size(0), alphas_cumprod, sqrt_alphas_cumprod,
                                           sqrt_one_minus_alphas_cumprod, op);
  return affine_backward(grad, k, true, op);
}

at::Tensor noise_mse(const at::Tensor& eps_hat_in, const at::Tensor& seed) {
  constexpr const char* op = "cpp_noise_mse";
  check_samples(eps_hat_in, "eps_hat", op);
  const at::Tensor eps_hat_t = batch_major(eps_hat_in);
  const Dims d = dims(eps_hat_t);
  check_noise_numel(d, op);
  const PhiloxKey key = read_seed(seed, op);
  std::vector<float> partials(d.batch * d.blocks());
  const Input eps_hat(eps_hat_t);
  for_each_block(d, [&](const Block& blk) {
    BlockBuffer hat_buf, eps_buf;
    const float* hat = eps_hat.block(blk.offset, blk.n, hat_buf.data);
    const float* eps = block_noise(nullptr, key, blk, eps_buf.data);
    Vec acc(0.0f);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      const Vec diff = Vec::loadu(hat + i, count) - Vec::loadu(eps + i, count);
      acc = acc + Vec::set(Vec(0.0f), diff * diff, count);
    });
    partials[blk.sample * d.blocks() + blk.index] = reduce_sum(acc);
  });
  double total = 0.0;
  for (const float p : partials) total += p;
  // an empty ε̂ gives 0/0 = NaN, as the reference's mean does
  return at::scalar_tensor(static_cast<float>(total / static_cast<double>(eps_hat_t.numel())),
                           eps_hat_in.options().dtype(at::kFloat));
}

at::Tensor noise_mse_backward(const at::Tensor& grad_loss, const at::Tensor& eps_hat_in, const at::Tensor& seed) {
  constexpr const char* op = "cpp_noise_mse_backward";
  check_samples(eps_hat_in, "eps_hat", op);
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.is_floating_point(), op,
              ": grad_loss must be a floating tensor of one element, got ", grad_loss.scalar_type(), " of shape ",
              grad_loss.sizes());
  const at::Tensor eps_hat_t = batch_major(eps_hat_in);
  const Dims d = dims(eps_hat_t);
  check_noise_numel(d, op);
  const PhiloxKey key = read_seed(seed, op);
  // dε̂ = (dloss·2/N)·(ε̂ − ε); an empty ε̂ has an empty gradient
  const float scale = grad_loss.item<float>() * static_cast<float>(2.0 / std::max<int64_t>(eps_hat_t.numel(), 1));
  at::Tensor grad = at::empty_like(eps_hat_t);
  const Input eps_hat(eps_hat_t);
  const Output out(grad);
  for_each_block(d, [&](const Block& blk) {
    BlockBuffer hat_buf, eps_buf, out_buf;
    const float* hat = eps_hat.block(blk.offset, blk.n, hat_buf.data);
    const float* eps = block_noise(nullptr, key, blk, eps_buf.data);
    float* ob = out.buffer(blk.offset, out_buf.data);
    const Vec s(scale);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      (s * (Vec::loadu(hat + i, count) - Vec::loadu(eps + i, count))).store(ob + i, count);
    });
    out.commit(blk.offset, blk.n, ob);
  });
  return grad;
}

}  // namespace
}  // namespace genfast::cpu

TORCH_LIBRARY_FRAGMENT(genfast, m) {
  m.def("cpp_q_sample(Tensor x0, Tensor t, Tensor? noise, Tensor? seed, Tensor sqrt_alphas_cumprod,"
        " Tensor sqrt_one_minus_alphas_cumprod) -> Tensor");
  m.def("cpp_q_sample_backward(Tensor grad, Tensor t, Tensor sqrt_alphas_cumprod,"
        " Tensor sqrt_one_minus_alphas_cumprod) -> Tensor");
  m.def("cpp_ddpm_step(Tensor model_output, Tensor t, Tensor x_t, Tensor? noise, Tensor? seed,"
        " Tensor sqrt_alphas_cumprod, Tensor sqrt_one_minus_alphas_cumprod, Tensor posterior_mean_coef1,"
        " Tensor posterior_mean_coef2, Tensor posterior_variance) -> Tensor");
  m.def("cpp_ddpm_step_backward(Tensor grad, Tensor t, Tensor sqrt_alphas_cumprod,"
        " Tensor sqrt_one_minus_alphas_cumprod, Tensor posterior_mean_coef1, Tensor posterior_mean_coef2,"
        " Tensor posterior_variance) -> (Tensor, Tensor)");
  m.def("cpp_ddim_step(Tensor model_output, Tensor t, Tensor t_prev, Tensor x_t, Tensor? noise, Tensor? seed,"
        " float eta, Tensor alphas_cumprod, Tensor sqrt_alphas_cumprod, Tensor sqrt_one_minus_alphas_cumprod)"
        " -> Tensor");
  m.def("cpp_ddim_step_backward(Tensor grad, Tensor t, Tensor t_prev, float eta, Tensor alphas_cumprod,"
        " Tensor sqrt_alphas_cumprod, Tensor sqrt_one_minus_alphas_cumprod) -> (Tensor, Tensor)");
  m.def("cpp_noise_mse(Tensor eps_hat, Tensor seed) -> Tensor");
  m.def("cpp_noise_mse_backward(Tensor grad_loss, Tensor eps_hat, Tensor seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("cpp_q_sample", &genfast::cpu::q_sample);
  m.impl("cpp_q_sample_backward", &genfast::cpu::q_sample_backward);
  m.impl("cpp_ddpm_step", &genfast::cpu::ddpm_step);
  m.impl("cpp_ddpm_step_backward", &genfast::cpu::ddpm_step_backward);
  m.impl("cpp_ddim_step", &genfast::cpu::ddim_step);
  m.impl("cpp_ddim_step_backward", &genfast::cpu::ddim_step_backward);
  m.impl("cpp_noise_mse", &genfast::cpu::noise_mse);
  m.impl("cpp_noise_mse_backward", &genfast::cpu::noise_mse_backward);
}
