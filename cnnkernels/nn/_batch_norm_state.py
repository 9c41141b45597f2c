"""What a BatchNorm module's forward would do now, for the code that runs its work in a fused op."""
from __future__ import annotations

import torch
from torch import nn


def batch_norm_mode(bn: nn.BatchNorm2d) -> tuple[bool, float, torch.Tensor | None, torch.Tensor | None]:
    """What nn.BatchNorm2d.forward would do now: (use batch statistics, momentum,
    running_mean, running_var), counting num_batches_tracked as it does."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or bn.running_mean is None
    track = not bn.training or bn.track_running_stats
    return use_batch_stats, momentum, bn.running_mean if track else None, bn.running_var if track else None
