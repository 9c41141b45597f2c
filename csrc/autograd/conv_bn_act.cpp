// Autograd of cnnkernels::conv_bn_act in C++: the same formula as the Python one in
// cnnkernels/ops/conv_bn_act.py (which registers only where this library is missing), at
// a fraction of its per-call cost. Forward and backward run the public ops below autograd,
// so the backend is still picked per call by the Python kernels (cnnkernels/_backends.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string_view>
#include <tuple>

namespace cnnkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Positions of x, weight, bias, bn_weight, bn_bias, residual in the forward's arguments and
// in the backward op's output_mask (and results).
constexpr std::array<int, 6> kGradInputs{0, 1, 2, 3, 4, 13};
constexpr int kForwardArgs = 15;

Outputs call_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                     const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                     const OptTensor& running_var, c10::IntArrayRef stride, c10::IntArrayRef padding,
                     c10::IntArrayRef dilation, int64_t groups, bool training, double eps,
                     const OptTensor& residual, c10::string_view activation) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cnnkernels::conv_bn_act", "")
                             .typed<Outputs(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                            const OptTensor&, const OptTensor&, const OptTensor&,
                                            const OptTensor&, c10::IntArrayRef, c10::IntArrayRef,
                                            c10::IntArrayRef, int64_t, bool, double, const OptTensor&,
                                            c10::string_view)>();
  return op.call(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                 groups, training, eps, residual, activation);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads call_backward(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x,
                    const at::Tensor& weight, const OptTensor& bias, const at::Tensor& conv_out,
                    const OptTensor& bn_weight, const at::Tensor& save_mean, const at::Tensor& save_var,
                    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                    int64_t groups, bool training, double eps, c10::string_view activation,
                    std::array<bool, 6> output_mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cnnkernels::conv_bn_act_backward", "")
                             .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const OptTensor&, const at::Tensor&,
                                          const OptTensor&, const at::Tensor&, const at::Tensor&,
                                          c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t,
                                          bool, double, c10::string_view, std::array<bool, 6>)>();
  return op.call(grad_out, out, x, weight, bias, conv_out, bn_weight, save_mean, save_var, stride, padding,
                 dilation, groups, training, eps, activation, output_mask);
}

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

OptTensor optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class ConvBnActFunction : public torch::autograd::Function<ConvBnActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                               int64_t groups, bool training, double eps, const OptTensor& residual,
                               c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, conv_out, save_mean, save_var] =
        call_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                     groups, training, eps, residual, activation);
    ctx->set_materialize_grads(false);  // no zero tensors for the unused outputs' gradients
    // needs_input_grad counts only the tensor arguments given (the graph's edges).
    const std::array<bool, kForwardArgs> given{true, true, present(bias), present(bn_weight),
                                               present(bn_bias), present(running_mean),
                                               present(running_var), false, false, false, false, false,
                                               false, present(residual), false};
    std::vector<int64_t> edges;
    for (int index : kGradInputs) {
      edges.push_back(given[index] ? std::count(given.begin(), given.begin() + index, true) : -1);
    }
    ctx->saved_data["edges"] = edges;
    ctx->save_for_backward({out, x, weight, bias.value_or(at::Tensor()), conv_out,
                            bn_weight.value_or(at::Tensor()), save_mean, save_var});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["bn_weight_dtype"] = present(bn_weight) ? bn_weight->scalar_type() : at::kFloat;
    ctx->saved_data["bn_bias_dtype"] = present(bn_bias) ? bn_bias->scalar_type() : at::kFloat;
    ctx->mark_non_differentiable({conv_out, save_mean, save_var});
    return {out, conv_out, save_mean, save_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(kForwardArgs);
    const auto edges = ctx->saved_data.at("edges").toIntVector();
    std::array<bool, 6> mask{};
    for (size_t i = 0; i < kGradInputs.size(); ++i) mask[i] = edges[i] >= 0 && ctx->needs_input_grad(edges[i]);
    const at::Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined() || std::none_of(mask.begin(), mask.end(), [](bool b) { return b; })) return grads;
    const auto saved = ctx->get_saved_variables();
    const auto& data = ctx->saved_data;
    const auto results = call_backward(
        grad_out, saved[0], saved[1], saved[2], optional(saved[3]), saved[4], optional(saved[5]), saved[6],
        saved[7], data.at("stride").toIntVector(), data.at("padding").toIntVector(),
        data.at("dilation").toIntVector(), data.at("groups").toInt(), data.at("training").toBool(),
        data.at("eps").toDouble(), data.at("activation").toStringRef(), mask);
    const std::array<at::Tensor, 6> all{std::get<0>(results), std::get<1>(results), std::get<2>(results),
                                        std::get<3>(results), std::get<4>(results), std::get<5>(results)};
    for (size_t i = 0; i < kGradInputs.size(); ++i) {
      if (mask[i]) grads[kGradInputs[i]] = all[i];
    }
    // BatchNorm parameter gradients come in the statistics dtype; each goes to its parameter's.
    for (const auto& [index, key] : {std::pair<int, const char*>{3, "bn_weight_dtype"}, {4, "bn_bias_dtype"}}) {
      if (grads[index].defined()) grads[index] = grads[index].to(data.at(key).toScalarType());
    }
    return grads;
  }
};

Outputs conv_bn_act_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                             const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                             const OptTensor& running_var, c10::IntArrayRef stride, c10::IntArrayRef padding,
                             c10::IntArrayRef dilation, int64_t groups, bool training, double eps,
                             const OptTensor& residual, c10::string_view activation) {
  const auto outputs = ConvBnActFunction::apply(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                                stride, padding, dilation, groups, training, eps, residual,
                                                activation);
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, Autograd, m) {
  m.impl("conv_bn_act", TORCH_FN(cnnkernels::conv_bn_act_autograd));
}
