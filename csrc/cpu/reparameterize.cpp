// VAE reparameterization and KL on the CPU (genfast/reference/vae.py): z = μ + exp(½·logvar)·ε and
// kl_b = ½·Σ(μ² + e^logvar − 1 − logvar), one pass; the backward dμ = dz + dkl·μ,
// dlogvar = dz·ε·½σ + dkl·½(σ² − 1) regenerates ε from the seed when it was not given.
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "per_sample.h"

namespace genfast::cpu {
namespace {

// The VAE operands in mu's batch-major layout, and where ε comes from.
struct VaeArgs {
  at::Tensor mu, logvar;
  std::optional<at::Tensor> noise;
  PhiloxKey key{};
};

VaeArgs vae_args(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& noise,
                 const std::optional<at::Tensor>& seed, bool needs_noise, const char* op) {
  check_samples(mu, "mu", op);
  VaeArgs args{batch_major(mu), {}, std::nullopt, {}};
  args.logvar = in_layout_of(logvar, "logvar", args.mu, "mu", op);
  if (!needs_noise) return args;
  if (noise.has_value()) {
    args.noise = in_layout_of(*noise, "noise", args.mu, "mu", op);
  } else {
    TORCH_CHECK(seed.has_value(), op, ": seed must be given when noise is not");
    check_noise_numel(dims(args.mu), op);
    args.key = read_seed(*seed, op);
  }
  return args;
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl(const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                                     const std::optional<at::Tensor>& noise_in,
                                                     const std::optional<at::Tensor>& seed, bool want_z,
                                                     bool want_kl) {
  const VaeArgs args = vae_args(mu_in, logvar_in, noise_in, seed, want_z, "cpp_reparameterize_kl");
  const Dims d = dims(args.mu);
  at::Tensor z = want_z ? at::empty_like(args.mu) : mu_in.new_empty({0});
  std::vector<float> partials(want_kl ? d.batch * d.blocks() : 0);
  const Input mu(args.mu), logvar(args.logvar);
  const std::optional<Input> noise = args.noise ? std::optional<Input>(Input(*args.noise)) : std::nullopt;
  const Output out(z);
  const Vec half(0.5f), one(1.0f);
  for_each_block(d, [&](const Block& blk) {
    BlockBuffer mu_buf, logvar_buf, eps_buf, z_buf;
    const float* m = mu.block(blk.offset, blk.n, mu_buf.data);
    const float* lv = logvar.block(blk.offset, blk.n, logvar_buf.data);
    const float* eps = want_z ? block_noise(noise ? &*noise : nullptr, args.key, blk, eps_buf.data) : nullptr;
    float* zb = want_z ? out.buffer(blk.offset, z_buf.data) : nullptr;
    Vec acc(0.0f);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      const Vec mv = Vec::loadu(m + i, count), lvv = Vec::loadu(lv + i, count);
      Vec sigma;
      if (want_z) {
        sigma = (lvv * half).exp();
        (mv + sigma * Vec::loadu(eps + i, count)).store(zb + i, count);
      }
      if (want_kl) {
        const Vec variance = want_z ? sigma * sigma : lvv.exp();  // e^logvar, one exp a pass
        acc = acc + Vec::set(Vec(0.0f), mv * mv + variance - one - lvv, count);
      }
    });
    if (want_z) out.commit(blk.offset, blk.n, zb);
    if (want_kl) partials[blk.sample * d.blocks() + blk.index] = reduce_sum(acc);
  });
  at::Tensor kl = mu_in.new_empty({want_kl ? d.batch : 0}, at::kFloat);
  if (want_kl) {
    const std::vector<float> sums = sum_blocks(partials, d);
    for (int64_t b = 0; b < d.batch; ++b) kl.data_ptr<float>()[b] = 0.5f * sums[b];
  }
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_backward(
    const std::optional<at::Tensor>& grad_z_in, const std::optional<at::Tensor>& grad_kl_in, const at::Tensor& mu_in,
    const at::Tensor& logvar_in, const std::optional<at::Tensor>& noise_in, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "cpp_reparameterize_kl_backward";
  const bool has_dz = grad_z_in.has_value(), has_dkl = grad_kl_in.has_value();
  const VaeArgs args = vae_args(mu_in, logvar_in, noise_in, seed, has_dz, op);
  const Dims d = dims(args.mu);
  at::Tensor grad_mu = at::empty_like(args.mu), grad_logvar = at::empty_like(args.mu, args.logvar.options());
  const at::Tensor grad_z = has_dz ? in_layout_of(*grad_z_in, "grad_z", args.mu, "mu", op) : args.mu;
  const std::vector<float> dkl = has_dkl ? per_sample_values(*grad_kl_in, d.batch, "grad_kl", op)
                                         : std::vector<float>();
  const Input mu(args.mu), logvar(args.logvar), dz_in(grad_z);
  const std::optional<Input> noise = args.noise ? std::optional<Input>(Input(*args.noise)) : std::nullopt;
  const Output mu_out(grad_mu), logvar_out(grad_logvar);
  const Vec half(0.5f), one(1.0f);
  for_each_block(d, [&](const Block& blk) {
    BlockBuffer mu_buf, logvar_buf, eps_buf, dz_buf, gmu_buf, glv_buf;
    const float* m = mu.block(blk.offset, blk.n, mu_buf.data);
    const float* lv = logvar.block(blk.offset, blk.n, logvar_buf.data);
    const float* eps = has_dz ? block_noise(noise ? &*noise : nullptr, args.key, blk, eps_buf.data) : nullptr;
    const float* dz = has_dz ? dz_in.block(blk.offset, blk.n, dz_buf.data) : nullptr;
    const Vec dkl_b(has_dkl ? dkl[blk.sample] : 0.0f);
    float* gmu = mu_out.buffer(blk.offset, gmu_buf.data);
    float* glv = logvar_out.buffer(blk.offset, glv_buf.data);
    for_each_vec(blk.n, [&](int64_t i, int64_t count) {
      const Vec lvv = Vec::loadu(lv + i, count);
      Vec dmu(0.0f), dlv(0.0f), sigma;
      if (has_dz) {
        const Vec dzv = Vec::loadu(dz + i, count);
        sigma = (lvv * half).exp();
        dmu = dzv;
        dlv = dzv * Vec::loadu(eps + i, count) * (half * sigma);
      }
      if (has_dkl) {
        const Vec variance = has_dz ? sigma * sigma : lvv.exp();  // e^logvar, one exp a pass
        dmu = dmu + dkl_b * Vec::loadu(m + i, count);
        dlv = dlv + dkl_b * (half * (variance - one));
      }
      dmu.store(gmu + i, count);
      dlv.store(glv + i, count);
    });
    mu_out.commit(blk.offset, blk.n, gmu);
    logvar_out.commit(blk.offset, blk.n, glv);
  });
  return {grad_mu, grad_logvar};
}

}  // namespace
}  // namespace genfast::cpu

TORCH_LIBRARY_FRAGMENT(genfast, m) {
  m.def("cpp_reparameterize_kl(Tensor mu, Tensor logvar, Tensor? noise, Tensor? seed, bool want_z, bool want_kl)"
        " -> (Tensor, Tensor)");
  m.def("cpp_reparameterize_kl_backward(Tensor? grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, Tensor? noise,"
        " Tensor? seed) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("cpp_reparameterize_kl", &genfast::cpu::reparameterize_kl);
  m.impl("cpp_reparameterize_kl_backward", &genfast::cpu::reparameterize_kl_backward);
}
