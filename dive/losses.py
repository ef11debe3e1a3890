"""DivE training losses: hardest-negative triplet loss on set similarities plus the regularisers.

What the reference implementation (github.com/kdwonn/DivE, `loss.py`, `train_eval_coco.sh`)
trains with, and what `DiveLoss` reproduces by default:

    total = triplet(smooth_chamfer(img, cap))              (max violation, margin 0.2, mean)
          + 0.01 * mmd_rbf(img elements, cap elements)     (one kernel, exp(-||a - b|| / 2))
          + 0.01 * [uniformity(img sets) + uniformity(cap sets)]   (within each set)

In the reference, what spreads a set's K elements apart is the within-set uniformity term
(`unif_weight`; with `--unif_residual` on the set prediction module's residual features). Its
Gram-matrix `diversity_loss` exists but is switched off (`div_weight` is not a command-line
option there, so it is always 0), hence `diversity_weight=0` by default.
"""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import bool_mask, finite_number, mask_rows_nonempty
from .ops import smooth_chamfer

REDUCTIONS = ("sum", "mean", "triplets")
# exp(-||a - b|| / 2): the reference calls mmd_rbf_loss(..., gamma=0.5) on unsquared distances.
DEFAULT_SIGMAS = (2.0,)


# ----------------------------------------------------------------------------- argument checks


def _check_tensor(name: str, t, dims: int) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")


