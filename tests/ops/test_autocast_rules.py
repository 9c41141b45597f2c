"""Every fused op inside torch.autocast("cpu", torch.bfloat16), on the cpu and reference
backends: float32 parameters and input as a user's model has them; the op runs in
bfloat16 like the unfused torch sequence it replaces does under autocast (conv / linear
in bfloat16, BatchNorm statistics in float32), gradients reach the float32 leaves, and
torch.compile(fullgraph=True) traces it. Bounds: tests/helpers.half_precision_bound
against the float64 sequence, with the unfused sequence under autocast as torch's error."""
import copy
import dataclasses

import pytest
import torch

from cnnkernels.bench.layers import LAYERS, build, run_fused
from helpers import half_precision_bound, rel_err

# one layer per op and kind, at a small size
CASES = [dataclasses.replace(layer, size=min(layer.size, 8)) for layer in LAYERS
         if layer.id in ("conv_bn_act-resnet50-layer1.1.conv3", "conv_bn_act-resnext50_32x4d-layer1.1.conv2",
                         "add_act-resnet50-layer3.1", "se_excite-seresnext50_32x4d-layer1.1.se",
                         "bn_act_conv-densenet121-denseblock1.denselayer1.norm2/relu2/conv2")]


def test_one_case_per_op():
    assert sorted({layer.op for layer in CASES}) == ["add_act", "bn_act_conv", "conv_bn_act", "se_excite"]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("layer", CASES, ids=[layer.id for layer in CASES])
def test_op_follows_autocast(layer, backend, mode):
    module, inputs = build(layer, mode, 2, torch.float32, "cpu")
    if layer.op == "add_act":  # as in a network under autocast: one operand from a bf16 conv
        inputs = (inputs[0].bfloat16(), inputs[1])
    inputs = [t.detach().requires_grad_() for t in inputs]
    ref_module = copy.deepcopy(module).double()
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = ref_module(*ref_inputs)
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_grads = torch.autograd.grad(ref, ref_inputs + list(ref_module.parameters()), grad)

    results = {}
    for name, make in (("torch", lambda m: m), ("ours", lambda m: (lambda *xs: run_fused(m, *xs, backend=backend)))):
        m = copy.deepcopy(module)
        xs = [t.detach().requires_grad_() for t in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = make(m)(*xs)
        grads = torch.autograd.grad(out, xs + list(m.parameters()), grad.to(out.dtype))
        results[name] = (out, grads, m)
    # torch's own bfloat16 error: its unfused sequence under autocast (BatchNorm in float32
    # on CPU) or all in bfloat16 (as the fused kernels keep their activations), the larger
    m = copy.deepcopy(module).bfloat16()
    xs = [t.detach().bfloat16().requires_grad_() for t in inputs]
    out_bf16 = m(*xs)
    results["torch_bf16"] = (out_bf16, torch.autograd.grad(out_bf16, xs + list(m.parameters()), grad.bfloat16()), m)

    out, grads, fused_module = results["ours"]
    torch_out, torch_grads, torch_module = results["torch"]
    bf16_out, bf16_grads, _ = results["torch_bf16"]
    if layer.op != "add_act":  # the convolution / FC runs in autocast's dtype
        assert out.dtype == torch.bfloat16
    else:  # an add runs by type promotion under autocast, as torch's
        assert out.dtype == torch_out.dtype == torch.float32
    assert rel_err(out, ref) < half_precision_bound(max(rel_err(torch_out, ref), rel_err(bf16_out, ref)),
                                                     torch.bfloat16)
    leaves = inputs + list(module.parameters())
    for i, (g, tg, bg, rg, leaf) in enumerate(zip(grads, torch_grads, bf16_grads, ref_grads, leaves)):
        assert g.dtype == leaf.dtype, i
        torch_err = max(rel_err(tg, rg), rel_err(bg, rg))
        assert rel_err(g, rg) < half_precision_bound(torch_err, torch.bfloat16), (i, rel_err(g, rg), torch_err)
    for (key, b), tb in zip(fused_module.state_dict().items(), torch_module.state_dict().values()):
        assert b.dtype == tb.dtype, key
        if b.is_floating_point():
            assert rel_err(b, tb) < 1e-2, key


@pytest.mark.parametrize("layer", CASES, ids=[layer.id for layer in CASES])
def test_compiled_under_autocast(layer):
    torch._dynamo.reset()
    module, inputs = build(layer, "train", 2, torch.float32, "cpu")

    def fused(*xs):  # the default backend on CPU tensors: cpu
        return run_fused(module, *xs)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = fused(*inputs)
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")(*inputs)
    assert compiled.dtype == eager.dtype == (torch.float32 if layer.op == "add_act" else torch.bfloat16)
    assert rel_err(compiled, eager) < 2e-2
