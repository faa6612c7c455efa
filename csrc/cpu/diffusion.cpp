// Diffusion ops on the CPU (genfast/reference/diffusion.py): q_sample, the per-sample affine map the ops share
// (out = a_b·x + b_b·y + c_b·ε with dx = a_b·g, dy = b_b·g) and the training loss mean((y − target)²), target =
// u·ε + w·x₀ by prediction type, with ε regenerated from the seed in its forward and backward. The sampler steps
// and the dynamic threshold are in diffusion_steps.cpp. Coefficients are combined in float64 from the schedule's
// float64 tables at each sample's timestep, then rounded to fp32, as in the reference.
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "diffusion_cpu.h"

namespace genfast::cpu {

at::Tensor affine(const at::Tensor& x_in, const char* x_name, const std::optional<at::Tensor>& y_in,
                  const std::optional<at::Tensor>& noise_in, const std::optional<at::Tensor>& seed,
                  const Coefficients& k, const char* op) {
  const at::Tensor x_t = batch_major(x_in);
  const Dims d = dims(x_t);
  const bool has_y = y_in.has_value();
  const at::Tensor y_t = has_y ? in_layout_of(*y_in, "model_output", x_t, x_name, op) : x_t;
  const Noise noise(noise_in, seed, x_t, x_name, op);
  const bool has_noise = noise.present();
  at::Tensor out = at::empty_like(x_t);
  const Input x(x_t), y(y_t);
  const Output o(out);
  for_each_block(d, [&](const Block& blk) {
    BlockBuffer x_buf, y_buf, eps_buf, out_buf;
    const float* xb = x.block(blk.offset, blk.n, x_buf.data);
    const float* yb = has_y ? y.block(blk.offset, blk.n, y_buf.data) : nullptr;
    const float* eps = noise.block(blk, eps_buf.data);
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

namespace {

// (√ᾱ_t, ·, √(1−ᾱ_t)) of x_t = a·x_0 + c·ε.
Coefficients q_sample_coefficients(const at::Tensor& t_in, int64_t batch, const at::Tensor& sqrt_ac_in,
                                   const at::Tensor& sqrt_1m_ac_in, const char* op) {
  const Table sqrt_ac(sqrt_ac_in, "sqrt_alphas_cumprod", op);
  const Table sqrt_1m_ac(sqrt_1m_ac_in, "sqrt_one_minus_alphas_cumprod", op);
  const std::vector<int64_t> t = timesteps(t_in, batch, "t", op);
  Coefficients k(batch);
  for (int64_t i = 0; i < batch; ++i) {
    k.a[i] = static_cast<float>(sqrt_ac[t[i]]);
    k.c[i] = static_cast<float>(sqrt_1m_ac[t[i]]);
  }
  return k;
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

// The loss's y − target, target = u·ε + w·x₀ with (u, w) = (1, 0) for "epsilon", (√ᾱ_t, −√(1−ᾱ_t)) for
// "v_prediction", (0, 1) for "sample": ε (the Philox stream of the seed) is read unless the prediction type is
// "sample", x₀ unless it is "epsilon". All operands in y's batch-major layout.
class TargetError {
 public:
  TargetError(const at::Tensor& y_in, const at::Tensor& seed, const std::optional<at::Tensor>& x0_in,
              const at::Tensor& t_in, const at::Tensor& sqrt_ac_in, const at::Tensor& sqrt_1m_ac_in,
              c10::string_view prediction_type, const char* op)
      : y_t_(batch_major(y_in)), d_(dims(y_t_)), u_(d_.batch), w_(d_.batch) {
    const Prediction pred = prediction(prediction_type, op);
    has_noise_ = pred != Prediction::kSample;
    has_x0_ = pred != Prediction::kEpsilon;
    TORCH_CHECK(!has_x0_ || x0_in.has_value(), op, ": x0 must be given for prediction_type '",
                std::string(prediction_type), "' (its target reads x₀)");
    x0_t_ = has_x0_ ? in_layout_of(*x0_in, "x0", y_t_, "model_output", op) : y_t_;
    if (has_noise_) {
      check_noise_numel(d_, op);
      key_ = read_seed(seed, op);
    }
    const Table sqrt_ac(sqrt_ac_in, "sqrt_alphas_cumprod", op);
    const Table sqrt_1m_ac(sqrt_1m_ac_in, "sqrt_one_minus_alphas_cumprod", op);
    const std::vector<int64_t> t = timesteps(t_in, d_.batch, "t", op);
    for (int64_t i = 0; i < d_.batch; ++i) {
      const double a = sqrt_ac[t[i]], c = sqrt_1m_ac[t[i]];
      u_[i] = pred == Prediction::kEpsilon ? 1.0f : pred == Prediction::kV ? static_cast<float>(a) : 0.0f;
      w_[i] = pred == Prediction::kEpsilon ? 0.0f : pred == Prediction::kV ? static_cast<float>(-c) : 1.0f;
    }
  }

  const at::Tensor& y() const { return y_t_; }
  const Dims& sample_dims() const { return d_; }

  // fp32 y − target of a block, into ``out``.
  void block(const Block& blk, float* out) const {
    BlockBuffer y_buf, eps_buf, x0_buf;
    const Input y(y_t_), x0(x0_t_);
    const float* yb = y.block(blk.offset, blk.n, y_buf.data);
    const float* eps = has_noise_ ? block_noise(nullptr, key_, blk, eps_buf.data) : nullptr;
    const float* xb = has_x0_ ? x0.block(blk.offset, blk.n, x0_buf.data) : nullptr;
    const Vec u(u_[blk.sample]), w(w_[blk.sample]);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      Vec diff = Vec::loadu(yb + i, count);
      if (has_noise_) diff = diff - u * Vec::loadu(eps + i, count);
      if (has_x0_) diff = diff - w * Vec::loadu(xb + i, count);
      diff.store(out + i, count);
    });
  }

 private:
  at::Tensor y_t_, x0_t_;
  Dims d_;
  std::vector<float> u_, w_;
  bool has_noise_ = false, has_x0_ = false;
  PhiloxKey key_{};
};

at::Tensor target_mse(const at::Tensor& model_output, const at::Tensor& seed, const std::optional<at::Tensor>& x0,
                      const at::Tensor& t, const at::Tensor& sqrt_alphas_cumprod,
                      const at::Tensor& sqrt_one_minus_alphas_cumprod, c10::string_view prediction_type) {
  constexpr const char* op = "cpp_target_mse";
  check_samples(model_output, "model_output", op);
  const TargetError error(model_output, seed, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                          prediction_type, op);
  const Dims& d = error.sample_dims();
  std::vector<float> partials(d.batch * d.blocks());
  for_each_block(d, [&](const Block& blk) {
    BlockBuffer diff_buf;
    error.block(blk, diff_buf.data);
    Vec acc(0.0f);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      const Vec diff = Vec::loadu(diff_buf.data + i, count);
      acc = acc + Vec::set(Vec(0.0f), diff * diff, count);
    });
    partials[blk.sample * d.blocks() + blk.index] = reduce_sum(acc);
  });
  double total = 0.0;
  for (const float p : partials) total += p;
  // an empty y gives 0/0 = NaN, as the reference's mean does
  return at::scalar_tensor(static_cast<float>(total / static_cast<double>(error.y().numel())),
                           model_output.options().dtype(at::kFloat));
}

at::Tensor target_mse_backward(const at::Tensor& grad_loss, const at::Tensor& model_output, const at::Tensor& seed,
                               const std::optional<at::Tensor>& x0, const at::Tensor& t,
                               const at::Tensor& sqrt_alphas_cumprod, const at::Tensor& sqrt_one_minus_alphas_cumprod,
                               c10::string_view prediction_type) {
  constexpr const char* op = "cpp_target_mse_backward";
  check_samples(model_output, "model_output", op);
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.is_floating_point(), op,
              ": grad_loss must be a floating tensor of one element, got ", grad_loss.scalar_type(), " of shape ",
              grad_loss.sizes());
  const TargetError error(model_output, seed, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                          prediction_type, op);
  // dy = (dloss·2/N)·(y − target); an empty y has an empty gradient
  const float scale = grad_loss.item<float>() * static_cast<float>(2.0 / std::max<int64_t>(error.y().numel(), 1));
  at::Tensor grad = at::empty_like(error.y());
  const Output out(grad);
  for_each_block(error.sample_dims(), [&](const Block& blk) {
    BlockBuffer diff_buf, out_buf;
    error.block(blk, diff_buf.data);
    float* ob = out.buffer(blk.offset, out_buf.data);
    const Vec s(scale);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      (s * Vec::loadu(diff_buf.data + i, count)).store(ob + i, count);
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
  m.def("cpp_target_mse(Tensor model_output, Tensor seed, Tensor? x0, Tensor t, Tensor sqrt_alphas_cumprod,"
        " Tensor sqrt_one_minus_alphas_cumprod, str prediction_type) -> Tensor");
  m.def("cpp_target_mse_backward(Tensor grad_loss, Tensor model_output, Tensor seed, Tensor? x0, Tensor t,"
        " Tensor sqrt_alphas_cumprod, Tensor sqrt_one_minus_alphas_cumprod, str prediction_type) -> Tensor");
}

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("cpp_q_sample", &genfast::cpu::q_sample);
  m.impl("cpp_q_sample_backward", &genfast::cpu::q_sample_backward);
  m.impl("cpp_target_mse", &genfast::cpu::target_mse);
  m.impl("cpp_target_mse_backward", &genfast::cpu::target_mse_backward);
}
