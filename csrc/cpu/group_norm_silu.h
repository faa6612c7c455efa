// Shared by the CPU (csrc/cpu/group_norm_silu*.cpp) and CUDA (csrc/cuda/group_norm_silu.cu) GroupNorm + SiLU:
// argument checks, the (B, C, S) geometry and the layouts the kernels read in place.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <utility>

namespace genfast {

// Calls f(T{}) for the element type T of x: float, c10::BFloat16 or c10::Half (make_problem rejects others).
template <typename F>
void dispatch(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "genfast GroupNorm kernels: unsupported dtype ", dtype);
  }
}

struct GroupNormGeometry {
  int64_t B, C, G, CPG, S;  // S = the product of the spatial sizes (1 for a (B, C) input)
  bool nhwc;                // channel stride 1 (channels_last); else NCHW-contiguous
};

// x's spatial dims collapse to one stride C and its channel stride is 1 (NHWC / channels_last as (B, C, S)).
inline bool collapses_as_nhwc(const at::Tensor& x) {
  const int64_t C = x.size(1);
  if (x.stride(1) != 1 && C != 1) return false;
  int64_t expected = C;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return x.size(0) == 1 || x.stride(0) == expected;
}

// x itself when the kernels read it in place (NCHW-contiguous or NHWC), else a contiguous copy.
inline at::Tensor kernel_layout(const at::Tensor& x) {
  return (x.is_contiguous() || collapses_as_nhwc(x)) ? x : x.contiguous();
}

inline void check_optional(const c10::optional<at::Tensor>& t, const char* op, const char* name,
                           at::IntArrayRef shape, const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", t->device());
}

// Checks the arguments of the forward and backward ops and returns the geometry of x.
inline GroupNormGeometry group_norm_geometry(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                             const c10::optional<at::Tensor>& bias,
                                             const c10::optional<at::Tensor>& add,
                                             const c10::optional<at::Tensor>& scale,
                                             const c10::optional<at::Tensor>& shift, int64_t num_groups,
                                             const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must have at least 2 dimensions, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(num_groups >= 1 && C % num_groups == 0, op, ": num_groups must be a positive divisor of the number "
              "of channels ", C, ", got ", num_groups);
  check_optional(weight, op, "weight", {C}, x);
  check_optional(bias, op, "bias", {C}, x);
  for (auto [t, name] : {std::pair{&add, "add"}, std::pair{&scale, "scale"}, std::pair{&shift, "shift"}}) {
    check_optional(*t, op, name, {B, C}, x);
  }
  int64_t S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
  return {B, C, num_groups, C / num_groups, S, !x.is_contiguous() && collapses_as_nhwc(x)};
}

// The backward's extra checks: grad_y of x's shape, mean and rstd of shape (B, G).
inline void check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& rstd, const GroupNormGeometry& geo, const char* op) {
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have x's shape ", x.sizes(), ", got ",
              grad_y.sizes());
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({geo.B, geo.G}), op, ": mean and rstd must have shape (", geo.B,
                ", ", geo.G, "), got ", t->sizes());
  }
}

// The gradient of an optional input in its dtype, or an empty tensor when the input is absent.
inline at::Tensor input_grad(const at::Tensor& value, const c10::optional<at::Tensor>& t, const at::Tensor& x) {
  return t.has_value() ? value.to(t->scalar_type()) : at::empty({0}, x.options());
}

}  // namespace genfast