def _check_float(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_ids(name: str, ids, length: int) -> None:
    _check_tensor(name, ids, 1)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.shape[0] != length:
        raise ValueError(f"{name} has {ids.shape[0]} entries but sim has {length} along its "
                         "matching dimension")


def _check_set_mask(name: str, mask, sets: Tensor) -> None:
    bool_mask(name, mask, sets.shape[:2], None, "(N, set_size)")
    mask_rows_nonempty(name, mask)


def _as_sets(name: str, x) -> Tensor:
    """(N, K, D) as is; (N, D) as one set of N elements."""
    if not isinstance(x, Tensor) or x.dim() not in (2, 3):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (N, K, D) or (N, D) tensor, got {shape}")
    _check_float(name, x)
    return x if x.dim() == 3 else x[None]


# ----------------------------------------------------------------------------- triplet


def triplet_loss(sim: Tensor, image_ids: Tensor, caption_image_ids: Tensor, *,
                 margin: float = 0.2, hardest: bool = True, reduction: str = "sum") -> Tensor:
    """Bidirectional triplet ranking loss over a batch's similarity matrix (VSE++ / DivE).

    Args:
        sim: (B_img, B_cap) similarities, rows images, columns captions.
        image_ids: (B_img,) integer id of each row's image (an id may repeat).
        caption_image_ids: (B_cap,) integer id of the image each caption describes; every id
            must occur in image_ids.
        margin: the ranking margin alpha.
        hardest: True takes the hardest negative (max violation, VSE++); False sums over all
            negatives (VSE0).
        reduction: "sum" over positive pairs, "mean" over positive pairs (the reference's with
            hardest), or "triplets": in each direction the mean over its triplets (positive
            pair, negative), the two directions added (the reference's without hardest).

    Caption j is positive for image row i iff caption_image_ids[j] == image_ids[i]; every
    positive is excluded from the negatives. For each positive pair (i, j), with s = sim,

        i2t(i, j) = [alpha + max_{j' neg for i} s(i, j') - s(i, j)]_+
        t2i(i, j) = [alpha + max_{i' neg for j} s(i', j) - s(i, j)]_+

    (max replaced by a sum over negatives when hardest=False), and the loss is the sum (or the
    mean) over positive pairs of i2t + t2i. A row or column with no negative contributes 0.
    The reference's "mean" is mean(i2t) + mean(t2i) over its positive pairs: the same number.
    Its non-hardest variant averages over triplets instead of summing over negatives:
    reduction="triplets" (with hardest, one triplet per positive pair: the same as "mean").

    Returns:
        A scalar tensor of sim's dtype.
    """
    _check_tensor("sim", sim, 2)
    _check_float("sim", sim)
    n_img, n_cap = sim.shape
    _check_ids("image_ids", image_ids, n_img)
    _check_ids("caption_image_ids", caption_image_ids, n_cap)
    margin = finite_number("margin", margin, positive=False)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not bool(torch.isfinite(sim).all()):
        raise ValueError("sim has non-finite values (NaN or inf)")
    positive = image_ids.to(sim.device)[:, None] == caption_image_ids.to(sim.device)[None, :]
    orphans = ~positive.any(0)
    if bool(orphans.any()):
        j = int(orphans.nonzero()[0, 0])
        raise ValueError(f"caption_image_ids: caption {j} has image id "
                         f"{int(caption_image_ids[j])}, which no row of image_ids holds")

    rows, cols = positive.nonzero(as_tuple=True)
    pos_sim = sim[rows, cols]
    # One row of candidates per positive pair: (P, B_cap) for image->text, (P, B_img) back.
    i2t_neg, t2i_neg = ~positive[rows], ~positive[:, cols].t()
    i2t = _violations(sim[rows], i2t_neg, pos_sim, margin, hardest)
    t2i = _violations(sim[:, cols].t(), t2i_neg, pos_sim, margin, hardest)
    if reduction == "triplets" and not hardest:
        return (i2t.sum() / max(1, int(i2t_neg.sum())) + t2i.sum() / max(1, int(t2i_neg.sum())))
    total = (i2t + t2i).sum()
    return total / max(1, rows.numel()) if reduction != "sum" else total


def _violations(candidates: Tensor, negative: Tensor, pos_sim: Tensor, margin: float,
                hardest: bool) -> Tensor:
    """(P,) hinge per positive pair from its (P, N) candidate similarities and negative mask."""
    hinge = (margin + candidates - pos_sim[:, None]).clamp(min=0)
    # Zeroing (not -inf filling) the non-negatives keeps rows without a negative at 0 and
    # finite: hinges are >= 0, so a zero never beats a real violation in the max.
    hinge = hinge.masked_fill(~negative, 0)
    if hinge.shape[1] == 0:  # an empty batch side: amax refuses a zero-size dimension
        return hinge.sum(1)
    return hinge.amax(1) if hardest else hinge.sum(1)


# ----------------------------------------------------------------------------- MMD


def mmd_rbf(x: Tensor, y: Tensor, *, sigmas: Optional[Sequence[float]] = None) -> Tensor:
    """Biased (V-statistic) squared MMD between the elements of two embedding sets.

    Args:
        x: (..., D) embeddings, flattened to (Nx, D) (e.g. every element of every image set).
        y: (..., D) embeddings, flattened to (Ny, D).
        sigmas: bandwidths; default (2.0,), the reference's single gamma = 0.5.

    With k(a, b) = mean_s exp(-||a - b|| / s) (the reference's "rbf" kernel takes the unsquared
    Euclidean distance, so it is a Laplacian kernel; matched here),

        MMD^2 = mean_{a, a' in x} k(a, a') - 2 mean_{a in x, b in y} k(a, b)
                + mean_{b, b' in y} k(b, b')

    where the means include the a = a' terms, as the reference does (biased estimate, >= 0).

    Returns:
        A scalar tensor (float32 for half inputs, else the inputs' dtype).
    """
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor) or t.dim() < 1 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty tensor of shape (..., D)")
        _check_float(name, t)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must have the same embedding size D, got {x.shape[-1]} and "
                         f"{y.shape[-1]}")
    if sigmas is None:
        sigmas = DEFAULT_SIGMAS
    if isinstance(sigmas, (int, float)):
        sigmas = (sigmas,)
    if len(sigmas) == 0:
        raise ValueError("sigmas must hold at least one bandwidth")
    sigmas = [finite_number("sigmas", s, positive=True) for s in sigmas]
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    xf = x.reshape(-1, x.shape[-1]).to(dtype)
    yf = y.reshape(-1, y.shape[-1]).to(dtype)

    def kernel_mean(a, b):
        dist = torch.cdist(a, b)
        return sum(torch.exp(-dist / s).mean() for s in sigmas) / len(sigmas)

    return kernel_mean(xf, xf) - 2 * kernel_mean(xf, yf) + kernel_mean(yf, yf)


# ----------------------------------------------------------------------------- set regularisers


