"""cnnkernels.nn.BNActConv behaves like nn.Sequential(BatchNorm2d, ReLU, Conv2d) with the
same state_dict: outputs, gradients, running statistics and num_batches_tracked over
train steps, then eval."""
import pytest
import torch
from torch import nn

from cnnkernels.nn import BNActConv
from helpers import check_train_steps, rel_err


def unfused(module: BNActConv) -> nn.Sequential:
    conv = module.conv
    twin = nn.Sequential()
    twin.bn = nn.BatchNorm2d(module.bn.num_features, module.bn.eps, module.bn.momentum,
                             track_running_stats=module.bn.track_running_stats)
    twin.act = nn.ReLU() if module.activation == "relu" else nn.Identity()
    twin.conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, bias=conv.bias is not None)
    twin.load_state_dict(module.state_dict())
    return twin


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("groups, bias", [(1, False), (4, True)])
def test_matches_unfused_modules_over_train_steps_and_eval(groups, bias, momentum):
    torch.manual_seed(0)
    fused = BNActConv(8, 12, 3, stride=2, padding=1, groups=groups, bias=bias, momentum=momentum)
    with torch.no_grad():
        fused.bn.weight.uniform_(0.5, 1.5), fused.bn.bias.uniform_(-0.5, 0.5)
    twin = unfused(fused)
    assert list(fused.state_dict()) == list(twin.state_dict())
    check_train_steps(fused, twin, lambda: torch.randn(4, 8, 9, 9) * 2 + 1)
    assert int(fused.bn.num_batches_tracked) == 3
    fused.eval(), twin.eval()
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    out, ref = fused(x), twin(x)
    assert rel_err(out, ref) < 1e-5
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x] + list(fused.parameters()), grad)
    want = torch.autograd.grad(ref, [x] + list(twin.parameters()), grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-4


def test_input_gradient_in_training():
    torch.manual_seed(1)
    fused = BNActConv(6, 4, 1, activation="none")
    twin = unfused(fused)
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    out, ref = fused(x), twin(x)
    grad = torch.randn_like(out)
    assert rel_err(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x, grad)[0]) < 1e-5


def test_prefix_view_input_and_out_slice():
    """A DenseNet layer: read buf[:, :6], write buf[:, 6:10] of one channels_last buffer."""
    torch.manual_seed(2)
    fused = BNActConv(6, 4, 3, padding=1).eval()
    twin = unfused(fused).eval()
    buf = torch.randn(2, 10, 5, 5).contiguous(memory_format=torch.channels_last)
    expected = twin(buf[:, :6].clone())
    with torch.no_grad():
        result = fused(buf[:, :6], out=buf[:, 6:10])
    assert rel_err(buf[:, 6:10], expected) < 1e-5 and result.data_ptr() == buf[:, 6:10].data_ptr()


def test_without_running_stats_uses_batch_statistics_in_eval():
    fused = BNActConv(4, 4, 3, padding=1)
    fused.bn = nn.BatchNorm2d(4, track_running_stats=False)
    twin = unfused(fused)
    fused.eval(), twin.eval()
    x = torch.randn(3, 4, 6, 6)
    assert rel_err(fused(x), twin(x)) < 1e-5


def test_from_modules_shares_and_checks():
    bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1)
    module = BNActConv.from_modules(bn, conv)
    assert module.bn is bn and module.conv is conv
    with pytest.raises(ValueError, match="integer zero padding"):
        BNActConv.from_modules(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding="same"))
    with pytest.raises(ValueError, match="bn has 5 features but conv has 4 input channels"):
        BNActConv.from_modules(nn.BatchNorm2d(5), nn.Conv2d(4, 4, 3))
