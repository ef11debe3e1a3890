"""The options that give the paper's architecture (block_norm, word_positions, global_fc,
projection_dropout, padding), the triplet average over triplets, the validation subset and the
logged hyper-parameters: each against a few hand-written lines in float64, plus identity cases."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dive.config import PRESETS, Config, TrainConfig
from dive.data.scan import RetrievalSplit
from dive.losses import triplet_loss
from dive.models import ModelConfig
from dive.models.image import RegionEncoder, RegionProjection
from dive.nn import AggregationBlock, SlotCrossAttention, sine_positions
from dive.ops import slot_attention_ref
from dive.paper import first_images, official_hyperparameters

SMALL = dict(heads=2, head_dim=8, ff_mult=2)


def layer_norm(module, x):
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def randomise(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return module


def test_normalized_sine_positions_by_hand():
    length, dim = 7, 10
    table = sine_positions(length, dim, dtype=torch.float64, normalized=True)
    for p in range(length):
        y = (p + 1) / (length + 1e-6) * 2 * math.pi
        for c in range(dim):
            rate = 10000 ** (2 * (c // 2) / dim)
            want = math.sin(y / rate) if c % 2 == 0 else math.cos(y / rate)
            assert table[p, c].item() == pytest.approx(want, abs=1e-14)
    # The last position is (almost) one full period of the slowest channel pair.
    assert table[-1, 0].item() == pytest.approx(0.0, abs=1e-5)
    index = sine_positions(length, dim, dtype=torch.float64)
    torch.testing.assert_close(index[:, 0], torch.arange(length, dtype=torch.float64).sin())


def pre_norm_by_hand(block, tokens, final):
    b = tokens.shape[0]
    slots = block.slots.expand(b, -1, -1)
    for layers in block.rounds:
        att = layers.attention
        split = lambda t: t.view(b, -1, att.heads, att.head_dim).transpose(1, 2)  # noqa: E731
        normed = layer_norm(layers.token_norm, tokens)
        q = split(layer_norm(layers.slot_norm, slots) @ att.to_q.weight.T)
        out = slot_attention_ref(q, split(normed @ att.to_k.weight.T),
                                 split(normed @ att.to_v.weight.T), scale=att.head_dim ** -0.5)
        slots = slots + att.to_out(out.transpose(1, 2).reshape(b, -1, att.heads * att.head_dim))
        slots = slots + layers.ff(layer_norm(layers.ff_norm, slots))
    return layer_norm(block.final_norm, slots) if final else slots


@pytest.mark.parametrize("block_norm", ["pre_final", "pre"])
def test_pre_norm_rounds_by_hand(block_norm):
    torch.manual_seed(0)
    block = randomise(AggregationBlock(12, 10, num_slots=3, depth=3, block_norm=block_norm,
                                       **SMALL).double(), 1)
    tokens = torch.randn(2, 5, 10, dtype=torch.float64)
    torch.testing.assert_close(block(tokens), pre_norm_by_hand(block, tokens,
                                                               block_norm == "pre_final"),
                               rtol=1e-12, atol=1e-12)
    keys = set(block.state_dict())
    assert ("final_norm.weight" in keys) == (block_norm == "pre_final")
    assert not any(k.startswith(("attention_norms", "ff_norms")) for k in keys)


def test_final_norm_is_a_layer_norm_of_the_plain_pre_norm_output():
    torch.manual_seed(0)
    final = randomise(AggregationBlock(8, 6, num_slots=2, depth=2, block_norm="pre_final",
                                       **SMALL).double(), 2)
    plain = AggregationBlock(8, 6, num_slots=2, depth=2, block_norm="pre", **SMALL).double()
    plain.load_state_dict({k: v for k, v in final.state_dict().items()
                           if not k.startswith("final_norm")})
    tokens = torch.randn(3, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(final(tokens), layer_norm(final.final_norm, plain(tokens)))


def test_official_padding_gives_padded_tokens_a_kth_of_each_slot():
    torch.manual_seed(0)
    kw = dict(heads=2, head_dim=4)
    official = SlotCrossAttention(6, 5, padding="official", **kw).double()
    exact = SlotCrossAttention(6, 5, **kw).double()
    exact.load_state_dict(official.state_dict())
    slots, tokens = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 4, 5,
                                                                           dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    # By hand: softmax over the slots, a padded token's logits all equal (1/K each).
    q = official._split(official.to_q(slots))
    k, v = official._split(official.to_k(tokens)), official._split(official.to_v(tokens))
    logits = (q @ k.transpose(-1, -2) * official.scale).masked_fill(~mask[:, None, None, :],
                                                                      -1e300)
    attn = logits.softmax(2)
    torch.testing.assert_close(attn[0, :, :, 2:], torch.full((2, 3, 2), 1 / 3,
                                                             dtype=torch.float64))
    attn = attn / (attn.sum(-1, keepdim=True) + 1e-7)
    want = official.to_out((attn @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(official(slots, tokens, mask), want, rtol=1e-12, atol=1e-12)
    # Without padding the two agree; with it they differ.
    torch.testing.assert_close(official(slots[1:], tokens[1:], mask[1:]),
                               exact(slots[1:], tokens[1:], mask[1:]), rtol=1e-13, atol=1e-13)
    assert (official(slots, tokens, mask) - exact(slots, tokens, mask))[0].abs().max() > 1e-3


def test_batchnorm_over_padding_option():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.3
    mask[:, 0] = True
    proj = RegionProjection(7, 6, bn_padding=True).double().train()
    exact = RegionProjection(7, 6).double().train()
    exact.load_state_dict(proj.state_dict())
    # bn_padding: the statistics are those of every row, as with no mask at all.
    torch.testing.assert_close(proj(x, mask), exact(x, None))
    torch.testing.assert_close(proj.bn.running_mean, exact.bn.running_mean)
    exact_masked = RegionProjection(7, 6).double().train()
    exact_masked.load_state_dict(proj.state_dict())
    assert not torch.allclose(exact_masked(x, mask)[mask], proj(x, mask)[mask])


def test_projection_dropout_by_hand():
    torch.manual_seed(0)
    proj = RegionProjection(7, 6, dropout=0.25).double()
    plain = RegionProjection(7, 6).double()
    plain.load_state_dict(proj.state_dict())
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    proj.eval(), plain.eval()
    torch.testing.assert_close(proj(x), plain(x))  # eval: the identity
    proj.train(), plain.train()
    torch.manual_seed(5)
    got = proj(x)
    undropped = plain(x)
    torch.manual_seed(5)
    torch.testing.assert_close(got, F.dropout(undropped, 0.25, training=True))


def test_no_global_fc_is_the_identity_case_of_the_linear():
    torch.manual_seed(0)
    config = ModelConfig(embed_dim=8, num_slots=2, region_dim=6, depth=1, heads=2, head_dim=4,
                         ff_mult=2, dropout=0.0, global_fc=False)
    without = RegionEncoder(config).double().eval()
    assert isinstance(without.global_fc, nn.Identity)
    assert not any("global_fc" in k for k in without.state_dict())
    with_fc = RegionEncoder(config.replace(global_fc=True)).double().eval()
    state = dict(without.state_dict())
    state["global_fc.weight"] = torch.eye(8, dtype=torch.float64)
    state["global_fc.bias"] = torch.zeros(8, dtype=torch.float64)
    with_fc.load_state_dict(state)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(without(x).sets, with_fc(x).sets, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name,value", [("block_norm", "post_final"), ("word_positions", "raw"),
                                        ("padding", "zeros"), ("projection_dropout", 1.0)])
def test_bad_model_options(name, value):
    with pytest.raises(ValueError, match=name):
        ModelConfig(**{name: value})


def test_paper_presets_and_defaults():
    for name in ("butd_bigru", "resnet152_bigru", "bert"):
        m = PRESETS[name].model
        assert (m.block_norm, m.word_positions, m.global_fc, m.projection_dropout,
                m.padding) == ("pre_final", "normalized", False, 0.1, "exact")
        assert PRESETS[name].train.val_images == 1000
    m = ModelConfig()  # dive's defaults: old run folders keep their architecture
    assert (m.block_norm, m.word_positions, m.global_fc, m.projection_dropout) == (
        "post", "index", True, 0.0)
    assert Config.from_dict({"model": {}}).train.val_images == 0
    with pytest.raises(ValueError, match="val_images"):
        TrainConfig(val_images=-1)


def test_paper_preset_logs_the_official_script_values():
    """train_eval_coco.sh, flag by flag (heads and dim_head are constants there)."""
    script = {"img_num_embeds": 4, "txt_num_embeds": 4, "embed_size": 1024,
              "spm_input_dim": 1024, "spm_query_dim": 1024, "word_dim": 300, "heads": 4,
              "dim_head": 512, "spm_depth": 4, "spm_weight_sharing": True, "spm_ff_mult": 4,
              "spm_activation": "gelu", "spm_pre_norm": True, "spm_post_norm": False,
              "spm_last_ln": True, "spm_img_pos_enc_type": "none",
              "spm_txt_pos_enc_type": "sine", "img_res_last_fc": False, "img_1x1_dropout": 0.1,
              "dropout": 0.1, "temperature": 16.0, "margin": 0.2, "max_violation": True,
              "mmd_weight": 0.01, "unif_weight": 0.01, "lr": 1e-3, "img_pie_lr_scale": 0.1,
              "txt_pie_lr_scale": 0.1, "txt_lr_scale": 1.0, "weight_decay": 1e-4,
              "grad_clip": 1.0, "num_epochs": 80, "batch_size": 200, "warm_epoch": 0,
              "caption_drop_prob": 0.2, "butd_drop_prob": 0.2, "optimizer": "adamw",
              "lr_scheduler": "cosine"}
    logged = official_hyperparameters(PRESETS["butd_bigru"])
    assert {k: logged[k] for k in script} == script
    assert logged["val_images"] == 1000


def triplets_by_hand(sim, img, cap, margin):
    total = []
    for direction in ("i2t", "t2i"):
        terms = []
        for i in range(len(img)):
            for j in range(len(cap)):
                if img[i] != cap[j]:
                    continue
                if direction == "i2t":
                    terms += [max(0.0, margin + sim[i, n] - sim[i, j])
                              for n in range(len(cap)) if cap[n] != img[i]]
                else:
                    terms += [max(0.0, margin + sim[n, j] - sim[i, j])
                              for n in range(len(img)) if img[n] != cap[j]]
        total.append(sum(terms) / max(1, len(terms)))
    return sum(total)


def test_triplet_mean_over_triplets_by_hand(seed):
    gen = torch.Generator().manual_seed(seed)
    sim = torch.randn(5, 11, generator=gen, dtype=torch.float64)
    img = torch.tensor([0, 1, 2, 3, 1])
    cap = torch.randint(0, 4, (11,), generator=gen)
    cap[:4] = torch.arange(4)
    got = triplet_loss(sim, img, cap, margin=0.3, hardest=False, reduction="triplets")
    assert got.item() == pytest.approx(triplets_by_hand(sim.numpy(), img.tolist(),
                                                        cap.tolist(), 0.3), rel=1e-12)
    # With hardest negatives one triplet per positive pair: the same as "mean".
    torch.testing.assert_close(
        triplet_loss(sim, img, cap, hardest=True, reduction="triplets"),
        triplet_loss(sim, img, cap, hardest=True, reduction="mean"))
    # The reference's shapes (each image once, K captions each): sum over negatives / count.
    img, cap = torch.arange(3), torch.arange(3).repeat_interleave(2)
    sim = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    summed = triplet_loss(sim, img, cap, hardest=False, reduction="mean")
    i2t = triplet_loss(sim, img, cap, hardest=False, reduction="triplets")
    hinge = (0.2 + sim[:, None, :] - sim[img[:, None], torch.arange(6).view(3, 2)][..., None])
    neg = (cap[None, :] != img[:, None])[:, None, :].expand(3, 2, 6)
    i2t_mean = hinge.clamp(min=0)[neg].mean()
    hinge_t = 0.2 + sim.T[:, None, :] - sim[cap, torch.arange(6)][:, None, None]
    neg_t = (img[None, :] != cap[:, None])[:, None, :]
    t2i_mean = hinge_t.clamp(min=0)[neg_t].mean()
    torch.testing.assert_close(i2t, i2t_mean + t2i_mean)
    assert not torch.allclose(summed, i2t)


def test_first_images():
    split = RetrievalSplit(np.zeros((4, 2, 3), np.float32), [f"c{i}" for i in range(8)], 2)
    sub = first_images(split, 3)
    assert (sub.num_images, sub.captions) == (3, [f"c{i}" for i in range(6)])
    assert sub.caption_image_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert first_images(split, 0) is split and first_images(split, 10) is split
