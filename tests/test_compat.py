"""dive.compat.SetwiseSimilarity against the DivE reference code's formulas, computed its way."""
import pytest
import torch
import torch.nn.functional as F

from dive.compat import SetwiseSimilarity


def reference_way(img, txt, ki, kt, den, t):
    """The reference code's recipe in float32: exp, sum-pool over one axis, log, sum-pool."""
    c = img @ txt.T  # (NI*ki, NT*kt)
    e = torch.exp(t * c).view(img.shape[0] // ki, ki, txt.shape[0] // kt, kt)
    first = torch.log(e.sum(3)).sum(1)
    second = torch.log(e.sum(1)).sum(2)
    smooth = (first / (ki * t) + second / (kt * t)) / den
    c4 = c.view(img.shape[0] // ki, ki, txt.shape[0] // kt, kt)
    chamfer = (c4.amax(3).sum(1) / ki + c4.amax(1).sum(2) / kt) / den
    return smooth, chamfer, c4.amax(dim=(1, 3))


@pytest.mark.parametrize("ki,kt", [(4, 4), (3, 5), (1, 1)])
@pytest.mark.parametrize("temperature", [1.0, 16.0])
def test_matches_the_reference_formulas(ki, kt, temperature, seed):
    img = F.normalize(torch.randn(7 * ki, 32), dim=-1)
    txt = F.normalize(torch.randn(11 * kt, 32), dim=-1)
    sim = SetwiseSimilarity(ki, kt, denominator=2.0, temperature=temperature)
    smooth, chamfer, maxsim = reference_way(img, txt, ki, kt, 2.0, temperature)
    msg = f"seed={seed}"
    torch.testing.assert_close(sim.smooth_chamfer_similarity(img, txt), smooth, rtol=1e-5,
                               atol=1e-5, msg=msg)
    torch.testing.assert_close(sim.chamfer_similarity(img, txt), chamfer, msg=msg)
    torch.testing.assert_close(sim.max_similarity(img, txt), maxsim, msg=msg)
    torch.testing.assert_close(sim.smooth_chamfer_similarity_cosine(img, txt), smooth, rtol=1e-5,
                               atol=1e-5, msg=msg)


def test_stays_finite_where_the_reference_overflows():
    img = F.normalize(torch.randn(8, 16), dim=-1).half()
    txt = F.normalize(torch.randn(12, 16), dim=-1).half()
    sim = SetwiseSimilarity(4, 4, denominator=2.0, temperature=100.0)
    assert torch.isfinite(sim.smooth_chamfer_similarity(img, txt)).all()
    assert not torch.isfinite(torch.exp(100.0 * (img @ txt.T))).all()  # what the reference did


def test_gradients_flow():
    img = F.normalize(torch.randn(8, 16), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(12, 16), dim=-1).requires_grad_()
    SetwiseSimilarity(4, 4, 2.0, 16.0).smooth_chamfer_similarity(img, txt).sum().backward()
    assert img.grad is not None and txt.grad is not None


@pytest.mark.parametrize("img,message", [
    (torch.randn(9, 16), "img_embs has 9 rows, not a multiple of its set size 4"),
    (torch.randn(2, 4, 16), "img_embs must be a \\(N \\* set_size, D\\) tensor"),
])
def test_bad_input(img, message):
    with pytest.raises(ValueError, match=message):
        SetwiseSimilarity(4, 4, 2.0).smooth_chamfer_similarity(img, torch.randn(8, 16))


def test_bad_set_size():
    with pytest.raises(ValueError, match="img_set_size must be a positive int"):
        SetwiseSimilarity(0, 4, 2.0)


@pytest.mark.parametrize("method", ["smooth_chamfer_similarity", "chamfer_similarity",
                                    "max_similarity"])
def test_embedding_size_mismatch_is_named(method):
    sim = SetwiseSimilarity(4, 4, 2.0)
    with pytest.raises(ValueError, match="same (embedding size )?D"):
        getattr(sim, method)(torch.randn(8, 16), torch.randn(8, 12))
