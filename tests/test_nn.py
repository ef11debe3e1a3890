"""dive.nn: the aggregation block equals the same layers composed by hand around the reference op."""
import pytest
import torch
import torch.nn.functional as F

from dive.nn import AggregationBlock, SetPredictionModule, sine_positions
from dive.ops import slot_attention_ref

SMALL = dict(heads=2, head_dim=8, ff_mult=4)


def layer_norm(module, x):
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def by_hand(block, tokens, mask=None, generator=None):
    """The block's documented computation from its parameters, with the reference op."""
    b, n, _ = tokens.shape
    if block.slot_init == "learned":
        slots = block.slots.expand(b, -1, -1)
    else:
        noise = torch.randn(b, block.num_slots, block.dim, generator=generator)
        slots = block.slot_mean + block.slot_log_sigma.exp() * noise
    pos = sine_positions(n, block.token_dim) if block.positions == "sine" else 0
    for layers, attn_norm, ff_norm in zip(block.rounds, block.attention_norms, block.ff_norms):
        att = layers.attention
        split = lambda t: t.view(b, -1, att.heads, att.head_dim).transpose(1, 2)  # noqa: E731
        normed = layer_norm(layers.token_norm, tokens)
        q = split(F.linear(layer_norm(layers.slot_norm, slots), att.to_q.weight))
        k = split(F.linear(normed + pos, att.to_k.weight))
        v = split(F.linear(normed, att.to_v.weight))
        out = slot_attention_ref(q, k, v, key_mask=mask, scale=att.head_dim ** -0.5)
        out = F.linear(out.transpose(1, 2).reshape(b, -1, att.heads * att.head_dim),
                       att.to_out.weight, att.to_out.bias)
        slots = layer_norm(attn_norm, slots + out)
        ff = layers.ff
        hidden = F.gelu(F.linear(layer_norm(layers.ff_norm, slots), ff[0].weight, ff[0].bias))
        slots = layer_norm(ff_norm, slots + F.linear(hidden, ff[3].weight, ff[3].bias))
    return slots


def make_mask(b, n):
    mask = torch.rand(b, n) > 0.4
    mask[:, 0] = True
    return mask


@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("slot_init", ["learned", "gaussian"])
@pytest.mark.parametrize("positions", [None, "sine"], ids=["regions", "words"])
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_block_equals_layers_by_hand(share, slot_init, positions, masked, seed):
    block = AggregationBlock(12, 10, num_slots=3, depth=3, share_weights=share,
                             slot_init=slot_init, positions=positions, **SMALL)
    tokens = torch.randn(4, 7, 10)
    mask = make_mask(4, 7) if masked else None
    got = block(tokens, mask, generator=torch.Generator().manual_seed(seed))
    want = by_hand(block, tokens, mask, generator=torch.Generator().manual_seed(seed))
    assert got.shape == (4, 3, 12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"seed={seed}")
    # Parameter gradients agree too (the fused op's backward against autograd on the reference).
    # A random projection as the loss: sum(out^2) after a LayerNorm is nearly constant, which
    # leaves every gradient but the last LayerNorm's at rounding level.
    weights = torch.randn_like(got)
    (got * weights).sum().backward()
    fused = {name: p.grad.clone() for name, p in block.named_parameters()}
    block.zero_grad()
    (by_hand(block, tokens, mask, torch.Generator().manual_seed(seed)) * weights).sum().backward()
    scale = max(p.grad.abs().max().item() for p in block.parameters())
    for name, p in block.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-6 * scale,
                                   msg=f"{name} seed={seed}")


def test_shared_rounds_are_one_set_of_layers():
    shared = AggregationBlock(16, 8, depth=4, share_weights=True, **SMALL)
    unshared = AggregationBlock(16, 8, depth=4, share_weights=False, **SMALL)
    assert all(r is shared.rounds[0] for r in shared.rounds)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    per_round = count(shared.rounds[0])
    assert count(unshared) - count(shared) == 3 * per_round
    names = dict(shared.named_parameters())
    assert "rounds.0.attention.to_q.weight" in names and "slots" in names


def test_attention_maps_per_round(seed):
    block = AggregationBlock(12, 10, num_slots=4, depth=2, **SMALL)
    tokens, mask = torch.randn(3, 9, 10), make_mask(3, 9)
    slots, maps = block(tokens, mask, return_attention=True)
    torch.testing.assert_close(slots, block(tokens, mask))
    assert len(maps) == 2 and all(m.shape == (3, 2, 4, 9) for m in maps)
    for m in maps:
        assert (m * ~mask[:, None, None, :] == 0).all()
        torch.testing.assert_close(m.sum(3), torch.ones(3, 2, 4), atol=1e-5, rtol=0)


def test_masked_tokens_do_not_matter(seed):
    block = AggregationBlock(12, 10, num_slots=3, depth=2, positions="sine", **SMALL)
    tokens, mask = torch.randn(3, 8, 10), make_mask(3, 8)
    noisy = tokens.clone()
    noisy[~mask] = 100 * torch.randn(int((~mask).sum()), 10)
    torch.testing.assert_close(block(tokens, mask), block(noisy, mask), rtol=1e-5, atol=1e-5)


def test_gaussian_slots_follow_the_generator():
    block = AggregationBlock(8, 6, num_slots=3, depth=1, slot_init="gaussian", **SMALL)
    tokens = torch.randn(2, 5, 6)
    a = block(tokens, generator=torch.Generator().manual_seed(1))
    b = block(tokens, generator=torch.Generator().manual_seed(1))
    c = block(tokens, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_set_prediction_adds_the_normalised_global_feature(seed):
    spm = SetPredictionModule(12, 10, num_slots=3, depth=2, **SMALL)
    with torch.no_grad():
        spm.global_norm.weight.uniform_(0.5, 1.5)
    tokens, glob = torch.randn(4, 6, 10), torch.randn(4, 12)
    slots = spm.block(tokens)
    want = slots + layer_norm(spm.global_norm, glob)[:, None]
    out = spm(tokens, glob)
    torch.testing.assert_close(out.sets, want)
    torch.testing.assert_close(out.slots, slots)
    assert out.attention is None
    torch.testing.assert_close(spm(tokens).sets, slots)
    out = spm(tokens, glob, return_attention=True)
    torch.testing.assert_close(out.sets, want)
    assert len(out.attention) == 2


def test_sine_positions():
    table = sine_positions(5, 7)
    assert table.shape == (5, 7)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1, 0, 1, 0, 1, 0]))
    three = torch.tensor(3.0)
    torch.testing.assert_close(table[3, :2], torch.stack([three.sin(), three.cos()]))
    # Channel pair c uses frequency 10000^(-c/dim).
    torch.testing.assert_close(table[3, 4], (3 * 10000.0 ** (-4 / 7) * torch.ones(())).sin())


@pytest.mark.parametrize("kwargs,match", [
    (dict(slot_init="uniform"), "slot_init must be"),
    (dict(positions="learned"), "positions must be"),
    (dict(num_slots=0), "num_slots and depth must be >= 1"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AggregationBlock(8, 6, **SMALL, **kwargs)


def test_bad_inputs():
    spm = SetPredictionModule(8, 6, num_slots=2, depth=1, **SMALL)
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, N, 6\)"):
        spm(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"global_feature must have shape \(2, 8\)"):
        spm(torch.randn(2, 5, 6), torch.randn(2, 6))
    with pytest.raises(ValueError, match="row 1 has no real token"):
        spm(torch.randn(2, 5, 6), key_mask=torch.tensor([[True] * 5, [False] * 5]))
