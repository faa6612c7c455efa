// WGAN-GP ops on the CPU (genfast/reference/gradient_penalty.py): the interpolation x̂ = fake + α_b·(real − fake)
// with (d real, d fake) = (α_b·g, (1 − α_b)·g), and the penalty p = weight·mean_b(‖g_b‖₂ − 1)² with
// dg_b = dp·weight·(2/B)·(‖g_b‖ − 1)·g_b/‖g_b‖ (0 where ‖g_b‖ = 0). Norms and penalty in fp32.
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "per_sample.h"

namespace genfast::cpu {
namespace {

// weight / B, the factor of Σ_b(‖g_b‖ − 1)² (an empty batch divides by 1: its penalty is 0).
float penalty_scale(double weight, int64_t batch) {
  return static_cast<float>(weight / static_cast<double>(std::max<int64_t>(batch, 1)));
}

at::Tensor interpolate(const at::Tensor& real_in, const at::Tensor& fake_in, const at::Tensor& alpha_in) {
  constexpr const char* op = "cpp_interpolate";
  check_samples(real_in, "real", op);
  const at::Tensor real_t = batch_major(real_in);
  const at::Tensor fake_t = in_layout_of(fake_in, "fake", real_t, "real", op);
  const Dims d = dims(real_t);
  const std::vector<float> alpha = per_sample_values(alpha_in, d.batch, "alpha", op);
  at::Tensor out = at::empty_like(real_t);
  const Input real(real_t), fake(fake_t);
  const Output o(out);
  for_each_block(d, [&](const Block& blk) {
    BlockBuffer real_buf, fake_buf, out_buf;
    const float* r = real.block(blk.offset, blk.n, real_buf.data);
    const float* f = fake.block(blk.offset, blk.n, fake_buf.data);
    float* ob = o.buffer(blk.offset, out_buf.data);
    const Vec a(alpha[blk.sample]);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      const Vec fv = Vec::loadu(f + i, count);
      (fv + a * (Vec::loadu(r + i, count) - fv)).store(ob + i, count);
    });
    o.commit(blk.offset, blk.n, ob);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> interpolate_backward(const at::Tensor& grad_in, const at::Tensor& alpha_in,
                                                        bool want_real, bool want_fake) {
  constexpr const char* op = "cpp_interpolate_backward";
  check_samples(grad_in, "grad", op);
  const at::Tensor grad_t = batch_major(grad_in);
  const Dims d = dims(grad_t);
  const std::vector<float> alpha = per_sample_values(alpha_in, d.batch, "alpha", op);
  at::Tensor grad_real = want_real ? at::empty_like(grad_t) : grad_t.new_empty({0});
  at::Tensor grad_fake = want_fake ? at::empty_like(grad_t) : grad_t.new_empty({0});
  if (!want_real && !want_fake) return {grad_real, grad_fake};
  const Input g(grad_t);
  const Output real_out(grad_real), fake_out(grad_fake);
  const Vec one(1.0f);
  for_each_block(d, [&](const Block& blk) {
    BlockBuffer g_buf, real_buf, fake_buf;
    const float* gb = g.block(blk.offset, blk.n, g_buf.data);
    float* rb = want_real ? real_out.buffer(blk.offset, real_buf.data) : nullptr;
    float* fb = want_fake ? fake_out.buffer(blk.offset, fake_buf.data) : nullptr;
    const Vec a(alpha[blk.sample]);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      const Vec gv = Vec::loadu(gb + i, count);
      if (want_real) (a * gv).store(rb + i, count);
      if (want_fake) ((one - a) * gv).store(fb + i, count);
    });
    if (want_real) real_out.commit(blk.offset, blk.n, rb);
    if (want_fake) fake_out.commit(blk.offset, blk.n, fb);
  });
  return {grad_real, grad_fake};
}

std::tuple<at::Tensor, at::Tensor> gradient_norm_penalty(const at::Tensor& grad_in, double weight) {
  constexpr const char* op = "cpp_gradient_norm_penalty";
  check_samples(grad_in, "grad", op);
  const at::Tensor grad_t = batch_major(grad_in);
  const Dims d = dims(grad_t);
  std::vector<float> partials(d.batch * d.blocks());
  const Input g(grad_t);
  for_each_block(d, [&](const Block& blk) {
    BlockBuffer g_buf;
    const float* gb = g.block(blk.offset, blk.n, g_buf.data);
    Vec acc(0.0f);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      const Vec gv = Vec::loadu(gb + i, count);
      acc = acc + Vec::set(Vec(0.0f), gv * gv, count);
    });
    partials[blk.sample * d.blocks() + blk.index] = reduce_sum(acc);
  });
  const std::vector<float> sums = sum_blocks(partials, d);
  at::Tensor norms = grad_in.new_empty({d.batch}, at::kFloat);
  float total = 0.0f;
  for (int64_t b = 0; b < d.batch; ++b) {
    const float norm = std::sqrt(sums[b]);
    norms.data_ptr<float>()[b] = norm;
    total += (norm - 1.0f) * (norm - 1.0f);
  }
  return {at::scalar_tensor(total * penalty_scale(weight, d.batch), norms.options()), norms};
}

