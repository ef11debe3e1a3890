"""Random sets and set masks for the tests (tests/ is on pytest's pythonpath)."""
import torch
import torch.nn.functional as F


def unit_sets(n, k=3, d=16, dtype=torch.float32, device="cpu", *, generator=None,
              normalize=True, scale=1.0):
    """(n, k, d) random sets of unit vectors, as the model's embeddings are (so a high
    temperature is a real case, not an overflow), times `scale`; drawn in float32 (float64 for
    float64) and rounded to `dtype` last. normalize=False keeps the raw Gaussian vectors."""
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(n, k, d, dtype=draw, device=device, generator=generator)
    if normalize:
        x = F.normalize(x, dim=-1)
    return (x * scale).to(dtype)


def random_mask(n, k, device="cpu", *, generator=None):
    """(n, k) bool, about 60% True, at least one True per set (every op requires one)."""
    mask = torch.rand(n, k, device=device, generator=generator) > 0.4
    pick = torch.randint(k, (n,), device=device, generator=generator)
    mask[torch.arange(n, device=device), pick] = True
    return mask
