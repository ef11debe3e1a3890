"""dive.data.augment: word and region drop, random resized crop + flip, and the training
datasets' per-item draws (the same whatever the access order or worker count); TrainConfig's
checks."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dive.config import PRESETS, TrainConfig
from dive.data import (Augmentation, ImageCaptionsDataset, PairDataset, RetrievalSplit,
                       Vocabulary, collate_image_captions, collate_pairs)
from dive.data.augment import (CROP_RATIO, CROP_SCALE, drop_regions, drop_words, item_rng,
                               random_crop_box)

MASK, WORDS = -1, np.arange(1000, 1010)


def test_drop_words_rates_and_ends(seed):
    rng = np.random.default_rng(seed)
    n, p = 200_000, 0.2
    ids = [7, *range(100, 100 + n), 8]
    out = drop_words(ids, p, rng, MASK, WORDS)
    assert out[0] == 7 and out[-1] == 8
    inner = np.array(out[1:-1])
    masked, random_word = (inner == MASK).sum(), np.isin(inner, WORDS).sum()
    deleted = n - len(inner)
    # Binomial counts: 0.5p, 0.1p, 0.4p of the words, within 6 standard deviations.
    for count, rate in ((masked, 0.5 * p), (random_word, 0.1 * p), (deleted, 0.4 * p)):
        assert abs(count - rate * n) < 6 * np.sqrt(n * rate * (1 - rate)), (count, rate)
    kept = inner[(inner != MASK) & ~np.isin(inner, WORDS)]
    assert np.all(np.diff(kept) > 0)  # kept words keep their order


def test_drop_words_edge_cases():
    rng = np.random.default_rng(0)
    assert drop_words([1, 5, 6, 2], 0.0, rng, MASK, WORDS) == [1, 5, 6, 2]
    assert drop_words([1, 2], 0.9, rng, MASK, WORDS) == [1, 2]
    for _ in range(50):  # a caption may lose every word, never its start and end
        out = drop_words([1, 5, 2], 0.99, rng, MASK, WORDS)
        assert out[0] == 1 and out[-1] == 2 and len(out) in (2, 3)
    for bad in (-0.1, 1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="caption_drop"):
            drop_words([1, 5, 2], bad, rng, MASK, WORDS)


def test_drop_regions(seed):
    rng = np.random.default_rng(seed)
    features = np.arange(36 * 3, dtype=np.float32).reshape(36, 3)
    kept = [drop_regions(features, 0.2, rng) for _ in range(2000)]
    fraction = np.mean([len(k) for k in kept]) / 36
    assert abs(fraction - 0.8) < 0.01
    for k in kept[:50]:  # whole rows, in their order
        rows = k[:, 0] / 3
        assert np.array_equal(rows, np.sort(rows)) and np.array_equal(k, features[rows.astype(int)])
    assert drop_regions(features, 0.0, rng) is features
    for _ in range(100):
        assert len(drop_regions(features[:1], 0.99, rng)) == 1  # never empty
    with pytest.raises(ValueError, match="region_drop"):
        drop_regions(features, 1.0, rng)


@pytest.mark.parametrize("width, height", [(640, 480), (480, 640), (33, 500), (1, 1)])
def test_random_crop_box(width, height, seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        left, top, right, bottom = random_crop_box(width, height, rng)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        w, h = right - left, bottom - top
        if (w, h) == (min(width, height),) * 2:
            continue  # the centre-square fallback
        # rounding to whole pixels moves the area and ratio by a pixel's worth
        slack = 2 / min(w, h) + 2 / min(width, height)
        assert CROP_SCALE[0] * (1 - slack) <= w * h / (width * height) <= 1
        assert CROP_RATIO[0] * (1 - slack) <= w / h <= CROP_RATIO[1] * (1 + slack)


def test_image_files_random_crop_and_flip(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    from dive.data import ImageFiles
    pixels = np.zeros((60, 90, 3), dtype=np.uint8)
    pixels[:, :45, 0] = 255  # left half red, right half blue
    pixels[:, 45:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    images = ImageFiles([tmp_path / "a.png"], size=32)
    centre = images[0]
    got = [images.load(0, item_rng(0, 0, i)) for i in range(40)]
    assert all(g.shape == (3, 32, 32) and g.dtype == np.float32 for g in got)
    assert np.array_equal(images.load(0, item_rng(0, 0, 3)), got[3])  # a function of the rng
    assert any(not np.allclose(g, centre) for g in got)
    red_left = [g[0, :, 0].mean() > g[0, :, -1].mean() for g in got]
    assert any(red_left) and not all(red_left)  # flipped about half the time


def _split():
    rng = np.random.default_rng(1)
    images = rng.standard_normal((3, 36, 4)).astype(np.float32)
    captions = [f"a dog and a red car number {i} on the green grass" for i in range(6)]
    return RetrievalSplit(images, captions, captions_per_image=2)


def test_pair_dataset_draws_per_item():
    split = _split()
    vocab = Vocabulary.build(split.captions)
    aug = Augmentation(caption_drop=0.3, region_drop=0.3, seed=5)
    data = PairDataset(split, vocab, aug)
    first = [data[i] for i in range(6)]
    again = [data[i] for i in reversed(range(6))][::-1]
    for a, b in zip(first, again):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert any(len(a[0]) < 36 for a in first) and any(len(a[1]) != len(vocab.encode(c))
                                                      for a, c in zip(first, split.captions))
    data.set_epoch(1)
    assert any(not torch.equal(a[1], data[i][1]) for i, a in enumerate(first))
    plain = PairDataset(split, vocab)
    image, ids, _, _ = plain[4]
    assert torch.equal(image, torch.from_numpy(split.images[2]))
    assert ids.tolist() == vocab.encode(split.captions[4])


@pytest.mark.parametrize("dataset, collate", [(PairDataset, collate_pairs),
                                               (ImageCaptionsDataset, collate_image_captions)])
def test_training_datasets_same_with_worker_processes(dataset, collate):
    split = _split()
    data = dataset(split, Vocabulary.build(split.captions),
                   Augmentation(caption_drop=0.3, region_drop=0.3, seed=2))
    data.set_epoch(3)
    batches = [[2, 0], [1]] if dataset is ImageCaptionsDataset else [[4, 0, 2], [5, 1, 3]]

    def load(workers):
        return list(DataLoader(data, batch_sampler=batches, collate_fn=collate,
                               num_workers=workers))
    for a, b in zip(load(0), load(2)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_image_captions_dataset_draws_per_image():
    split = _split()
    vocab = Vocabulary.build(split.captions)
    data = ImageCaptionsDataset(split, vocab, Augmentation(caption_drop=0.3, region_drop=0.3))
    image, captions, _, indices = data[2]
    assert indices == [4, 5] and len(image) < 36
    again = data[2]
    assert torch.equal(again[0], image) and all(map(torch.equal, again[1], captions))
    assert any(c.tolist() != vocab.encode(split.captions[j]) for c, j in zip(captions, indices))


def test_bert_tokens_mask_and_words(tmp_path):
    from dive.models.text import load_bert_tokens
    from tiny import tiny_bert_dir
    tokens = load_bert_tokens(tiny_bert_dir(tmp_path))
    assert tokens.mask_id == 4 and tokens.word_ids == list(range(5, 10))
    vocab = Vocabulary.build(["a dog"])
    assert vocab.words[vocab.mask_id] == "<mask>"
    assert sorted(vocab.words[i] for i in vocab.word_ids) == ["a", "dog"]


def test_train_config_checks():
    paper = PRESETS["butd_bigru"].train
    assert (paper.caption_drop, paper.region_drop, paper.sampling) == (0.2, 0.2, "image")
    for bad, message in ((dict(caption_drop=1.5), "caption_drop"),
                         (dict(region_drop=-0.1), "region_drop"), (dict(epochs=0), "epochs"),
                         (dict(batch_size=2.5), "batch_size"), (dict(workers=-1), "workers"),
                         (dict(lr=0.0), "lr"), (dict(grad_clip=float("inf")), "grad_clip"),
                         (dict(weight_decay=-1e-4), "weight_decay"), (dict(seed=-1), "seed"),
                         (dict(sampling="pairs"), "sampling")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)
