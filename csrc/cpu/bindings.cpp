// The extension's Python module: each internal op ``genfast::cpp_<f>`` as a plain function ``cpp_<f>``, the
// dispatcher's unboxed call of the registered kernels (CPU, or CUDA where csrc/cuda has one). The eager path of
// genfast/_backend.py calls these: torch.ops converts every argument through the schema into a boxed stack and back
// (~4 µs a call on a CPU); pybind11's casters and a typed call cost a fraction of it. The registered ops stay what
// torch.compile, export and opcheck see. The only file including the pybind11/Python headers.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/python.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace {

using at::Tensor;
using Opt = std::optional<at::Tensor>;
using Pair = std::tuple<Tensor, Tensor>;
using Str = c10::string_view;  // a schema's str (pybind11 passes a Python str's UTF-8 buffer)
using OptFloat = std::optional<double>;

// A new autograd node as the installed torch holds one: torch 2.14 by c10::intrusive_ptr (Node derives from
// intrusive_ptr_target), torch 2.11 (the GPU machine's) by std::shared_ptr.
template <typename NodeType, typename... Args>
auto make_node(Args&&... args) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, torch::autograd::Node>) {
    return c10::make_intrusive<NodeType>(std::forward<Args>(args)...);
  } else {
    return std::make_shared<NodeType>(std::forward<Args>(args)...);
  }
}

// Defines ``name`` on ``m`` as the typed call of genfast::<name>: ``typed`` checks Sig against the schema and the
// kernels' C++ signatures when the module loads. The GIL is released for the call, as torch.ops does.
template <typename Sig>
struct Entry;

template <typename Ret, typename... Args>
struct Entry<Ret(Args...)> {
  static void def(pybind11::module_& m, const char* name) {
    auto op = c10::Dispatcher::singleton().findSchemaOrThrow((std::string("genfast::") + name).c_str(), "")
                  .typed<Ret(Args...)>();
    m.def(name, [op](Args... args) { return op.call(args...); },
          pybind11::call_guard<pybind11::gil_scoped_release>());
  }
};

// GroupNorm + SiLU with its autograd node in C++: the same forward and backward ops and the same rules as the
// Python autograd.Function of genfast/ops/group_norm_silu.py (mean and rstd not differentiable, no zero-filled
// gradients, dy in x's layout, None for absent inputs), for the eager path of the "cpp" backend, where a Python
// node's apply and backward cost about a fifth of a small call (bench/NOTES.md, "Host cost").
using Variables = torch::autograd::variable_list;

Tensor optional_or_undefined(const Opt& t) { return t.has_value() ? *t : Tensor(); }

Opt defined_or_none(const Tensor& t) { return t.defined() ? Opt(t) : std::nullopt; }

