"""The C++ CPU kernels of conv_bn_act (csrc/cpu/conv_bn_act.cpp + the shared driver
csrc/common/conv_bn_act_driver.h), called directly as torch.ops.cnnkernels.
_conv_bn_act_{forward,backward}_native and compared with cnnkernels.reference in float64.

Covers what the public-op tests do not: statistics precision under a large mean offset,
strided inputs, mixed memory formats, half inputs with float32 BN parameters, every
output_mask, the oneDNN eval path and its fallback (the C++ argument errors:
test_native_cpu_arguments.py). Outputs are checked for unwritten elements: torch fills
torch.empty with NaN while the fixture `poison_empty` is active."""
import contextlib
import itertools

import pytest
import torch

import cnnkernels  # noqa: F401  (loads cnnkernels._C when it is built)
from cnnkernels import _library, reference
from helpers import CASES, HALF_DTYPES, TOLERANCE, half_precision_bound, poisoned_empty, rel_err, seeded_randn

pytestmark = pytest.mark.skipif(
    not _library.has_native_kernel("_conv_bn_act_forward_native", "CPU"),
    reason=f"cnnkernels._C with CPU kernels is not built ({_library.LOAD_ERROR or 'no CPU kernel registered'})",
)

GRAD_NAMES = ("grad_x", "grad_weight", "grad_bias", "grad_bn_weight", "grad_bn_bias", "grad_residual")
EPS = 1e-5


@pytest.fixture(autouse=True)
def poison_empty():
    """Every torch.empty inside the kernels comes back NaN-filled: unwritten output shows."""
    with poisoned_empty():
        yield


def forward_native(x, weight, bias=None, bn_weight=None, bn_bias=None, running_mean=None, running_var=None,
                   stride=1, padding=0, dilation=1, groups=1, training=True, residual=None, activation="relu",
                   eps=EPS, fn=None):
    fn = fn or torch.ops.cnnkernels._conv_bn_act_forward_native
    return fn(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, [stride] * 2, [padding] * 2,
              [dilation] * 2, groups, training, eps, residual, activation)


def backward_native(grad_out, fwd, inputs, conv, training, activation, mask, fn=None):
    """fwd: the forward's (out, conv_out, save_mean, save_var); inputs: x, weight, bias, bn_weight."""
    fn = fn or torch.ops.cnnkernels._conv_bn_act_backward_native
    x, weight, bias, bn_weight = inputs
    out, conv_out, save_mean, save_var = fwd
    return fn(grad_out, out, x, weight, bias, conv_out, bn_weight, save_mean, save_var, [conv["stride"]] * 2,
              [conv["padding"]] * 2, [conv["dilation"]] * 2, conv["groups"], training, EPS, activation, list(mask))


def forward_reference(*args, **kwargs):
    return forward_native(*args, **kwargs, fn=reference.conv_bn_act_forward)


def backward_reference(*args, **kwargs):
    return backward_native(*args, **kwargs, fn=reference.conv_bn_act_backward)


def to64(t):
    return None if t is None else t.detach().double()


