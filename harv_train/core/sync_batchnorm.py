"""BatchNorm over the global batch of a data-parallel run (`distributed.sync_batchnorm`).

Under DistributedDataParallel each rank normalizes its trainable BatchNorm layers with the statistics
of its own share of the batch (8 of 16 images with 2 processes), so two processes train another
network than one process with the same global batch. Synchronized, every rank normalizes with the
mean and variance of the whole global batch, as one process would.

On CUDA that is `torch.nn.SyncBatchNorm`. Its forward refuses CPU tensors (torch 2.14: it needs
`torch.batch_norm_stats`, which has no CPU kernel), so on the CPU (gloo) `GlobalBatchNorm2d` does the
same with one all_reduce of per-channel sum, sum of squares and count in the forward and one of the
two gradient sums in the backward.

Only the trainable part is converted: the frozen prefix runs in eval mode (its folded copy), where
nothing is synchronized anyway. A converted layer keeps the same parameters and buffers (the same
tensor objects: the optimizer's references stay valid) and the same state-dict keys, so checkpoints
remain plain BatchNorm state dicts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _GlobalBatchNormFunction(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with mean and (biased) var over every rank's x.

    Returns y and, without gradient, the global mean and unbiased variance (for the running statistics).
    Backward: rank r's dy is the gradient of its own loss L_r; the input gradient it returns is that of
    sum_r L_r through the shared statistics (the two per-channel sums of dy reduced over ranks, as
    torch.nn.SyncBatchNorm does), and DistributedDataParallel's averaging of parameter gradients then
    gives the gradient of the global mean loss. weight and bias get this rank's own share.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        # Squares and sums in float64: the variance is the mean square minus the squared mean, which
        # cancels where a channel's spread is small against its mean.
        count = torch.full((1,), x.numel() // channels, dtype=torch.float64, device=x.device)
        x64 = x.double()
        stats = torch.cat([count, x64.sum(dims), (x64 * x64).sum(dims)])
        del x64
        dist.all_reduce(stats, group=group)
        n, total, squares = stats[0], stats[1 : 1 + channels], stats[1 + channels :]
        mean = total / n
        var = (squares / n - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps).to(x.dtype)
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd.view(shape)
        y = xhat if weight is None else xhat * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.n, ctx.group = float(n), group
        unbiased_var = var * (n / (n - 1)) if n > 1 else var
        ctx.mark_non_differentiable(mean, unbiased_var)
        return y, mean, unbiased_var

    @staticmethod
    def backward(ctx, dy, _mean_grad, _var_grad):
        xhat, weight, invstd = ctx.saved_tensors
        channels = xhat.shape[1]
        dims = [0, *range(2, xhat.dim())]
        shape = [1, channels] + [1] * (xhat.dim() - 2)
        local = torch.cat([dy.sum(dims, dtype=torch.float64), (dy * xhat).sum(dims, dtype=torch.float64)])
        grad_bias, grad_weight = local[:channels].to(dy.dtype), local[channels:].to(dy.dtype)
        sums = local.clone()
        dist.all_reduce(sums, group=ctx.group)
        mean_dy = (sums[:channels] / ctx.n).to(dy.dtype).view(shape)
        mean_dy_xhat = (sums[channels:] / ctx.n).to(dy.dtype).view(shape)
        scale = invstd if weight is None else invstd * weight
        dx = scale.view(shape) * (dy - mean_dy - xhat * mean_dy_xhat)
        if weight is None:
            return dx, None, None, None, None
        return dx, grad_weight, grad_bias, None, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics are those of every rank's samples together (CPU, gloo).

    Same parameters, buffers and state-dict keys as BatchNorm2d; in eval mode, or with no process group
    of more than one rank, it is BatchNorm2d."""

    process_group: dist.ProcessGroup | None = None

    @classmethod
    def replacing(cls, bn: nn.BatchNorm2d, process_group: dist.ProcessGroup | None = None) -> "GlobalBatchNorm2d":
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        # The very tensors of `bn`: the optimizer holds these parameters.
        for name, tensor in [*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)]:
            setattr(new, name, tensor)
        new.train(bn.training)
        new.process_group = process_group
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not self.training or group is None or dist.get_world_size(group) == 1:
            return super().forward(x)
        self._check_input_dim(x)
        y, mean, unbiased_var = _GlobalBatchNormFunction.apply(x, self.weight, self.bias, self.eps, group)
        if self.track_running_stats:  # as nn.BatchNorm2d: momentum, or the cumulative mean when None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)
        return y


def convert_batchnorm(module: nn.Module, device: torch.device) -> tuple[nn.Module, int]:
    """`module` with every BatchNorm2d in it synchronized (in place below it; a BatchNorm2d itself is
    replaced, so use the module returned) and how many were converted."""
    return _convert(module, device.type == "cuda")


def _convert(module: nn.Module, on_cuda: bool) -> tuple[nn.Module, int]:
    if isinstance(module, (nn.SyncBatchNorm, GlobalBatchNorm2d)):
        return module, 0
    if type(module) is nn.BatchNorm2d:
        if on_cuda:
            return nn.SyncBatchNorm.convert_sync_batchnorm(module), 1
        return GlobalBatchNorm2d.replacing(module), 1
    converted = 0
    for name, child in module.named_children():
        new, n = _convert(child, on_cuda)
        if new is not child:
            setattr(module, name, new)
        converted += n
    return module, converted


def synchronize_batchnorm(model: nn.Module, n_frozen: int, device: torch.device) -> int:
    """Make the trainable BatchNorm layers of `model` (after its `n_frozen` frozen feature blocks, and
    the head) normalize over the global batch: torch.nn.SyncBatchNorm on CUDA, GlobalBatchNorm2d on
    the CPU. In place; idempotent; returns how many layers were converted."""
    from harv_train.core.freezing import feature_blocks

    on_cuda = device.type == "cuda"
    blocks = feature_blocks(model)
    converted = 0
    for i in range(n_frozen, len(blocks)):
        blocks[i], n = _convert(blocks[i], on_cuda)
        converted += n
    for name, child in model.named_children():
        if child is not blocks:  # the head (avgpool, classifier)
            new, n = _convert(child, on_cuda)
            if new is not child:
                setattr(model, name, new)
            converted += n
    return converted