struct GroupNormSiLU : public torch::autograd::Function<GroupNormSiLU> {
  static Variables forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Opt& weight, const Opt& bias,
                           const Opt& add, const Opt& scale, const Opt& shift, int64_t num_groups, double eps,
                           bool silu) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("genfast::cpp_group_norm_silu", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Opt&, const Opt&, const Opt&,
                                                                   const Opt&, const Opt&, int64_t, double, bool)>();
    auto [y, mean, rstd] = op.call(x, weight, bias, add, scale, shift, num_groups, eps, silu);
    ctx->save_for_backward({x, optional_or_undefined(weight), optional_or_undefined(bias), optional_or_undefined(add),
                            optional_or_undefined(scale), optional_or_undefined(shift), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["silu"] = silu;
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);
    return {y, mean, rstd};
  }

  static Variables backward(torch::autograd::AutogradContext* ctx, Variables grads) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("genfast::cpp_group_norm_silu_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
                             const Tensor&, const Tensor&, const Opt&, const Opt&, const Opt&, const Opt&, const Opt&,
                             const Tensor&, const Tensor&, int64_t, bool)>();
    Variables none(9);
    if (!grads[0].defined()) return none;
    auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    Tensor grad_y = grads[0];
    if (grad_y.strides() != x.strides() || grad_y.scalar_type() != x.scalar_type()) {
      grad_y = at::empty_like(x).copy_(grad_y);  // the kernels index dy with x's strides
    }
    auto results = op.call(grad_y, x, defined_or_none(saved[1]), defined_or_none(saved[2]), defined_or_none(saved[3]),
                           defined_or_none(saved[4]), defined_or_none(saved[5]), saved[6], saved[7],
                           ctx->saved_data["num_groups"].toInt(), ctx->saved_data["silu"].toBool());
    Tensor computed[] = {std::get<0>(results), std::get<1>(results), std::get<2>(results), std::get<3>(results),
                         std::get<4>(results), std::get<5>(results)};
    for (int i = 0; i < 6; ++i) {
      if (saved[i].defined()) none[i] = computed[i];
    }
    // create_graph: the gradients are not differentiable; differentiating them raises (as the registered backward
    // op, which has no autograd formula, does) instead of silently giving no second-order gradient
    if (torch::autograd::compute_requires_grad(grads[0], x, saved[1], saved[2], saved[3], saved[4], saved[5])) {
      auto error = make_node<torch::autograd::Error>(
          "genfast.group_norm_silu has no double backward: its gradient is not differentiable",
          torch::autograd::collect_next_edges(grads[0], x, saved[1], saved[2], saved[3], saved[4], saved[5]));
      for (auto& grad : none) {
        if (grad.defined()) torch::autograd::set_history(grad, error);
      }
    }
    return none;
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  Entry<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Opt&, const Opt&, const Opt&, const Opt&, const Opt&,
                                           int64_t, double, bool)>::def(m, "cpp_group_norm_silu");
  Entry<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Opt&, const Opt&, const Opt&, const Opt&, const Opt&, const Tensor&,
      const Tensor&, int64_t, bool)>::def(m, "cpp_group_norm_silu_backward");
  Entry<Pair(const Tensor&, const Tensor&, const Opt&, const Opt&, bool, bool)>::def(m, "cpp_reparameterize_kl");
  Entry<Pair(const Opt&, const Opt&, const Tensor&, const Tensor&, const Opt&, const Opt&)>::def(
      m, "cpp_reparameterize_kl_backward");
  Entry<Tensor(const Tensor&, const Tensor&, const Opt&, const Opt&, const Tensor&, const Tensor&)>::def(
      m, "cpp_q_sample");
  Entry<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>::def(m, "cpp_q_sample_backward");
  Entry<Tensor(const Tensor&, const Tensor&, const Opt&, const Tensor&, const Opt&, const Opt&, const Opt&,
               const Tensor&, const Tensor&, const Tensor&, Str, Str, OptFloat)>::def(m, "cpp_ddpm_step");
  Entry<Pair(const Tensor&, const Opt&, const Opt&, const Opt&, const Tensor&, const Opt&, const Tensor&,
             const Tensor&, const Tensor&, Str, Str, OptFloat)>::def(m, "cpp_ddpm_step_backward");
  Entry<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Opt&, const Opt&, const Opt&,
               const Tensor&, const Tensor&, const Tensor&, double, Str, bool, OptFloat)>::def(m, "cpp_ddim_step");
  Entry<Pair(const Tensor&, const Opt&, const Opt&, const Opt&, const Tensor&, const Tensor&, const Tensor&,
             const Tensor&, const Tensor&, double, Str, bool, OptFloat)>::def(m, "cpp_ddim_step_backward");
  Entry<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Str, double, double)>::def(
      m, "cpp_dynamic_threshold");
  Entry<Tensor(const Tensor&, const Tensor&, const Opt&, const Tensor&, const Tensor&, const Tensor&, Str)>::def(
      m, "cpp_target_mse");
  Entry<Tensor(const Tensor&, const Tensor&, const Tensor&, const Opt&, const Tensor&, const Tensor&, const Tensor&,
               Str)>::def(m, "cpp_target_mse_backward");
  Entry<Tensor(const Tensor&, const Tensor&, const Tensor&)>::def(m, "cpp_interpolate");
  Entry<Pair(const Tensor&, const Tensor&, bool, bool)>::def(m, "cpp_interpolate_backward");
  Entry<Pair(const Tensor&, double)>::def(m, "cpp_gradient_norm_penalty");
  Entry<Tensor(const Tensor&, const Tensor&, const Tensor&, double)>::def(m, "cpp_gradient_norm_penalty_backward");
  m.def(
      "cpp_group_norm_silu_autograd",
      [](const Tensor& x, const Opt& weight, const Opt& bias, const Opt& add, const Opt& scale, const Opt& shift,
         int64_t num_groups, double eps, bool silu) {
        auto out = GroupNormSiLU::apply(x, weight, bias, add, scale, shift, num_groups, eps, silu);
        return std::make_tuple(out[0], out[1], out[2]);
      },
      pybind11::call_guard<pybind11::gil_scoped_release>());
}
