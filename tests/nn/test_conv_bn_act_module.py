"""cnnkernels.nn.ConvBNAct behaves like nn.Conv2d + nn.BatchNorm2d + ReLU, keys included."""
import pytest
import torch
from torch import nn

from cnnkernels.nn import ConvBNAct
from helpers import check_train_steps, rel_err


def unfused(module: ConvBNAct) -> nn.Sequential:
    twin = nn.Sequential()
    twin.conv = nn.Conv2d(module.conv.in_channels, module.conv.out_channels, module.conv.kernel_size,
                          module.conv.stride, module.conv.padding, module.conv.dilation, module.conv.groups,
                          bias=module.conv.bias is not None)
    twin.bn = nn.BatchNorm2d(module.bn.num_features, module.bn.eps, module.bn.momentum)
    twin.act = nn.ReLU() if module.activation == "relu" else nn.Identity()
    twin.load_state_dict(module.state_dict())
    return twin


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("groups", [1, 4])
def test_matches_unfused_modules_over_train_steps_and_eval(groups, momentum):
    torch.manual_seed(0)
    fused = ConvBNAct(8, 12, 3, stride=2, padding=1, groups=groups, momentum=momentum)
    twin = unfused(fused)
    assert list(fused.state_dict()) == list(twin.state_dict())
    check_train_steps(fused, twin, lambda: torch.randn(4, 8, 9, 9))
    fused.eval(), twin.eval()
    x = torch.randn(2, 8, 9, 9)
    assert rel_err(fused(x), twin(x)) < 1e-5


def test_residual_and_no_activation():
    fused = ConvBNAct(6, 6, 1, activation="none").eval()
    twin = unfused(fused).eval()
    x, residual = torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5)
    assert rel_err(fused(x, residual=residual), twin.bn(twin.conv(x)) + residual) < 1e-5


def test_without_running_stats_uses_batch_statistics_in_eval():
    fused = ConvBNAct(4, 4, 3, padding=1)
    fused.bn = nn.BatchNorm2d(4, track_running_stats=False)
    twin = unfused(ConvBNAct(4, 4, 3, padding=1))
    twin.conv.load_state_dict(fused.conv.state_dict())
    twin.bn = nn.BatchNorm2d(4, track_running_stats=False)
    fused.eval(), twin.eval()
    x = torch.randn(3, 4, 6, 6)
    assert rel_err(fused(x), torch.relu(twin.bn(twin.conv(x)))) < 1e-5


def test_from_modules_rejects_string_padding():
    with pytest.raises(ValueError, match="integer zero padding"):
        ConvBNAct.from_modules(nn.Conv2d(4, 4, 3, padding="same"), nn.BatchNorm2d(4))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_track_running_stats_switched_off_after_construction(training, momentum):
    """Switching bn.track_running_stats off on a module that has its buffers (a common way to
    stop the statistics moving) acts as in torch: training uses batch statistics and leaves
    the buffers and the batch count alone; eval still normalises by the buffers."""
    torch.manual_seed(1)
    fused = ConvBNAct(4, 6, 3, padding=1, momentum=momentum)
    twin = unfused(fused)
    for module in (fused, twin):
        module.train(training)
        bn = module.bn
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.track_running_stats = False
    twin.load_state_dict(fused.state_dict())
    x = torch.randn(3, 4, 7, 7) * 2 + 1
    assert rel_err(fused(x), twin(x)) < 1e-5
    for key, value in twin.bn.state_dict().items():
        assert torch.equal(fused.bn.state_dict()[key], value), key


@pytest.mark.parametrize("momentum", [0.1, None])
def test_eval_leaves_statistics_and_batch_count_alone(momentum):
    fused = ConvBNAct(4, 6, 3, padding=1, momentum=momentum)
    fused.train()
    fused(torch.randn(2, 4, 5, 5))
    before = {k: v.clone() for k, v in fused.bn.state_dict().items()}
    fused.eval()
    fused(torch.randn(2, 4, 5, 5))
    for key, value in fused.bn.state_dict().items():
        assert torch.equal(before[key], value), key
    assert fused.bn.num_batches_tracked.item() == 1


def test_cumulative_average_without_a_batch_count_acts_as_torch():
    """momentum None with num_batches_tracked removed (None): torch's training forward then
    averages with factor 0.0, so the running statistics stay as they are."""
    torch.manual_seed(2)
    fused = ConvBNAct(4, 6, 3, padding=1, momentum=None)
    twin = unfused(fused)
    twin.load_state_dict(fused.state_dict())
    for module in (fused, twin):
        module.bn.running_mean.uniform_(-1, 1)
        module.bn.num_batches_tracked = None
    twin.bn.running_mean.copy_(fused.bn.running_mean)
    x = torch.randn(3, 4, 7, 7) * 2 + 1
    assert rel_err(fused(x), twin(x)) < 1e-5
    assert torch.equal(fused.bn.running_mean, twin.bn.running_mean)
    assert torch.equal(fused.bn.running_var, twin.bn.running_var)
