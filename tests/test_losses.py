"""dive.losses against direct float64 computations written as explicit loops over pairs."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from dive.losses import (DiveLoss, LossConfig, diversity_loss, mmd_rbf, triplet_loss,
                         uniformity_loss)
from sets import random_mask as shared_random_mask
from sets import unit_sets as shared_unit_sets


# float64 unless a test says otherwise: the direct formulas below are the references.
unit_sets = partial(shared_unit_sets, dtype=torch.float64)


def grads_of(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def assert_same_value_and_grads(fn, direct, tensors, msg):
    got, got_grads = grads_of(fn, *tensors)
    want, want_grads = grads_of(direct, *tensors)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=msg)
    for g, w in zip(got_grads, want_grads):
        assert torch.isfinite(g).all(), msg
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=msg)


# ----------------------------------------------------------------------------- direct versions


def triplet_direct(sim, image_ids, caption_image_ids, margin, hardest, reduction):
    n_img, n_cap = sim.shape
    img, cap = image_ids.tolist(), caption_image_ids.tolist()
    terms = []
    for i in range(n_img):
        for j in range(n_cap):
            if img[i] != cap[j]:
                continue
            i2t = [(margin + sim[i, jn] - sim[i, j]).clamp(min=0)
                   for jn in range(n_cap) if cap[jn] != img[i]]
            t2i = [(margin + sim[i_n, j] - sim[i, j]).clamp(min=0)
                   for i_n in range(n_img) if img[i_n] != cap[j]]
            for violations in (i2t, t2i):
                if violations:
                    terms.append(max(violations) if hardest else sum(violations))
    total = sum(terms) if terms else sim.sum() * 0
    if reduction == "mean":
        pairs = sum(a == b for a in img for b in cap)
        total = total / pairs
    return total


def mmd_direct(x, y, sigmas):
    xs = list(x.reshape(-1, x.shape[-1]))
    ys = list(y.reshape(-1, y.shape[-1]))

    def k(a, b):
        if a is b:  # the same element: distance 0 (and no 0/0 in the norm's gradient)
            return torch.ones((), dtype=a.dtype)
        dist = torch.sqrt(((a - b) ** 2).sum())
        return sum(torch.exp(-dist / s) for s in sigmas) / len(sigmas)

    def mean_k(us, vs):
        return sum(k(u, v) for u in us for v in vs) / (len(us) * len(vs))

    return mean_k(xs, xs) - 2 * mean_k(xs, ys) + mean_k(ys, ys)


def valid_elements(sets, mask, b):
    return [sets[b, i] for i in range(sets.shape[1]) if mask is None or bool(mask[b, i])]


def uniformity_direct(sets, t, mask=None):
    per_set = []
    for b in range(sets.shape[0]):
        elems = valid_elements(sets, mask, b)
        pots = [torch.exp(-t * ((elems[i] - elems[j]) ** 2).sum())
                for i in range(len(elems)) for j in range(i + 1, len(elems))]
        if pots:
            per_set.append(sum(pots) / len(pots))
    return sum(per_set) / len(per_set) if per_set else sets.sum() * 0


def diversity_direct(sets, mask=None):
    per_set = []
    for b in range(sets.shape[0]):
        elems = [e / e.norm() for e in valid_elements(sets, mask, b)]
        k = len(elems)
        if k < 2:
            continue
        sq = sum((elems[i] @ elems[j]) ** 2 for i in range(k) for j in range(k) if i != j)
        per_set.append(torch.sqrt(sq) / k ** 2)
    return sum(per_set) / len(per_set) if per_set else sets.sum() * 0


def smooth_chamfer_direct(x, y, temperature, x_mask=None, y_mask=None):
    rows = []
    for a in range(x.shape[0]):
        row = []
        for b in range(y.shape[0]):
            xs, ys = valid_elements(x, x_mask, a), valid_elements(y, y_mask, b)
            cos = [[u @ v for v in ys] for u in xs]
            lse_x = [torch.logsumexp(temperature * torch.stack(r), 0) for r in cos]
            lse_y = [torch.logsumexp(temperature * torch.stack([r[j] for r in cos]), 0)
                     for j in range(len(ys))]
            row.append((sum(lse_x) / len(xs) + sum(lse_y) / len(ys)) / (2 * temperature))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def batch_ids(n_img, captions_per_image):
    """Image ids with repeats (an image in two rows) and a shuffled caption order."""
    ids = torch.randint(0, n_img - 1, (n_img,))  # n_img rows, n_img - 1 values: a repeat
    ids[:2] = torch.tensor([0, 1])  # and at least two images, so there are negatives
    image_ids = ids[torch.randperm(n_img)] * 7 + 3  # ids are labels, not row indices
    caption_ids = image_ids.unique().repeat_interleave(captions_per_image)
    return image_ids, caption_ids[torch.randperm(caption_ids.numel())]


# ----------------------------------------------------------------------------- triplet


@pytest.mark.parametrize("hardest", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_triplet_matches_direct_loops(seed, hardest, reduction):
    image_ids, caption_ids = batch_ids(7, 3)
    sim = torch.rand(7, caption_ids.numel(), dtype=torch.float64) * 2 - 1
    assert_same_value_and_grads(
        lambda s: triplet_loss(s, image_ids, caption_ids, margin=0.3, hardest=hardest,
                               reduction=reduction),
        lambda s: triplet_direct(s, image_ids, caption_ids, 0.3, hardest, reduction),
        (sim,), f"hardest={hardest} reduction={reduction} seed={seed}")


def test_triplet_hardest_negative_skips_repeated_image_rows():
    # Rows 0 and 1 are the same image (id 5). Caption 0 scores 0.9 with row 1: a diagonal mask
    # would take that as caption 0's hardest negative; it is a positive, so row 2 (0.4) is.
    image_ids = torch.tensor([5, 5, 7])
    caption_ids = torch.tensor([5, 5, 7, 7])
    sim = torch.tensor([[0.5, 0.6, 0.1, 0.55],
                        [0.9, 0.3, 0.2, 0.0],
                        [0.4, 0.35, 0.8, 0.7]], dtype=torch.float64)
    m = 0.2
    # Hardest negatives: rows 0, 1, 2 -> 0.55, 0.2, 0.4; captions 0..3 -> 0.4, 0.35, 0.2, 0.55.
    # (i2t, t2i) per positive pair: (0,0) 0.25, 0.1; (0,1) 0.15, 0; (1,0) 0, 0; (1,1) 0.1, 0.25;
    # (2,2) 0, 0; (2,3) 0, 0.05. Taking row 1 as a negative of caption 0 would add 0.5.
    want = 0.9
    got = triplet_loss(sim, image_ids, caption_ids, margin=m)
    assert math.isclose(got.item(), want, abs_tol=1e-12)
    mean = triplet_loss(sim, image_ids, caption_ids, margin=m, reduction="mean")
    assert math.isclose(mean.item(), want / 6, abs_tol=1e-12)


def test_triplet_row_without_negative_is_zero_and_finite(seed):
    # Row 0 (id 0) has every caption as a positive; row 1 is no caption's image.
    image_ids = torch.tensor([0, 1])
    caption_ids = torch.tensor([0, 0, 0])
    sim = torch.randn(2, 3, dtype=torch.float64).requires_grad_()
    loss = triplet_loss(sim, image_ids, caption_ids, margin=0.2)
    loss.backward()
    want = sum(max(0.0, 0.2 + sim[1, j].item() - sim[0, j].item()) for j in range(3))
    assert math.isclose(loss.item(), want, abs_tol=1e-12), seed
    assert torch.isfinite(sim.grad).all(), seed
    # A batch of one image: nothing is a negative anywhere.
    lone = torch.randn(1, 4, requires_grad=True)
    zero = triplet_loss(lone, torch.tensor([3]), torch.tensor([3, 3, 3, 3]), reduction="mean")
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(lone.grad, torch.zeros_like(lone))
    empty = torch.zeros(2, 0, requires_grad=True)
    assert triplet_loss(empty, torch.tensor([0, 1]), torch.tensor([], dtype=torch.long),
                        reduction="mean").item() == 0.0


def test_triplet_float32_close_to_float64(seed):
    image_ids, caption_ids = batch_ids(16, 5)
    sim = torch.rand(16, caption_ids.numel()) * 2 - 1
    got = triplet_loss(sim, image_ids, caption_ids, reduction="mean")
    want = triplet_direct(sim.double(), image_ids, caption_ids, 0.2, True, "mean")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=f"seed={seed}")


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(2, 3), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1])), "image_ids"),
    ((torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0, 1])), "caption_image_ids"),
    ((torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0, 1, 4])), "caption_image_ids"),
    ((torch.zeros(2, 3), torch.tensor([0., 1.]), torch.tensor([0, 1, 1])), "image_ids"),
    ((torch.zeros(6), torch.tensor([0, 1]), torch.tensor([0, 1, 1])), "sim"),
    ((torch.tensor([[0., float("nan"), 0.], [0., 0., 0.]]), torch.tensor([0, 1]),
      torch.tensor([0, 1, 1])), "sim"),
    ((torch.tensor([[0., float("inf"), 0.], [0., 0., 0.]]), torch.tensor([0, 1]),
      torch.tensor([0, 1, 1])), "sim"),
])
def test_triplet_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        triplet_loss(*args)


def test_triplet_bad_options():
    sim, ids = torch.zeros(2, 2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="reduction"):
        triplet_loss(sim, ids, ids, reduction="max")
    with pytest.raises(ValueError, match="margin"):
        triplet_loss(sim, ids, ids, margin=float("nan"))


# ----------------------------------------------------------------------------- MMD


@pytest.mark.parametrize("sigmas", [None, (0.5, 3.0)])
def test_mmd_matches_direct_loops(seed, sigmas):
    x, y = unit_sets(3, 2, 5), unit_sets(4, 2, 5) * 0.7 + 0.2
    assert_same_value_and_grads(lambda a, b: mmd_rbf(a, b, sigmas=sigmas),
                                lambda a, b: mmd_direct(a, b, sigmas or (2.0,)),
                                (x, y), f"sigmas={sigmas} seed={seed}")


def test_mmd_biased_estimate_properties(seed):
    x = unit_sets(6, 4, 8)
    assert mmd_rbf(x, x).abs().item() < 1e-12
    # The biased estimate is a squared RKHS norm: never negative, even for tiny samples.
    a, b = unit_sets(1, 2, 8), unit_sets(1, 3, 8)
    assert mmd_rbf(a, b).item() > 0, seed
    # Big enough for torch.cdist's GEMM path, in float32, against the float64 loops.
    x32 = unit_sets(10, 4, 16, dtype=torch.float32)
    y32 = unit_sets(12, 4, 16, dtype=torch.float32)
    torch.testing.assert_close(mmd_rbf(x32, y32).double(),
                               mmd_direct(x32.double(), y32.double(), (2.0,)),
                               rtol=1e-4, atol=1e-5, msg=f"seed={seed}")


def test_mmd_bad_inputs():
    with pytest.raises(ValueError, match="embedding size"):
        mmd_rbf(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="sigmas"):
        mmd_rbf(torch.zeros(3, 4), torch.zeros(3, 4), sigmas=(1.0, 0.0))
    with pytest.raises(ValueError, match="y"):
        mmd_rbf(torch.zeros(3, 4), torch.zeros(0, 4))


# ----------------------------------------------------------------------------- set regularisers


def random_mask(n, k):
    mask = shared_random_mask(n, k)
    mask[0] = False
    mask[0, 0] = True  # a set with one element: no pair, left out of the mean
    mask[1] = True
    return mask


@pytest.mark.parametrize("masked", [False, True])
def test_uniformity_matches_direct_loops(seed, masked):
    x = torch.randn(5, 4, 6, dtype=torch.float64) * 0.5
    mask = random_mask(5, 4) if masked else None
    assert_same_value_and_grads(lambda a: uniformity_loss(a, t=1.5, mask=mask),
                                lambda a: uniformity_direct(a, 1.5, mask),
                                (x,), f"masked={masked} seed={seed}")


def test_uniformity_flat_input_is_one_set(seed):
    x = unit_sets(1, 6, 5)[0]
    assert_same_value_and_grads(lambda a: uniformity_loss(a),
                                lambda a: uniformity_direct(a[None], 2.0), (x,), f"seed={seed}")


@pytest.mark.parametrize("masked", [False, True])
def test_diversity_matches_direct_loops(seed, masked):
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    mask = random_mask(5, 4) if masked else None
    assert_same_value_and_grads(lambda a: diversity_loss(a, mask=mask),
                                lambda a: diversity_direct(a, mask),
                                (x,), f"masked={masked} seed={seed}")


def test_set_regularisers_degenerate_sets_stay_finite():
    # Orthogonal elements: the Frobenius norm sits at 0, where a naive gradient is 0/0.
    basis = torch.eye(4, dtype=torch.float64)[None].repeat(2, 1, 1).requires_grad_()
    div = diversity_loss(basis)
    div.backward()
    assert div.item() == 0 and torch.isfinite(basis.grad).all()
    # Collapsed sets: every pair at distance 0, the maximum of both penalties.
    same = F.normalize(torch.ones(3, 4, 5, dtype=torch.float64), dim=-1).requires_grad_()
    assert math.isclose(diversity_loss(same).item(), math.sqrt(12) / 16, rel_tol=1e-12)
    unif = uniformity_loss(same)
    unif.backward()
    assert math.isclose(unif.item(), 1.0, rel_tol=1e-12) and torch.isfinite(same.grad).all()
    # One element per set: nothing to compare, 0 as in the reference.
    single = torch.randn(3, 1, 5, requires_grad=True)
    assert uniformity_loss(single).item() == 0 and diversity_loss(single).item() == 0


def test_set_regulariser_bad_inputs():
    with pytest.raises(ValueError, match="x"):
        uniformity_loss(torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="t"):
        uniformity_loss(torch.zeros(2, 3, 4), t=-1.0)
    with pytest.raises(ValueError, match="mask"):
        uniformity_loss(torch.zeros(2, 3, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="sets"):
        diversity_loss(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        diversity_loss(torch.zeros(2, 3, 4), mask=torch.ones(2, 3))


# ----------------------------------------------------------------------------- combined


def combined_direct(img, cap, image_ids, caption_ids, cfg, img_mask=None, cap_mask=None):
    sim = smooth_chamfer_direct(img, cap, cfg.temperature, img_mask, cap_mask)
    total = triplet_direct(sim, image_ids, caption_ids, cfg.margin, cfg.hardest, cfg.reduction)
    img_elems = img if img_mask is None else img[img_mask]
    cap_elems = cap if cap_mask is None else cap[cap_mask]
    total = total + cfg.mmd_weight * mmd_direct(img_elems, cap_elems, (2.0,))
    total = total + cfg.uniformity_weight * (uniformity_direct(img, 2.0, img_mask)
                                             + uniformity_direct(cap, 2.0, cap_mask))
    return total + cfg.diversity_weight * (diversity_direct(img, img_mask)
                                           + diversity_direct(cap, cap_mask))


@pytest.mark.parametrize("masked", [False, True])
def test_dive_loss_matches_direct_loops(seed, masked):
    # Weights far from the defaults so a swapped or dropped term shows.
    cfg = LossConfig(margin=0.3, temperature=5.0, mmd_weight=0.7, uniformity_weight=0.4,
                     diversity_weight=0.3)
    image_ids, caption_ids = batch_ids(4, 2)
    img, cap = unit_sets(4, 3, 6), unit_sets(caption_ids.numel(), 3, 6)
    img_mask = random_mask(4, 3) if masked else None
    cap_mask = random_mask(caption_ids.numel(), 3) if masked else None
    loss = DiveLoss(cfg)
    assert_same_value_and_grads(
        lambda a, b: loss(a, b, image_ids, caption_ids, img_mask=img_mask, cap_mask=cap_mask)[0],
        lambda a, b: combined_direct(a, b, image_ids, caption_ids, cfg, img_mask, cap_mask),
        (img, cap), f"masked={masked} seed={seed}")


def test_dive_loss_total_is_weighted_sum_of_terms(seed):
    cfg = LossConfig(diversity_weight=0.05)
    image_ids, caption_ids = batch_ids(6, 5)
    img, cap = unit_sets(6, 4, 16, dtype=torch.float32), unit_sets(caption_ids.numel(), 4, 16,
                                                                    dtype=torch.float32)
    total, terms = DiveLoss(cfg)(img, cap, image_ids, caption_ids)
    assert set(terms) == {"triplet", "mmd", "uniformity", "diversity"}
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in terms.values())
    want = (terms["triplet"] + 0.01 * terms["mmd"] + 0.01 * terms["uniformity"]
            + 0.05 * terms["diversity"])
    torch.testing.assert_close(total.detach(), want, msg=f"seed={seed}")
    direct = {"mmd": mmd_rbf(img, cap), "diversity": diversity_loss(img) + diversity_loss(cap),
              "uniformity": uniformity_loss(img) + uniformity_loss(cap)}
    for name, value in direct.items():
        torch.testing.assert_close(terms[name], value, msg=f"{name} seed={seed}")


def test_dive_loss_defaults_and_gradcheck(seed):
    cfg = DiveLoss().config
    assert (cfg.margin, cfg.temperature, cfg.mmd_weight, cfg.uniformity_weight,
            cfg.diversity_weight, cfg.hardest, cfg.reduction) == (0.2, 16.0, 0.01, 0.01, 0.0,
                                                                   True, "mean")
    image_ids, caption_ids = batch_ids(3, 2)
    img, cap = unit_sets(3, 2, 4), unit_sets(caption_ids.numel(), 2, 4)
    _, terms = DiveLoss()(img, cap, image_ids, caption_ids)
    assert set(terms) == {"triplet", "mmd", "uniformity"}
    # Finite differences of the whole loss (a smaller T keeps the hinges away from their kinks).
    loss = DiveLoss(LossConfig(temperature=4.0, mmd_weight=0.5, uniformity_weight=0.5,
                               diversity_weight=0.5))
    assert torch.autograd.gradcheck(
        lambda a, b: loss(a, b, image_ids, caption_ids)[0],
        (img.requires_grad_(), cap.requires_grad_())), f"seed={seed}"


def test_dive_loss_residuals_feed_the_set_regularisers(seed):
    image_ids, caption_ids = batch_ids(3, 2)
    img, cap = unit_sets(3, 4, 8), unit_sets(caption_ids.numel(), 4, 8)
    img_r, cap_r = torch.randn_like(img) * 3, torch.randn_like(cap) * 3
    cfg = LossConfig(diversity_weight=0.1)
    _, terms = DiveLoss(cfg)(img, cap, image_ids, caption_ids, img_residuals=img_r,
                             cap_residuals=cap_r)
    want = (uniformity_direct(F.normalize(img_r, dim=-1), 2.0)
            + uniformity_direct(F.normalize(cap_r, dim=-1), 2.0))
    torch.testing.assert_close(terms["uniformity"].double(), want, msg=f"seed={seed}")
    torch.testing.assert_close(terms["diversity"].double(),
                               diversity_direct(img_r) + diversity_direct(cap_r),
                               msg=f"seed={seed}")
    torch.testing.assert_close(terms["mmd"].double(), mmd_direct(img, cap, (2.0,)),
                               msg=f"seed={seed}")


def test_dive_loss_bad_inputs():
    with pytest.raises(ValueError, match="reduction"):
        DiveLoss(LossConfig(reduction="none"))
    with pytest.raises(ValueError, match="mmd_weight"):
        DiveLoss(LossConfig(mmd_weight=-1.0))
    img, ids = unit_sets(2, 2, 4), torch.tensor([0, 1])
    loss = DiveLoss()
    with pytest.raises(ValueError, match="cap_residuals"):
        loss(img, img, ids, ids, cap_residuals=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="caption_image_ids"):
        loss(img, img, ids, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="img_mask"):
        loss(img, img, ids, ids, img_mask=torch.tensor([[True, True], [False, False]]))
    with pytest.raises(ValueError, match="cap_sets"):
        loss(img, img[0], ids, ids)
