"""dive.data: tokenizer and vocabulary, SCAN and Karpathy loading with every error, the
Datasets and collates, and the synthetic dataset (determinism, format, learnability)."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dive.data import (CaptionDataset, ImageCaptionsDataset, ImageDataset, PairDataset,
                       RetrievalSplit, Vocabulary, collate_captions, collate_image_captions,
                       collate_images, collate_pairs, load_karpathy, load_scan, make_synthetic,
                       synthetic, tokenize)


# -- tokenizer and vocabulary -------------------------------------------------------------------

@pytest.mark.parametrize("text, tokens", [
    ("A Dog, running on the beach!", ["a", "dog", "running", "on", "the", "beach"]),
    ("the man's hat", ["the", "man", "'s", "hat"]),
    ("they don't", ["they", "do", "n't"]),
    ("It\u2019s ok", ["it", "'s", "ok"]),
    ("at five o'clock", ["at", "five", "o'clock"]),
    ("a black-and-white photo", ["a", "black-and-white", "photo"]),
    ("2.5 or 10,000 cats", ["2.5", "or", "10,000", "cats"]),
    ("the dogs' bowl ...", ["the", "dogs", "bowl"]),
    ("Café au lait_2", ["café", "au", "lait", "2"]),
    ("  ?! ", []),
])
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


def test_tokenize_rejects_non_str():
    with pytest.raises(TypeError, match="str"):
        tokenize(b"a dog")


def test_vocabulary_build_encode_decode():
    vocab = Vocabulary.build(["A dog and a cat.", "a dog", "the zebra"])
    assert vocab.words[:5] == ("<pad>", "<start>", "<end>", "<unk>", "<mask>")
    assert vocab.pad_id == 0
    # most frequent first, ties alphabetical
    assert vocab.words[5:] == ("a", "dog", "and", "cat", "the", "zebra")
    assert len(vocab) == 11 and "zebra" in vocab and "horse" not in vocab
    ids = vocab.encode("A zebra and a HORSE!")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert ids[1:-1] == [vocab.index["a"], vocab.index["zebra"], vocab.index["and"],
                         vocab.index["a"], vocab.unk_id]
    assert vocab.decode(ids) == "a zebra and a <unk>"
    assert vocab.decode(torch.tensor(ids + [0, 0])) == "a zebra and a <unk>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([len(vocab)])


def test_vocabulary_min_count():
    vocab = Vocabulary.build(["a dog", "a cat", "a dog"], min_count=2)
    assert vocab.words[5:] == ("a", "dog")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="min_count"):
            Vocabulary.build(["a"], min_count=bad)
    with pytest.raises(TypeError, match="iterable of captions"):
        Vocabulary.build("a dog")


def test_vocabulary_save_load(tmp_path):
    vocab = Vocabulary.build(["a café", "the dog's bone"])
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded.words == vocab.words
    assert loaded.encode("the café") == vocab.encode("the café")


def test_vocabulary_loads_reference_json(tmp_path):
    words = ["<pad>", "<start>", "<end>", "<unk>", "dog", "a"]
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)},
                                "idx2word": {str(i): w for i, w in enumerate(words)},
                                "idx": len(words)}))
    vocab = Vocabulary.load(path)
    assert vocab.words == tuple(words)
    assert vocab.encode("a dog") == [1, 5, 4, 2]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid UTF-8 JSON"),
    ('["<pad>"]', "neither a 'words' list"),
    ('{"words": "abc"}', "'words' must be a list"),
    ('{"words": ["<start>", "<pad>", "<end>", "<unk>"]}', "index 0"),
    ('{"words": ["<pad>", "<start>", "<end>", "<unk>", "a", "a"]}', "appears twice"),
    ('{"words": ["<pad>", "<start>", "<end>"]}', "special words"),
    ('{"words": ["<pad>", "<start>", "<end>", "<unk>", 3]}', "non-empty strings"),
    ('{"idx2word": {"0": "<pad>", "2": "<start>"}}', "without gaps"),
    ('{"idx2word": {"x": "<pad>"}}', "keys must be integers"),
    ('{"idx2word": ["<pad>"]}', "must be an object"),
])
def test_vocabulary_load_errors(tmp_path, content, message):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        Vocabulary.load(path)
    assert str(path) in str(err.value)


def test_vocabulary_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Vocabulary.load(tmp_path / "nope.json")


# -- SCAN format --------------------------------------------------------------------------------

def write_scan(root, split="test", images=3, regions=4, dim=6, cpi=5, repeat=1, captions=None):
    """A tiny SCAN split; returns the (deduplicated) features it wrote."""
    feats = np.arange(images * regions * dim, dtype=np.float32).reshape(images, regions, dim)
    np.save(root / f"{split}_ims.npy", np.repeat(feats, repeat, axis=0))
    if captions is None:
        captions = [f"caption {j} of image {j // cpi}." for j in range(images * cpi)]
    (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    return feats


def test_load_scan(tmp_path):
    feats = write_scan(tmp_path, "testall")
    split = load_scan(tmp_path, "testall")
    assert isinstance(split.images, np.memmap)
    np.testing.assert_array_equal(split.images, feats)
    assert split.captions[7] == "caption 7 of image 1."
    assert (len(split), split.num_images, split.num_captions) == (15, 3, 15)
    assert split.captions_per_image == 5
    np.testing.assert_array_equal(split.image_ids, [0, 1, 2])
    np.testing.assert_array_equal(split.caption_image_ids, np.arange(15) // 5)
    assert split.image_ids.dtype == split.caption_image_ids.dtype == np.int64


def test_load_scan_other_captions_per_image(tmp_path):
    write_scan(tmp_path, images=2, cpi=3)
    split = load_scan(tmp_path, "test", captions_per_image=3)
    np.testing.assert_array_equal(split.caption_image_ids, [0, 0, 0, 1, 1, 1])


def test_load_scan_deduplicates_repeated_images(tmp_path):
    feats = write_scan(tmp_path, "train", repeat=5)
    assert np.load(tmp_path / "train_ims.npy").shape[0] == 15
    split = load_scan(tmp_path, "train")
    assert split.num_images == 3
    np.testing.assert_array_equal(split.images, feats)


def test_load_scan_rows_per_caption_that_differ(tmp_path):
    write_scan(tmp_path, images=15, captions=[f"c {j}" for j in range(15)])
    with pytest.raises(ValueError, match="rows 0..4 differ"):
        load_scan(tmp_path, "test")


@pytest.mark.parametrize("missing", ["test_ims.npy", "test_caps.txt"])
def test_load_scan_missing_file(tmp_path, missing):
    write_scan(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_scan(tmp_path, "test")


def test_load_scan_wrong_rank(tmp_path):
    write_scan(tmp_path)
    np.save(tmp_path / "test_ims.npy", np.zeros((3, 24), np.float32))
    with pytest.raises(ValueError, match=r"test_ims.npy must hold an \(N_img, R, F\)"):
        load_scan(tmp_path, "test")


def test_load_scan_integer_features(tmp_path):
    write_scan(tmp_path)
    np.save(tmp_path / "test_ims.npy", np.zeros((3, 4, 6), np.int32))
    with pytest.raises(ValueError, match="floating-point"):
        load_scan(tmp_path, "test")


def test_load_scan_corrupt_npy(tmp_path):
    write_scan(tmp_path)
    (tmp_path / "test_ims.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match="not a readable .npy"):
        load_scan(tmp_path, "test")


def test_load_scan_caption_count(tmp_path):
    write_scan(tmp_path, captions=[f"c {j}" for j in range(14)])
    with pytest.raises(ValueError, match=r"test_caps.txt has 14 captions for the 3 images.*15"):
        load_scan(tmp_path, "test")


def test_load_scan_empty_caption(tmp_path):
    caps = [f"c {j}" for j in range(15)]
    caps[6] = "   "
    write_scan(tmp_path, captions=caps)
    with pytest.raises(ValueError, match="test_caps.txt line 7 is an empty caption"):
        load_scan(tmp_path, "test")


def test_load_scan_bad_captions_per_image(tmp_path):
    write_scan(tmp_path)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="captions_per_image"):
            load_scan(tmp_path, "test", captions_per_image=bad)


def test_retrieval_split_checks():
    images = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="expected 5 per image"):
        RetrievalSplit(images, ["a"] * 9, 5)
    with pytest.raises(ValueError, match="N_img, R, F"):
        RetrievalSplit(np.zeros((2, 3)), ["a"] * 10, 5)
    with pytest.raises(ValueError, match="image_ids"):
        RetrievalSplit(images, ["a"] * 10, 5, image_ids=[0])
    with pytest.raises(ValueError, match="caption_image_ids must index"):
        RetrievalSplit(images, ["a"] * 10, 5, caption_image_ids=[0] * 9 + [2])
    split = RetrievalSplit(images, ["a"] * 10, 5, image_ids=[7, 9])
    np.testing.assert_array_equal(split.image_ids, [7, 9])


# -- Karpathy JSON ------------------------------------------------------------------------------

def karpathy_entry(name, split, captions=5, filepath="val2014", cocoid=None):
    entry = {"filename": name, "split": split,
             "sentences": [{"raw": f"{name} caption {j}.", "tokens": []} for j in range(captions)]}
    if filepath is not None:
        entry["filepath"] = filepath
    if cocoid is not None:
        entry["cocoid"] = cocoid
    return entry


def write_karpathy(tmp_path, entries, touch=True):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    root = tmp_path / "images"
    if touch:
        for e in entries:
            file = root / e.get("filepath", "") / e["filename"]
            file.parent.mkdir(parents=True, exist_ok=True)
            file.touch()
    return path, root


COCO = [karpathy_entry("a.jpg", "train", filepath="train2014", cocoid=1),
        karpathy_entry("b.jpg", "restval", cocoid=2),
        karpathy_entry("c.jpg", "test", captions=7, cocoid=3),
        karpathy_entry("d.jpg", "val", cocoid=4),
        karpathy_entry("e.jpg", "train", filepath="train2014", cocoid=5),
        karpathy_entry("f.jpg", "test", cocoid=6)]


def test_karpathy_coco(tmp_path):
    path, root = write_karpathy(tmp_path, COCO)
    train = load_karpathy(path, root, "train")
    assert [im.image_id for im in train] == [1, 2, 5]
    assert [im.split for im in train] == ["train", "restval", "train"]
    assert train[1].path == root / "val2014" / "b.jpg"
    assert train[0].path == root / "train2014" / "a.jpg"
    test = load_karpathy(path, root, "test")
    assert [im.image_id for im in test] == [3, 6]
    assert test[0].captions == [f"c.jpg caption {j}." for j in range(5)]
    assert [im.image_id for im in load_karpathy(path, root, "val")] == [4]
    assert [im.image_id for im in load_karpathy(path, root, "restval")] == [2]
    seven = load_karpathy(path, root, "test", captions_per_image=7, allow_fewer=True)
    assert [len(im.captions) for im in seven] == [7, 5]


def test_karpathy_flickr_without_image_root(tmp_path):
    entries = [dict(karpathy_entry(f"{i}.jpg", s, filepath=None), imgid=i)
               for i, s in enumerate(["train", "test", "val"])]
    path, _ = write_karpathy(tmp_path, entries, touch=False)
    test = load_karpathy(path, None, "test")
    assert len(test) == 1 and test[0].path.as_posix() == "1.jpg" and test[0].image_id == 1


def test_karpathy_fewer_captions(tmp_path):
    path, root = write_karpathy(tmp_path, COCO + [karpathy_entry("g.jpg", "val", captions=4)])
    with pytest.raises(ValueError, match=r"images\[6\] \(g.jpg\) has 4 captions, expected at "
                                         r"least 5"):
        load_karpathy(path, root, "val")
    val = load_karpathy(path, root, "val", allow_fewer=True)
    assert [len(im.captions) for im in val] == [5, 4]


def test_karpathy_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_karpathy(tmp_path / "nope.json", tmp_path, "test")
    path, root = write_karpathy(tmp_path, COCO)
    with pytest.raises(FileNotFoundError, match="image_root .*elsewhere is not a directory"):
        load_karpathy(path, tmp_path / "elsewhere", "test")
    (root / "val2014" / "f.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 2 images are missing .*f.jpg"):
        load_karpathy(path, root, "test")
    assert len(load_karpathy(path, root, "train")) == 3


@pytest.mark.parametrize("content, message", [
    ("{oops", "not valid UTF-8 JSON"),
    ('{"dataset": "coco"}', "'images' list"),
    ('{"images": [3]}', r"images\[0\] must be an object"),
    ('{"images": [{"split": "test", "sentences": []}]}', r"images\[0\] has no 'filename'"),
    ('{"images": [{"filename": "a", "sentences": []}]}', r"images\[0\] has no 'split'"),
    ('{"images": [{"filename": "a", "split": "test"}]}', r"images\[0\] has no 'sentences'"),
    ('{"images": [{"filename": "a", "split": "dev", "sentences": []}]}', "split 'dev'"),
    ('{"images": [{"filename": "a", "split": "test", "sentences": {}}]}', "must be a list"),
    ('{"images": [{"filename": "a", "split": "test", "sentences": [{"raw": " "}]}]}',
     r"sentences\[0\] has no non-empty 'raw'"),
    ('{"images": [{"filename": "a", "split": "test", "sentences": [{"tokens": []}]}]}',
     r"sentences\[0\] has no non-empty 'raw'"),
    ('{"images": [{"filename": "a", "split": "train", "sentences": []}]}',
     "no images in split 'test'"),
])
def test_karpathy_bad_file(tmp_path, content, message):
    path = tmp_path / "dataset.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_karpathy(path, None, "test")


def test_karpathy_bad_arguments(tmp_path):
    path, root = write_karpathy(tmp_path, COCO)
    with pytest.raises(ValueError, match="split must be one of"):
        load_karpathy(path, root, "testall")
    with pytest.raises(ValueError, match="captions_per_image"):
        load_karpathy(path, root, "test", captions_per_image=0)


# -- Datasets and collates ----------------------------------------------------------------------

@pytest.fixture
def small_split():
    images = np.random.default_rng(0).standard_normal((2, 4, 6)).astype(np.float32)
    captions = ["a dog", "a red dog runs", "dog", "the dog barks",
                "a cat", "the cat sleeps", "a big grey cat", "cat"]
    return RetrievalSplit(images, captions, captions_per_image=4)


def test_pair_dataset_and_collate(small_split):
    vocab = Vocabulary.build(small_split.captions)
    data = PairDataset(small_split, vocab)
    assert len(data) == 8
    image, ids, image_index, caption_index = data[5]
    assert (image_index, caption_index) == (1, 5)
    assert image.dtype == torch.float32 and image.shape == (4, 6)
    torch.testing.assert_close(image, torch.from_numpy(small_split.images[1]))
    assert ids.dtype == torch.long and vocab.decode(ids) == "the cat sleeps"

    batch = collate_pairs([data[i] for i in (0, 1, 4, 2)])
    assert batch["images"].shape == (4, 4, 6) and batch["image_mask"].all()
    assert batch["image_mask"].dtype == torch.bool
    torch.testing.assert_close(batch["images"][1], batch["images"][0])
    assert batch["image_ids"].tolist() == [0, 0, 1, 0]
    assert batch["caption_image_ids"].tolist() == [0, 0, 1, 0]
    assert batch["caption_ids"].tolist() == [0, 1, 4, 2]
    assert batch["lengths"].tolist() == [4, 6, 4, 3]
    assert batch["captions"].shape == (4, 6) and batch["captions"].dtype == torch.long
    assert batch["captions"][3].tolist()[3:] == [0, 0, 0]
    assert batch["caption_mask"].tolist()[3] == [True] * 3 + [False] * 3
    assert (batch["caption_mask"] == (batch["captions"] != 0)).all()


def test_image_captions_dataset_and_collate(small_split):
    vocab = Vocabulary.build(small_split.captions)
    data = ImageCaptionsDataset(small_split, vocab)
    assert len(data) == 2
    image, captions, index, caption_indices = data[1]
    assert index == 1 and caption_indices == [4, 5, 6, 7]
    torch.testing.assert_close(image, torch.from_numpy(small_split.images[1]))
    assert [vocab.decode(c) for c in captions] == small_split.captions[4:]

    batch = collate_image_captions([data[1], data[0]])
    assert batch["images"].shape == (2, 4, 6) and batch["image_mask"].all()
    assert batch["image_ids"].tolist() == [1, 0]
    assert batch["caption_image_ids"].tolist() == [1] * 4 + [0] * 4
    assert batch["caption_ids"].tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert batch["captions"].shape == (8, 6) and batch["lengths"].tolist()[:4] == [4, 5, 6, 3]
    assert [vocab.decode(c) for c in batch["captions"]] == (small_split.captions[4:]
                                                            + small_split.captions[:4])
    with pytest.raises(ValueError, match="empty batch"):
        collate_image_captions([])
    # captions listed in any order: each image still gets exactly its own
    shuffled = RetrievalSplit(small_split.images, small_split.captions[::-1], 4,
                              caption_image_ids=[1, 1, 1, 1, 0, 0, 0, 0])
    _, captions, _, indices = ImageCaptionsDataset(shuffled, vocab)[0]
    assert indices == [4, 5, 6, 7]
    assert [vocab.decode(c) for c in captions] == small_split.captions[3::-1]


def test_collate_variable_regions():
    a, b = torch.ones(2, 3), torch.full((4, 3), 2.0)
    ids = torch.tensor([1, 2])
    batch = collate_pairs([(a, ids, 0, 0), (b, ids, 1, 1)])
    assert batch["images"].shape == (2, 4, 3)
    assert batch["image_mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert (batch["images"][0, 2:] == 0).all() and (batch["images"][1] == 2).all()


def test_collate_errors():
    ids = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="empty batch"):
        collate_pairs([])
    with pytest.raises(ValueError, match="share F"):
        collate_pairs([(torch.ones(2, 3), ids, 0, 0), (torch.ones(2, 4), ids, 1, 1)])
    with pytest.raises(ValueError, match=r"must be \(R, F\)"):
        collate_images([(torch.ones(3), 0)])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        collate_captions([(torch.ones(0, dtype=torch.long), 0)])


def test_evaluation_datasets_in_order(small_split):
    vocab = Vocabulary.build(small_split.captions)
    images = DataLoader(ImageDataset(small_split), batch_size=2, collate_fn=collate_images)
    batches = list(images)
    assert len(batches) == 1 and batches[0]["image_ids"].tolist() == [0, 1]
    torch.testing.assert_close(batches[0]["images"], torch.from_numpy(small_split.images[:]))
    captions = DataLoader(CaptionDataset(small_split, vocab), batch_size=3,
                          collate_fn=collate_captions)
    order = torch.cat([b["caption_ids"] for b in captions]).tolist()
    assert order == list(range(8))
    first = next(iter(captions))
    assert [vocab.decode(c) for c in first["captions"]] == small_split.captions[:3]
    assert set(first) == {"captions", "caption_mask", "lengths", "caption_ids"}


# -- synthetic dataset --------------------------------------------------------------------------

SMALL = dict(num_train=60, num_dev=10, num_test=20)


def test_synthetic_format(tmp_path):
    root = make_synthetic(tmp_path / "syn", **SMALL)
    assert root == tmp_path / "syn"
    assert "Chance R@1 on test: 1/20" in (root / "README.txt").read_text()
    for split, n in (("train", 60), ("dev", 10), ("test", 20)):
        assert np.load(root / f"{split}_ims.npy").dtype == np.float32
        data = load_scan(root, split)
        assert data.images.shape == (n, 12, 64) and data.num_captions == 5 * n
        assert all(caption.islower() for caption in data.captions)
    no_dev = make_synthetic(tmp_path / "nodev", num_train=5, num_dev=0, num_test=5,
                            regions=9, feature_dim=8)
    assert not (no_dev / "dev_ims.npy").exists()
    assert load_scan(no_dev, "test").images.shape == (5, 9, 8)


def test_synthetic_determinism(tmp_path):
    files = ["train_ims.npy", "train_caps.txt", "dev_ims.npy", "dev_caps.txt", "test_ims.npy",
             "test_caps.txt", "README.txt"]
    a = make_synthetic(tmp_path / "a", **SMALL)
    b = make_synthetic(tmp_path / "b", **SMALL)
    c = make_synthetic(tmp_path / "c", **SMALL, seed=1)
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in files[:-1]:
        assert (a / name).read_bytes() != (c / name).read_bytes(), name


def test_synthetic_captions_name_distinct_concept_bags(tmp_path):
    concept = {word: ("noun", i) for i, words in enumerate(synthetic.NOUNS) for word in words}
    concept.update({word: ("attr", i) for i, words in enumerate(synthetic.ATTRIBUTES)
                    for word in words})
    data = load_scan(make_synthetic(tmp_path, num_train=300, num_dev=0, num_test=5), "train")
    bags = []
    for image in range(data.num_images):
        per_caption = {tuple(sorted(concept[w] for w in tokenize(c) if w in concept))
                       for c in data.captions[5 * image:5 * image + 5]}
        assert len(per_caption) == 1, per_caption
        bag = per_caption.pop()
        assert 2 <= len(bag) <= 4 and any(kind == "noun" for kind, _ in bag)
        bags.append(bag)
    assert len(set(bags)) == len(bags)


@pytest.mark.parametrize("bad", [dict(num_train=0), dict(num_dev=-1), dict(num_test=100_001),
                                 dict(regions=8),
                                 dict(feature_dim=2.0), dict(seed=-1), dict(noise=-0.1),
                                 dict(noise=float("nan"))])
def test_synthetic_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_synthetic(tmp_path, **bad)


def bag_of_words(captions, vocab):
    out = np.zeros((len(captions), len(vocab)))
    for i, caption in enumerate(captions):
        np.add.at(out[i], vocab.encode(caption)[1:-1], 1.0)
    return out


def test_synthetic_is_learnable(tmp_path):
    """Ridge regression from mean-pooled regions to bag-of-words beats chance (1%) 20x."""
    root = make_synthetic(tmp_path, num_train=1500, num_dev=0, num_test=100)
    train, test = load_scan(root, "train"), load_scan(root, "test")
    vocab = Vocabulary.build(train.captions)
    x = np.asarray(train.images).mean(1)[train.caption_image_ids]
    y = bag_of_words(train.captions, vocab)
    w = np.linalg.solve(x.T @ x + np.eye(x.shape[1]), x.T @ y)
    img = np.asarray(test.images).mean(1) @ w
    txt = bag_of_words(test.captions, vocab)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    sim = img @ txt.T
    i2t = np.mean(sim.argmax(1) // 5 == np.arange(100))
    t2i = np.mean(sim.argmax(0) == test.caption_image_ids)
    assert i2t >= 0.2 and t2i >= 0.2, (i2t, t2i)


# ----------------------------------------------------------------------------- raw images


def _write_images(root, colours):
    Image = pytest.importorskip("PIL.Image")
    paths = []
    for i, colour in enumerate(colours):
        path = root / f"img{i}.png"
        Image.new("RGB", (40 + 8 * i, 80), colour).save(path)
        paths.append(path)
    return paths


def test_image_files_resize_crop_and_normalise(tmp_path):
    from dive.data import ImageFiles
    from dive.data.images import MEAN, STD
    paths = _write_images(tmp_path, [(255, 0, 0), (10, 200, 30)])
    images = ImageFiles(paths, size=32)
    assert images.shape == (2, 3, 32, 32) and images.ndim == 4 and len(images) == 2
    pixels = images[1]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32
    want = (np.array([10, 200, 30], dtype=np.float32)[:, None, None] / 255 - MEAN) / STD
    np.testing.assert_allclose(pixels, np.broadcast_to(want, (3, 32, 32)), atol=1e-5)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        ImageFiles([tmp_path / "broken.png"], size=32)[0]
    with pytest.raises(ValueError, match="image_size must be >= 32"):
        ImageFiles(paths, size=8)


def test_karpathy_split_of_image_files(tmp_path):
    from dive.data import ImageDataset, collate_images, karpathy_split
    _write_images(tmp_path, [(0, 0, 0), (50, 50, 50), (90, 90, 90)])
    entries = [{"filename": f"img{i}.png", "split": split, "cocoid": 100 + i,
                "sentences": [{"raw": f"caption {j} of image {i}"} for j in range(6)]}
               for i, split in enumerate(["train", "val", "train"])]
    (tmp_path / "dataset.json").write_text(json.dumps({"images": entries}))
    split = karpathy_split(tmp_path / "dataset.json", tmp_path, "train", image_size=32)
    assert split.num_images == 2 and split.num_captions == 10
    assert split.image_ids.tolist() == [100, 102]
    assert split.captions[5] == "caption 0 of image 2"
    batch = collate_images([ImageDataset(split)[i] for i in range(2)])
    assert batch["images"].shape == (2, 3, 32, 32) and batch["image_mask"] is None
    dev = karpathy_split(tmp_path / "dataset.json", tmp_path, "dev", image_size=32)
    assert dev.image_ids.tolist() == [101]
