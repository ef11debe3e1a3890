"""Data-parallel training on torch.distributed: the global batch for the loss, BatchNorm over the
global batch; the evaluation split over the ranks is dive.eval.recall.sharded_recall.

With a process group of more than one rank every function here is a collective (all ranks call
it, in the same order); otherwise it is the single-process computation, so one code path serves
both and `torchrun --nproc-per-node 1` trains exactly as a plain run.
"""
import torch
from torch import Tensor, nn

from . import distributed
# Re-exported for the trainer: the row helpers live with the other process-group helpers, the
# sharded recall with the other recall code.
from .distributed import gather_rows, shard_range  # noqa: F401
from .eval.recall import sharded_recall  # noqa: F401


def _parallel() -> bool:
    return distributed.world_size() > 1


def gather_grad(t: Tensor) -> Tensor:
    """Every rank's `t` (same shape on each) concatenated along dim 0 in rank order, with the
    gradient flowing back to each rank's own part (torch.distributed.nn's all_gather).

    Each rank then computes the same loss on the whole global batch; the all_gather backward
    sums the ranks' (equal) gradients, W times the true one, and DistributedDataParallel's mean
    over the ranks divides the W back out: the parameter gradients are those of one process on
    the concatenated batch.
    """
    if not _parallel():
        return t
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(t))


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over dim 1 of (N, C, ...) inputs whose training statistics cover the global
    batch of all ranks, on CPU (gloo) as on GPU; `torch.nn.SyncBatchNorm` is GPU-only. Outside
    training or without a process group of several ranks it is the plain BatchNorm.

    Each rank sends its count, mean and sum of squared deviations, combined exactly (Chan et
    al.), through an all_gather with gradient: the output and its gradients equal one
    BatchNorm over the concatenated batch. Statistics are taken in float32 or wider.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm expects (N, {self.num_features}, ...) input, got "
                             f"{tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _parallel()):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        work = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(work)
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        count = x.numel() // c
        # A rank with no rows still joins the all_gather, with weight 0.
        mean = xf.sum(dims) / max(count, 1)
        m2 = ((xf - mean.view(shape)) ** 2).sum(dims)
        every = gather_grad(torch.cat([mean.new_tensor([count]), mean, m2])[None])
        counts, means, m2s = every[:, :1], every[:, 1:c + 1], every[:, c + 1:]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total.clamp(min=1)
        var = (m2s + counts * (means - global_mean) ** 2).sum(0) / total.clamp(min=1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = (self.momentum if self.momentum is not None
                          else 1.0 / float(self.num_batches_tracked))
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(global_mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = (xf - global_mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm replaced by a SyncBatchNorm sharing its parameters and
    buffers (same state-dict keys, so checkpoints load either way)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and \
            not isinstance(module, SyncBatchNorm):
        synced = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        if module.track_running_stats:
            synced.running_mean = module.running_mean
            synced.running_var = module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, sync_batchnorm(child))
    return module
