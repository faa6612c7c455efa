// What the CPU diffusion ops (diffusion.cpp: q_sample and the training loss; diffusion_steps.cpp: the sampler
// steps and the dynamic threshold) share: the schedule tables read at timesteps, the prediction type, where ε
// comes from, and the per-sample affine map out = a·x + b·y + c·ε with its backward.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "per_sample.h"

namespace genfast::cpu {

// A float64 schedule table read at timesteps; a timestep outside it is refused (genfast.ops.diffusion's
// SELF_CHECKING relies on it).
class Table {
 public:
  Table(const at::Tensor& table, const char* name, const char* op)
      : values_(table.to(at::kCPU, at::kDouble).contiguous()), name_(name), op_(op) {
    TORCH_CHECK(table.is_floating_point() && table.dim() == 1, op, ": ", name,
                " must be a 1-dim floating tensor (one entry per timestep), got ", table.scalar_type(), " of shape ",
                table.sizes());
  }
  double operator[](int64_t t) const { return at(t, "t"); }

  // The entry at timestep ``t``, read from the argument ``arg`` (named when refused).
  double at(int64_t t, const char* arg) const {
    TORCH_CHECK(t >= 0 && t < values_.numel(), op_, ": timestep ", t, " is outside [0, ", values_.numel(), ") of ",
                name_, " (in ", arg, ")");
    return values_.data_ptr<double>()[t];
  }

 private:
  at::Tensor values_;
  const char* name_;
  const char* op_;
};

// Timesteps (B,) as int64 values.
inline std::vector<int64_t> timesteps(const at::Tensor& t, int64_t batch, const char* name, const char* op) {
  TORCH_CHECK(!t.is_floating_point() && !t.is_complex() && t.dim() == 1 && t.numel() == batch, op, ": ", name,
              " must be an integer tensor of shape (", batch, "), got ", t.scalar_type(), " of shape ", t.sizes());
  const at::Tensor values = t.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(values.data_ptr<int64_t>(), values.data_ptr<int64_t>() + batch);
}

// What the model output is (diffusers' prediction_type).
enum class Prediction { kEpsilon, kV, kSample };

inline Prediction prediction(c10::string_view name, const char* op) {
  if (name == "epsilon") return Prediction::kEpsilon;
  if (name == "v_prediction") return Prediction::kV;
  TORCH_CHECK(name == "sample", op, ": prediction_type must be one of 'epsilon', 'v_prediction', 'sample', got '",
              std::string(name), "'");
  return Prediction::kSample;
}

// Per-sample fp32 coefficients (a, b, c) of out = a·x + b·y + c·ε.
struct Coefficients {
  std::vector<float> a, b, c;
  explicit Coefficients(int64_t batch) : a(batch), b(batch), c(batch) {}
};

// ε of an op over x's blocks: ``noise`` (put in x's layout) when given, else the Philox stream of ``seed``, else
// absent.
class Noise {
 public:
  Noise(const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed, const at::Tensor& x,
        const char* x_name, const char* op)
      : tensor_(noise.has_value() ? in_layout_of(*noise, "noise", x, x_name, op) : x),
        input_(tensor_),
        given_(noise.has_value()),
        present_(noise.has_value() || seed.has_value()) {
    if (present_ && !given_) {
      check_noise_numel(dims(x), op);
      key_ = read_seed(*seed, op);
    }
  }

  bool present() const { return present_; }

  // fp32 ε of a block (nullptr when absent), ``buf`` the room for it.
  const float* block(const Block& blk, float* buf) const {
    return present_ ? block_noise(given_ ? &input_ : nullptr, key_, blk, buf) : nullptr;
  }

 private:
  at::Tensor tensor_;  // the noise, or x itself when there is none (never read then)
  Input input_;
  bool given_, present_;
  PhiloxKey key_{};
};

// out = a·x + b·y + c·ε in x's dtype and batch-major layout; ``y`` may be absent (q_sample).
at::Tensor affine(const at::Tensor& x_in, const char* x_name, const std::optional<at::Tensor>& y_in,
                  const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
                  const Coefficients& k, const char* op);

// (b·g, a·g) (or a·g alone when not ``want_y``: an empty first tensor) in grad's dtype and batch-major layout.
std::tuple<at::Tensor, at::Tensor> affine_backward(const at::Tensor& grad_in, const Coefficients& k, bool want_y,
                                                   const char* op);

}  // namespace genfast::cpu