def _pair_mask(sets: Tensor, mask: Optional[Tensor]) -> Tensor:
    """(N, K, K) bool: the distinct pairs i < j of valid elements within each set."""
    k = sets.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=sets.device).triu(1)
    if mask is None:
        return upper.expand(sets.shape[0], k, k)
    mask = mask.to(sets.device)
    return upper & mask[:, :, None] & mask[:, None, :]


def _mean_over_sets(per_set: Tensor, has_pairs: Tensor) -> Tensor:
    """Mean over the sets that have a pair; 0 (still in the graph) when none does."""
    count = has_pairs.sum()
    return (per_set * has_pairs).sum() / count.clamp(min=1)


def uniformity_loss(x: Tensor, *, t: float = 2.0, mask: Optional[Tensor] = None) -> Tensor:
    """Within-set uniformity: how close a set's elements sit, averaged over sets (DivE's).

    Args:
        x: (N, K, D) sets (a (M, D) tensor is one set of M elements).
        t: the Gaussian potential's scale (2 in the reference and in Wang & Isola).
        mask: optional bool (N, K); False marks a padded element, left out of every pair.

    For each set b with pairs P_b = {(i, j): i < j, both valid},

        U_b = 1/|P_b| * sum_{(i, j) in P_b} exp(-t ||x_bi - x_bj||^2),   loss = mean_b U_b

    over the sets that have a pair (0 when none has). This is the reference's
    `batchwise_uniformity_loss`: Wang & Isola's Gaussian potential, but over the K elements of
    each set rather than over the whole batch, and without their log (the reference takes none).

    Returns:
        A scalar tensor.
    """
    sets = _as_sets("x", x)
    t = finite_number("t", t, positive=True)
    _check_set_mask("mask", mask, sets)
    gram = sets @ sets.transpose(1, 2)
    sq_norms = gram.diagonal(dim1=1, dim2=2)
    # The Gram form is fine here: no square root, so no gradient blow-up at zero distance.
    sq_dist = (sq_norms[:, :, None] + sq_norms[:, None, :] - 2 * gram).clamp(min=0)
    pairs = _pair_mask(sets, mask)
    n_pairs = pairs.sum((1, 2))
    per_set = (torch.exp(-t * sq_dist) * pairs).sum((1, 2)) / n_pairs.clamp(min=1)
    return _mean_over_sets(per_set, n_pairs > 0)


def diversity_loss(sets: Tensor, *, mask: Optional[Tensor] = None) -> Tensor:
    """The reference's Gram diversity penalty: off-diagonal cosine mass within each set.

    Args:
        sets: (N, K, D) sets; each element is L2-normalised here first.
        mask: optional bool (N, K); False marks a padded element.

    For each set b with k_b valid elements and cosine Gram matrix G_b,

        div_b = ||G_b - diag(G_b)||_F / k_b^2,   loss = mean_b div_b

    over sets with k_b >= 2 (0 when none has; a single-element set has nothing to diversify,
    as in the reference). It is 0 for orthogonal elements and grows as they collapse. The
    reference defines it (PVSE's) but trains with weight 0; see the module docstring.

    Returns:
        A scalar tensor.
    """
    sets = _as_sets("sets", sets)
    _check_set_mask("mask", mask, sets)
    unit = F.normalize(sets, dim=-1)
    gram = unit @ unit.transpose(1, 2)
    pairs = _pair_mask(sets, mask)
    off_diagonal = pairs | pairs.transpose(1, 2)
    gram = gram * off_diagonal
    if mask is None:
        count = torch.full((sets.shape[0],), sets.shape[1], device=sets.device)
    else:
        count = mask.to(sets.device).sum(1)
    per_set = torch.linalg.vector_norm(gram, dim=(1, 2)) / count.clamp(min=1).to(gram.dtype) ** 2
    return _mean_over_sets(per_set, count >= 2)


# ----------------------------------------------------------------------------- combined


@dataclass
class LossConfig:
    """Hyper-parameters of `DiveLoss`; the defaults are the reference's COCO run.

    reduction is the triplet term's: the reference averages over positive pairs ("mean"),
    which is what the 0.01 regulariser weights are balanced against; "triplets" averages over
    (pair, negative) triplets, as the reference does when hardest is off.
    """
    margin: float = 0.2
    temperature: float = 16.0
    mmd_weight: float = 0.01
    uniformity_weight: float = 0.01
    diversity_weight: float = 0.0
    hardest: bool = True
    reduction: str = "mean"