at::Tensor gradient_norm_penalty_backward(const at::Tensor& grad_penalty, const at::Tensor& grad_in,
                                          const at::Tensor& norms_in, double weight) {
  constexpr const char* op = "cpp_gradient_norm_penalty_backward";
  check_samples(grad_in, "grad", op);
  TORCH_CHECK(grad_penalty.numel() == 1 && grad_penalty.is_floating_point(), op,
              ": grad_penalty must be a floating tensor of one element, got ", grad_penalty.scalar_type(),
              " of shape ", grad_penalty.sizes());
  const at::Tensor grad_t = batch_major(grad_in);
  const Dims d = dims(grad_t);
  const std::vector<float> norms = per_sample_values(norms_in, d.batch, "norms", op);
  const float dp_scale2 = grad_penalty.item<float>() * (2.0f * penalty_scale(weight, d.batch));
  std::vector<float> coef(d.batch);
  for (int64_t b = 0; b < d.batch; ++b) {
    coef[b] = dp_scale2 * (norms[b] - 1.0f) * (norms[b] == 0.0f ? 0.0f : 1.0f / norms[b]);
  }
  at::Tensor out = at::empty_like(grad_t);
  const Input g(grad_t);
  const Output o(out);
  for_each_block(d, [&](const Block& blk) {
    BlockBuffer g_buf, out_buf;
    const float* gb = g.block(blk.offset, blk.n, g_buf.data);
    float* ob = o.buffer(blk.offset, out_buf.data);
    const Vec c(coef[blk.sample]);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) { (Vec::loadu(gb + i, count) * c).store(ob + i, count); });
    o.commit(blk.offset, blk.n, ob);
  });
  return out;
}

}  // namespace
}  // namespace genfast::cpu

TORCH_LIBRARY_FRAGMENT(genfast, m) {
  m.def("cpp_interpolate(Tensor real, Tensor fake, Tensor alpha) -> Tensor");
  m.def("cpp_interpolate_backward(Tensor grad, Tensor alpha, bool want_real, bool want_fake) -> (Tensor, Tensor)");
  m.def("cpp_gradient_norm_penalty(Tensor grad, float weight) -> (Tensor, Tensor)");
  m.def("cpp_gradient_norm_penalty_backward(Tensor grad_penalty, Tensor grad, Tensor norms, float weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("cpp_interpolate", &genfast::cpu::interpolate);
  m.impl("cpp_interpolate_backward", &genfast::cpu::interpolate_backward);
  m.impl("cpp_gradient_norm_penalty", &genfast::cpu::gradient_norm_penalty);
  m.impl("cpp_gradient_norm_penalty_backward", &genfast::cpu::gradient_norm_penalty_backward);
}
