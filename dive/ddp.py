"""Data-parallel training on torch.distributed: the global batch for the loss, BatchNorm over the
global batch, and full-gallery evaluation split over the ranks.

With a process group of more than one rank every function here is a collective (all ranks call
it, in the same order); otherwise it is the single-process computation, so one code path serves
both and `torchrun --nproc-per-node 1` trains exactly as a plain run.
"""
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import distributed
from .eval.recall import (caption_ranks, image_ranks, mean_metrics, metrics_from_ranks,
                          recall_metrics)
from .retrieval import similarity_matrix


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


def gather_rows(t: Tensor) -> Tensor:
    """Every rank's `t` concatenated along dim 0 in rank order, without gradient; the ranks may
    hold different numbers of rows, and a rank with none may pass a 1-D empty tensor. Returned
    on `t`'s device."""
    if not _parallel():
        return t
    shapes = distributed.gather_object(tuple(t.shape))
    if t.numel() == 0:
        t = t.reshape(0, *max(shapes, key=len)[1:])
    sizes = [s[0] if len(s) == t.dim() else 0 for s in shapes]
    on = distributed.collective_device()
    padded = t.new_zeros((max(sizes), *t.shape[1:]), device=on)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(t.device)


def shard_range(n: int) -> range:
    """This rank's contiguous share of n items (the first n % W ranks take one more)."""
    r, world = distributed.rank(), distributed.world_size()
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


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


def sharded_recall(images: Tensor, captions: Tensor, captions_per_image: int, *,
                   temperature: float = 16.0, coco_1k: bool = False) -> dict:
    """recall_metrics of the (images x captions) smooth-Chamfer matrix, every rank holding all
    the sets: rank r ranks its block of images against every caption and its block of captions
    against every image, so no rank forms more than about 2/W of the matrix, and only the
    integer ranks travel. With coco_1k, also the COCO 1K five-fold mean under "coco_1k" (fold f
    on rank f mod W)."""
    cpi = captions_per_image
    rows, cols = shard_range(images.shape[0]), shard_range(captions.shape[0])
    block = similarity_matrix(images[rows.start:rows.stop], captions, temperature=temperature)
    i2t = gather_rows(image_ranks(block, cpi, rows.start))
    block = similarity_matrix(images, captions[cols.start:cols.stop], temperature=temperature)
    t2i = gather_rows(caption_ranks(block, cpi, cols.start))
    del block
    metrics = metrics_from_ranks(i2t, t2i)
    if coco_1k:
        n, c = images.shape[0] // 5, images.shape[0] // 5 * cpi
        mine = {f: recall_metrics(similarity_matrix(images[f * n:(f + 1) * n],
                                                    captions[f * c:(f + 1) * c],
                                                    temperature=temperature), cpi)
                for f in range(5) if f % distributed.world_size() == distributed.rank()}
        folds = {}
        for part in distributed.gather_object(mine):
            folds.update(part)
        metrics["coco_1k"] = mean_metrics([folds[f] for f in range(5)])
    return metrics