def make(n=2, c_in=6, c_out=8, hw=7, kernel=3, groups=1, dtype=torch.float32, param_dtype=None, bias=True,
         residual=False, channels_last=False, seed=0):
    """Random inputs: dict of x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual."""
    gen = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def rand(*shape, scale=1.0, offset=0.0, dt=dtype):
        return seeded_randn(gen, *shape, scale=scale, offset=offset, dtype=dt)

    x = rand(n, c_in, hw, hw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    h_out = hw - kernel + 1 + 2 * (kernel // 2)
    return dict(
        x=x,
        weight=rand(c_out, c_in // groups, kernel, kernel, scale=(c_in // groups * kernel ** 2) ** -0.5),
        bias=rand(c_out, scale=0.1) if bias else None,
        bn_weight=rand(c_out, scale=0.3, offset=1.0, dt=param_dtype),
        bn_bias=rand(c_out, scale=0.3, dt=param_dtype),
        running_mean=rand(c_out, scale=0.2, dt=param_dtype),
        running_var=rand(c_out, scale=0.3, dt=param_dtype).abs() + 0.5,
        residual=rand(n, c_out, h_out, h_out) if residual else None,
    ), dict(stride=1, padding=kernel // 2, dilation=1, groups=groups)


def check_close(got, want, tol, name, floor=0.0):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: unwritten (NaN) or non-finite elements"
    err = rel_err(got, want, floor)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


def run_torch(t, conv, training, activation, grad_out):
    """The native forward's and backward's results, computed by torch's own conv2d /
    batch_norm / relu in the inputs' dtypes (half x and weights, float32 BN parameters):
    {out, conv_out, save_mean, save_var, grad_x, ..., grad_residual}."""
    t = {k: None if v is None else v.detach().clone().requires_grad_(k not in ("running_mean", "running_var"))
         for k, v in t.items()}
    y = torch.nn.functional.conv2d(t["x"], t["weight"], t["bias"], conv["stride"], conv["padding"],
                                   conv["dilation"], conv["groups"])
    if training:
        _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            y.detach(), t["bn_weight"].detach(), t["bn_bias"].detach(), None, None, True, 0.1, EPS)
        save_var = save_invstd.double().pow(-2) - EPS
    else:
        save_mean, save_var = t["running_mean"], t["running_var"]
    z = torch.nn.functional.batch_norm(y, t["running_mean"], t["running_var"], t["bn_weight"], t["bn_bias"],
                                       training, 0.1, EPS)
    if t["residual"] is not None:
        z = z + t["residual"]
    out = torch.relu(z) if activation == "relu" else z
    leaves = {name: t[name[len("grad_"):]] for name in GRAD_NAMES if t[name[len("grad_"):]] is not None}
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return dict(out=out, conv_out=y, save_mean=save_mean, save_var=save_var, **dict(zip(leaves, grads)))


def run_both(t, conv, training, activation, mask=(True,) * 6, dtype=None, seed=1):
    """Forward + backward, native and float64 reference; returns (native, reference) results."""
    fwd = forward_native(**t, **conv, training=training, activation=activation)
    t64 = {k: to64(v) for k, v in t.items()}
    ref = forward_reference(**t64, **conv, training=training, activation=activation)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(ref[0].shape, generator=gen, dtype=torch.float64)
    inputs = (t["x"], t["weight"], t["bias"], t["bn_weight"])
    grads = backward_native(grad_out.to(t["x"].dtype), fwd, inputs, conv, training, activation, mask)
    inputs64 = tuple(to64(v) for v in inputs)
    ref_grads = backward_reference(grad_out, ref, inputs64, conv, training, activation, mask)
    return fwd, ref, grads, ref_grads, grad_out


def grad_bias_floor(t, ref, grad_out, activation):
    """In training BN cancels a conv bias: its gradient is compared with its terms' size."""
    g = grad_out * (ref[0] > 0) if activation == "relu" else grad_out
    return (g.sum(dim=(0, 2, 3)) * ref[3].add(EPS).rsqrt() * to64(t["bn_weight"])).norm().item()


def check_all(t, conv, training, activation, mask=(True,) * 6, tol=None):
    """The native forward and backward against the float64 reference: float32 / float64
    within TOLERANCE (or tol); half inputs within half_precision_bound of torch's own error
    in that dtype (run_torch), result by result."""
    dtype = t["x"].dtype
    sdtype = reference.stats_dtype(dtype)
    fwd, ref, grads, ref_grads, grad_out = run_both(t, conv, training, activation, mask)
    bias_floor = grad_bias_floor(t, ref, grad_out, activation) if training and t["bias"] is not None else 0.0
    names = ("out", "conv_out", "save_mean", "save_var") + GRAD_NAMES
    if tol is None and dtype in HALF_DTYPES:
        torch_results = run_torch(t, conv, training, activation, grad_out)
        wanted = dict(zip(names, tuple(ref) + tuple(ref_grads)))
        bound = {name: half_precision_bound(rel_err(torch_results[name], wanted[name],
                                                      bias_floor if name == "grad_bias" else 0.0), dtype)
                 for name in names if name in torch_results and wanted[name].numel() > 0}
    else:
        bound = dict.fromkeys(names, tol or TOLERANCE[dtype])
    out, conv_out, save_mean, save_var = fwd
    fmt = reference.output_memory_format(t["x"])
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    check_close(out, ref[0], bound["out"], "out")
    if training:
        assert conv_out.dtype == dtype and conv_out.is_contiguous(memory_format=fmt)
        check_close(conv_out, ref[1], bound["conv_out"], "conv_out")
    else:
        assert conv_out.shape == (0,)
    for got, want, name in ((save_mean, ref[2], "save_mean"), (save_var, ref[3], "save_var")):
        assert got.dtype == sdtype
        check_close(got, want, bound[name], name)

    for i, (name, got, want) in enumerate(zip(GRAD_NAMES, grads, ref_grads)):
        if not mask[i] or (name == "grad_bias" and t["bias"] is None):
            assert got.shape == (0,), name
            continue
        assert got.dtype == (sdtype if name in ("grad_bn_weight", "grad_bn_bias") else dtype), name
        if name in ("grad_x", "grad_residual"):
            assert got.is_contiguous(memory_format=fmt), name
        check_close(got, want, bound[name], name, bias_floor if name == "grad_bias" else 0.0)
    return fwd, grads


# ---------------------------------------------------------------- shapes and layouts

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cases_match_reference(case, training):
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual = case.make(
        requires_grad=False, seed=hash(case.name) % 1000)
    t = dict(x=x, weight=weight, bias=bias, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean,
             running_var=running_var, residual=residual)
    kw = case.kwargs()
    activation = kw.pop("activation")
    check_all(t, kw, training, activation)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("x_cl, res_cl", [(True, False), (False, True)], ids=["x_cl-res_nchw", "x_nchw-res_cl"])
def test_residual_in_the_other_memory_format(x_cl, res_cl, training):
    t, conv = make(residual=True, channels_last=x_cl, seed=3)
    if res_cl:
        t["residual"] = t["residual"].contiguous(memory_format=torch.channels_last)
    check_all(t, conv, training, "relu")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_inputs(training):
    """Every tensor argument a strided view: slices, a transposed weight, an expanded grad."""
    t, conv = make(residual=True, seed=4)
    big = torch.randn(2, 6, 14, 15, dtype=torch.float32)
    t["x"] = big[:, :, ::2, 1::2]
    t["weight"] = t["weight"].transpose(2, 3).contiguous().transpose(2, 3)
    for name in ("bias", "bn_weight", "bn_bias", "running_mean", "running_var"):
        t[name] = torch.stack([t[name], torch.full_like(t[name], float("nan"))], dim=1)[:, 0]
    t["residual"] = torch.stack([t["residual"], torch.full_like(t["residual"], float("nan"))], dim=-1)[..., 0]
    assert not t["x"].is_contiguous() and not t["bias"].is_contiguous() and not t["residual"].is_contiguous()
    check_all(t, conv, training, "relu")


def test_strided_grad_out_and_saved_tensors():
    t, conv = make(seed=5)
    fwd = forward_native(**t, **conv, training=True)
    t64 = {k: to64(v) for k, v in t.items()}
    ref = forward_reference(**t64, **conv, training=True)
    grad_out = torch.randn(fwd[0].shape[:3] + (1,), dtype=torch.float32).expand(fwd[0].shape)
    out = torch.stack([fwd[0], fwd[0]], dim=-1)[..., 1]
    conv_out = fwd[1].transpose(2, 3).contiguous().transpose(2, 3)
    mean = torch.stack([fwd[2], fwd[2] * 0 + 7], dim=1)[:, 0]
    inputs = (t["x"], t["weight"], t["bias"], t["bn_weight"])
    grads = backward_native(grad_out, (out, conv_out, mean, fwd[3]), inputs, conv, True, "relu", [True] * 6)
    ref_grads = backward_reference(grad_out.double(), ref, tuple(to64(v) for v in inputs), conv, True, "relu",
                                   [True] * 6)
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        if name != "grad_bias":
            check_close(got, want, 1e-4, name)


# ---------------------------------------------------------------- dtypes

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_input_with_float32_bn_parameters(dtype, channels_last, training):
    t, conv = make(dtype=dtype, param_dtype=torch.float32, residual=True, channels_last=channels_last, seed=6)
    check_all(t, conv, training, "relu")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float64(training):
    t, conv = make(dtype=torch.float64, residual=True, groups=2, seed=7)
    check_all(t, conv, training, "none")


# ---------------------------------------------------------------- statistics precision

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_statistics_with_large_mean_offset(channels_last):
    """y ~ 1e3 +- 1e-2: the naive E[y^2] - E[y]^2 in float32 loses every digit of the variance.
    An identity 1x1 convolution makes y == x exactly; 4x4x48x48 spans several sum blocks
    (NCHW) and several row chunks (channels_last)."""
    c = 4
    gen = torch.Generator().manual_seed(16)
    x = (1e3 + 1e-2 * torch.randn(4, c, 48, 48, generator=gen, dtype=torch.float64)).float()
    x += torch.arange(c, dtype=torch.float32).view(1, c, 1, 1) * 100
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.eye(c).view(c, c, 1, 1)
    bn_weight, bn_bias = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    out, conv_out, mean, var = forward_native(x, weight, None, bn_weight, bn_bias, training=True,
                                              activation="none")
    assert torch.equal(conv_out, x)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    check_close(mean, mean64, 1e-7, "save_mean")
    check_close(var, var64, 1e-4, "save_var")
    ref = reference.conv_bn_act_forward(x.double(), weight.double(), None, bn_weight.double(), bn_bias.double(),
                                        None, None, [1, 1], [0, 0], [1, 1], 1, True, EPS, None, "none")
    # out = y*scale + shift in float32 (the contract's formulation): the product ~1e5 carries an
    # absolute rounding error ~1e5 * 6e-8 per element, so 2e-2 is float32's limit here, not 1e-4.
    # Wrong statistics (e.g. E[y^2] - E[y]^2 in float32) give errors of order 1.
    check_close(out, ref[0], 2e-2, "out")

    grad_out = torch.randn(x.shape, generator=gen).contiguous(memory_format=reference.output_memory_format(x))
    grads = backward_native(grad_out, (out, conv_out, mean, var), (x, weight, None, bn_weight),
                            dict(stride=1, padding=0, dilation=1, groups=1), True, "none", [True] * 6)
    ref_grads = reference.conv_bn_act_backward(
        grad_out.double(), ref[0], x.double(), weight.double(), None, ref[1], bn_weight.double(), ref[2], ref[3],
        [1, 1], [0, 0], [1, 1], 1, True, EPS, "none", [True] * 6)
    # grad_weight = sum x * grad_y cancels terms ~1e3 to a tiny sum (float32 reference fails too);
    # grad_bn_weight = sum g * xhat: the float32 save_mean alone is off by up to 3e-5 = 3e-3 std.
    tolerances = dict(grad_x=1e-4, grad_bn_weight=1e-2, grad_bn_bias=1e-4, grad_residual=1e-4)
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        if name in tolerances:
            check_close(got, want, tolerances[name], name)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_statistics_do_not_depend_on_thread_count(channels_last):
    """An identity 1x1 convolution (exact, whatever the threads) feeds the statistics."""
    t, conv = make(n=8, c_in=4, c_out=4, hw=40, kernel=1, bias=False, seed=8, channels_last=channels_last)
    t["weight"] = torch.eye(4).view(4, 4, 1, 1)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(forward_native(**t, **conv, training=True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(other[2], results[0][2]) and torch.equal(other[3], results[0][3])


# ---------------------------------------------------------------- output_mask and eval recompute

MASKS = list(itertools.product([False, True], repeat=6))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_every_output_mask(training, activation):
    t, conv = make(n=2, c_in=4, c_out=6, hw=5, residual=True, seed=9)
    for mask in MASKS:
        check_all(t, conv, training, activation, mask=mask)


def test_eval_grad_bn_weight_recomputes_conv_out():
    """In eval conv_out is empty; grad_bn_weight alone needs conv2d(x) + bias again."""
    t, conv = make(seed=10)
    fwd, grads = check_all(t, conv, False, "relu", mask=(False, False, False, True, False, False))
    assert fwd[1].shape == (0,) and grads[3].shape == (8,)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_empty_batch_in_eval(channels_last):
    t, conv = make(n=0, residual=True, channels_last=channels_last, seed=17)
    fwd, grads = check_all(t, conv, False, "relu")
    assert fwd[0].shape == (0, 8, 7, 7) and grads[1].shape == (8, 6, 3, 3)


def test_unbiased_conv_gives_empty_grad_bias():
    t, conv = make(bias=False, seed=11)
    _, grads = check_all(t, conv, True, "relu")
    assert grads[2].shape == (0,)


# ---------------------------------------------------------------- oneDNN eval path

ONEDNN_OP = "mkldnn::_convolution_pointwise"


@contextlib.contextmanager
def mkldnn_disabled():
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def called_ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_eval_fused_onednn_path_and_fallback_agree(channels_last, residual):
    t, conv = make(residual=residual, channels_last=channels_last, seed=12)
    fused, _ = check_all(t, conv, False, "relu")
    with mkldnn_disabled():
        plain, _ = check_all(t, conv, False, "relu")
        assert ONEDNN_OP not in called_ops(lambda: forward_native(**t, **conv, training=False))
    check_close(fused[0], plain[0], 1e-5, "fused vs plain out")


def test_eval_float32_uses_onednn_when_available():
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        pytest.skip("this torch has no oneDNN fused convolution")
    t, conv = make(seed=13)
    assert ONEDNN_OP in called_ops(lambda: forward_native(**t, **conv, training=False))