class DiveLoss(nn.Module):
    """Triplet loss on smooth-Chamfer similarities plus weighted MMD, uniformity and diversity.

        total = triplet + mmd_weight * mmd_rbf(img elements, cap elements)
                + uniformity_weight * (uniformity(img) + uniformity(cap))
                + diversity_weight * (diversity(img) + diversity(cap))

    A regulariser with weight 0 is not computed and not reported. As in the reference's
    `--unif_residual`, uniformity and diversity can be taken on other per-element features
    (the set prediction module's residual branch) given as img_residuals / cap_residuals,
    L2-normalised here; by default they use the sets themselves.
    """

    def __init__(self, config: Optional[LossConfig] = None):
        super().__init__()
        self.config = LossConfig() if config is None else config
        if self.config.reduction not in REDUCTIONS:
            raise ValueError(f"config.reduction must be one of {REDUCTIONS}, got "
                             f"{self.config.reduction!r}")
        for name in ("mmd_weight", "uniformity_weight", "diversity_weight"):
            if finite_number(f"config.{name}", getattr(self.config, name), positive=False) < 0:
                raise ValueError(f"config.{name} must be >= 0")

    def forward(self, img_sets: Tensor, cap_sets: Tensor, image_ids: Tensor,
                caption_image_ids: Tensor, *, img_mask: Optional[Tensor] = None,
                cap_mask: Optional[Tensor] = None, img_residuals: Optional[Tensor] = None,
                cap_residuals: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        """img_sets (B_img, K, D), cap_sets (B_cap, K', D), ids as in `triplet_loss`, masks
        bool (B, K) as in `smooth_chamfer`, residuals shaped like their sets.

        Returns:
            (total, terms): the scalar loss, and each unweighted term ("triplet", and "mmd",
            "uniformity", "diversity" when weighted) detached, for logging.
        """
        cfg = self.config
        _check_tensor("img_sets", img_sets, 3)
        _check_tensor("cap_sets", cap_sets, 3)
        _check_set_mask("img_mask", img_mask, img_sets)
        _check_set_mask("cap_mask", cap_mask, cap_sets)
        sim = smooth_chamfer(img_sets, cap_sets, temperature=cfg.temperature, x_mask=img_mask,
                             y_mask=cap_mask)
        terms = {"triplet": triplet_loss(sim, image_ids, caption_image_ids, margin=cfg.margin,
                                         hardest=cfg.hardest, reduction=cfg.reduction)}
        total = terms["triplet"]
        if cfg.mmd_weight > 0:
            img_elems = img_sets if img_mask is None else img_sets[img_mask]
            cap_elems = cap_sets if cap_mask is None else cap_sets[cap_mask]
            terms["mmd"] = mmd_rbf(img_elems, cap_elems)
            total = total + cfg.mmd_weight * terms["mmd"]
        img_feats = _residual_or_sets("img_residuals", img_residuals, img_sets)
        cap_feats = _residual_or_sets("cap_residuals", cap_residuals, cap_sets)
        if cfg.uniformity_weight > 0:
            terms["uniformity"] = (uniformity_loss(img_feats, mask=img_mask)
                                   + uniformity_loss(cap_feats, mask=cap_mask))
            total = total + cfg.uniformity_weight * terms["uniformity"]
        if cfg.diversity_weight > 0:
            terms["diversity"] = (diversity_loss(img_feats, mask=img_mask)
                                  + diversity_loss(cap_feats, mask=cap_mask))
            total = total + cfg.diversity_weight * terms["diversity"]
        return total, {name: value.detach().float() for name, value in terms.items()}


def _residual_or_sets(name: str, residuals: Optional[Tensor], sets: Tensor) -> Tensor:
    if residuals is None:
        return sets
    if not isinstance(residuals, Tensor) or tuple(residuals.shape) != tuple(sets.shape):
        shape = tuple(residuals.shape) if isinstance(residuals, Tensor) else type(residuals)
        raise ValueError(f"{name} must have its sets' shape {tuple(sets.shape)}, got {shape}")
    return F.normalize(residuals, dim=-1)
