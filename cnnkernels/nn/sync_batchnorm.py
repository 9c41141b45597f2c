"""SyncBatchNorm for the fused modules: batch statistics reduced over a process group.

    model = cnnkernels.nn.convert_sync_batchnorm(model)        # before DistributedDataParallel
    model = torch.nn.parallel.DistributedDataParallel(model)

convert_sync_batchnorm (torch's contract) replaces every BatchNorm of the model, those
inside the fused modules included, by cnnkernels.nn.SyncBatchNorm (torch.nn.SyncBatchNorm's
arguments, parameters, buffers and state_dict keys). In training, with
torch.distributed initialised and more than one process in the group, every BatchNorm
then normalises with the statistics of the whole distributed batch:
- forward: each process computes its per-channel (count, mean, M2) and one all_gather
  combines them (Chan's formula, float64); the running statistics get the unbiased
  variance of the whole batch, so they are identical on every rank;
- backward: one all_reduce of the per-channel sums of grad_out and grad_out * (x - mean);
  the BN weight and bias gradients stay local (DistributedDataParallel averages them),
  exactly as torch.nn.SyncBatchNorm computes them.
A rank with an empty local batch takes part with a zero count. Unlike torch's module,
this one also runs on CPU tensors (gloo). Under synchronisation the fused modules run
their convolution, the synchronised BatchNorm and the residual / activation as separate
torch ops (the statistics need a collective between the convolution and the
normalisation); in eval mode, or in one process, they run the fused ops as before.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from cnnkernels.nn._batch_norm_state import batch_norm_mode

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_group", "sync_batch_norm"]


def sync_group(bn: nn.Module):
    """The process group whose batch `bn` normalises over now, or None: bn is a
    SyncBatchNorm in training mode, torch.distributed is initialised and the group has
    more than one process."""
    if not (isinstance(bn, SyncBatchNorm) and bn.training and dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _global_moments(x: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, biased variance) per channel of x [N, C, ...] (in its statistics
    dtype) over every rank's x."""
    c = x.shape[1]
    local = torch.zeros(3, c, dtype=torch.float64, device=x.device)
    if x.numel():
        var, mean = torch.var_mean(x.transpose(0, 1).reshape(c, -1), dim=1, correction=0)
        count = x.numel() // c
        local[0], local[1], local[2] = count, mean.double(), var.double() * count
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    count = mean = m2 = torch.zeros(c, dtype=torch.float64, device=x.device)
    for part in gathered:  # Chan et al.: merge (count, mean, M2) pairwise
        total = count + part[0]
        delta = part[1] - mean
        safe = total.clamp_min(1)
        mean = mean + delta * part[0] / safe
        m2 = m2 + part[2] + delta * delta * count * part[0] / safe
        count = total
    return count, mean, m2 / count.clamp_min(1)


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        dtype = _stats_dtype(x)
        xs = x.to(dtype)
        count, mean, var = _global_moments(xs, group)
        total = int(count[0].item()) if count.numel() else 0
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {total} over the "
                             f"process group (input size {list(x.shape)} on this rank)")
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * total / (total - 1)).to(running_var.dtype),
                                                    alpha=momentum)
        mean, invstd = mean.to(dtype), torch.rsqrt(var + eps).to(dtype)
        scale = invstd if weight is None else invstd * weight.to(dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = (xs - mean.view(shape)) * scale.view(shape)
        if bias is not None:
            out = out + bias.to(dtype).view(shape)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.group, ctx.total = group, total
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        dtype, shape = mean.dtype, (1, -1) + (1,) * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        dy, xmu = grad_out.to(dtype), x.to(dtype) - mean.view(shape)
        sums = torch.stack([dy.sum(dims), (dy * xmu).sum(dims)]) if x.numel() else \
            torch.zeros(2, x.shape[1], dtype=dtype, device=x.device)
        grad_weight = (sums[1] * invstd).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sums[0].to(weight.dtype if weight is not None else x.dtype) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = sums.clone()
            dist.all_reduce(sums, group=ctx.group)
            mean_dy, mean_dy_xmu = sums[0] / ctx.total, sums[1] / ctx.total
            scale = invstd if weight is None else invstd * weight.to(dtype)
            grad_x = ((dy - mean_dy.view(shape) - xmu * (invstd * invstd * mean_dy_xmu).view(shape))
                      * scale.view(shape)).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def sync_batch_norm(x: torch.Tensor, bn: "SyncBatchNorm", momentum: float, group,
                    update_running_stats: bool = True) -> torch.Tensor:
    """bn(x) with the statistics of the whole distributed batch (x [N, C, ...] local),
    differentiable; the running statistics are updated with `momentum` (num_batches_tracked
    is the caller's, as cnnkernels.nn.functional.batch_norm_mode counts it) unless
    update_running_stats is False."""
    track = update_running_stats and bn.track_running_stats and bn.running_mean is not None
    return _SyncBatchNormFunction.apply(x, bn.weight, bn.bias, bn.running_mean if track else None,
                                        bn.running_var if track else None, bn.eps, momentum, group)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm's twin (same arguments, parameters, buffers and keys) whose
    synchronised path (sync_batch_norm above) runs on CPU tensors too; used as a module
    itself (x [N, C, ...]) and by the fused modules. It is not a torch.nn.SyncBatchNorm
    subclass, which DistributedDataParallel would refuse on CPU modules."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input [N, C, ...], got {x.dim()}D input")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = sync_group(self)
        if group is None:
            return super().forward(x)
        self._check_input_dim(x)
        _, momentum, _, _ = batch_norm_mode(self)
        return sync_batch_norm(x, self, momentum, group)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every torch BatchNorm (1d/2d/3d) in `module`, the root included, replaced by a
    cnnkernels.nn.SyncBatchNorm holding the same parameters and buffers (shared) and
    reducing over `process_group` (None: the default group); returns the module (a new
    one when the root itself is a BatchNorm), as torch.nn.SyncBatchNorm.convert_sync_batchnorm."""
    result = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        result = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                result.weight, result.bias = module.weight, module.bias
        result.running_mean, result.running_var = module.running_mean, module.running_var
        result.num_batches_tracked = module.num_batches_tracked
        result.training = module.training
        if hasattr(module, "qconfig"):
            result.qconfig = module.qconfig
    for name, child in module.named_children():
        result.add_module(name, convert_sync_batchnorm(child, process_group))
    return result
