"""Memory traffic of each fused op against the unfused torch sequence it replaces:
bytes read + bytes written, counted from the shapes.

Counting rules
--------------
- A computation is a list of passes (kernels). A pass reads every tensor it takes once
  and writes every tensor it makes once, all from and to memory: nothing stays in cache
  between passes, and the re-reads inside one kernel (convolution tiles, im2col) are
  not counted. A convolution is one pass reading x and the weight and writing its
  output; its backward is two passes (grad of the input: grad_out and weight in; grad
  of the weight: grad_out and x in).
- Counted tensors: activations (anything with the N x H x W extent: inputs, outputs,
  temporaries, gradients) and weights (convolution and FC weights and their
  gradients). Per-channel and per-sample vectors (BN parameters and statistics, biases,
  SE's squeezed / hidden / gate [N, C]) are left out: each is at most 1 / (H * W) of one
  activation pass (2 % at 7 x 7, 0.03 % at 56 x 56), and the arithmetic on them is
  not a pass over memory either.
- Every tensor is counted at `itemsize` bytes per element (the benchmark's dtype).
- "eval" is the forward pass with running statistics. "train" is the training
  forward plus the backward, with a dense grad_out of the output's size as in a
  network (not the zero-stride one of out.sum().backward()); gradients flow to every
  activation input (except a conv_bn_act input given input_grad=False, such as the
  image at the stem) and every weight. Autograd's pass-through backward of an add (the
  same gradient tensor for both inputs) costs nothing.
- Unfused: the eager torch sequence, one pass per op, as torch's CPU and CUDA kernels
  run them: BatchNorm in training is a statistics pass and a normalise pass, its
  backward a reduction pass and an elementwise pass; mean's backward materialises
  grad / (H * W); a broadcast multiply's backward to the small operand writes the full
  product and then sums it.
- Fused: the passes of the cnnkernels op as designed:
  conv_bn_act eval: the BN scale folded into the weight (a pass over the weight), then
  one convolution with shift, residual and activation in its epilogue (the cpu
  backend's oneDNN path in float32). Training: convolution, statistics pass,
  normalise + residual + activation pass; backward: a reduction pass and an
  elementwise pass (both read grad_out, out for the ReLU mask, and the saved conv
  output), then the convolution backward (csrc/common/conv_bn_act_driver.h).
  add_act: one pass each way. se_excite: squeeze pass + scale pass; backward: reduction
  pass + elementwise pass (csrc/cpu/se_excite.cpp).
  bn_act_conv: BN + activation applied while loading x into the convolution, so the
  normalised input is never written; training adds a statistics pass, and the
  backward recomputes act(bn(x)) from x in the weight-gradient convolution and runs a
  reduction and an elementwise pass for BN (the contract of issue 3). A backend that
  normalises into a temporary (the cpu backend may) adds one write and one read of
  x's size per normalisation.

Each op declares its model with the op (the traffic= function its cnnkernels/ops/<op>.py
gives ops._registration.declare_call); `traffic.<op>(...)` and `for_op(name)` return it.
It returns a Traffic with both pass lists, so that every figure can be traced to the
passes that make it up (Traffic.describe()).
"""
from __future__ import annotations

from typing import Callable

from cnnkernels._cost import MODES, Pass, Traffic, conv_output_shape
from cnnkernels.ops._registration import PUBLIC_CALLS

__all__ = ["MODES", "Pass", "Traffic", "conv_output_shape", "for_op", "ops"]


def ops() -> list[str]:
    """The ops that declare a traffic model."""
    return sorted(name for name, call in PUBLIC_CALLS.items() if call.traffic is not None)


def for_op(name: str) -> Callable[..., Traffic]:
    """The traffic model of op `name` (its arguments: shapes, then keyword options)."""
    call = PUBLIC_CALLS.get(name)
    if call is None or call.traffic is None:
        raise ValueError(f"no traffic model for {name!r}; ops with one: {', '.join(ops())}")
    return call.traffic


def __getattr__(name: str):
    if name in PUBLIC_CALLS and PUBLIC_CALLS[name].traffic is not None:
        return PUBLIC_CALLS[name].traffic
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
