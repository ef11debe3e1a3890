"""A small, learnable, deterministic retrieval dataset in the SCAN format.

World: NOUNS (some with synonyms) and ATTRIBUTES are the latent concepts; each has a fixed random
prototype in feature space, and each noun a small subspace of appearance variation. An image holds
1-3 objects (distinct nouns, each with an attribute or not), 2-4 concepts in all, and no two
images of a split share the same bag of concepts, so even a bag-of-words model can tell them
apart. Its R regions: 1-3 per object (noun prototype + attribute prototype + appearance + noise),
the rest distractors (one of BACKGROUND_KINDS background prototypes + noise), shuffled. Its
captions name every object with its attribute, in a random order, with random synonyms,
articles, connectors and templates ("a photo of a red dog next to the car").

Files: {train,dev,test}_ims.npy (N, R, F) float32, {split}_caps.txt (5 lines per image), and
README.txt. Chance R@1 is 1/N_test in both directions (i2t: 5 of 5N captions are right; t2i:
1 of N images). The same arguments give byte-identical files.
"""
from pathlib import Path

import numpy as np

CAPTIONS_PER_IMAGE = 5
BACKGROUND_KINDS = 16
APPEARANCE_DIMS = 4
MAX_IMAGES = 100_000

NOUNS = (
    ("dog", "puppy"), ("cat", "kitten"), ("horse",), ("cow",), ("sheep",), ("bird",),
    ("elephant",), ("giraffe",), ("zebra",), ("bear",), ("car", "automobile"), ("bus",),
    ("truck", "lorry"), ("bicycle", "bike"), ("motorcycle", "motorbike"), ("train",), ("boat",),
    ("airplane", "plane"), ("man", "guy"), ("woman", "lady"), ("child", "kid"), ("table",),
    ("chair",), ("bench",), ("couch", "sofa"), ("bed",), ("lamp",), ("clock",), ("umbrella",),
    ("kite",), ("ball",), ("bottle",), ("cup", "mug"), ("pizza",), ("cake",), ("tree",),
)
ATTRIBUTES = (
    ("red",), ("blue",), ("green",), ("yellow",), ("black",), ("white",), ("brown",),
    ("orange",), ("small", "little"), ("large", "big"), ("old",), ("wooden",), ("striped",),
    ("shiny",), ("dirty",), ("young",),
)
TEMPLATES = (
    "a photo of {}", "{}", "there is {}", "an image showing {}", "a picture with {}",
    "{} in the scene", "we can see {} here", "a close up of {}",
)
CONNECTORS = (" and ", " next to ", " with ", " near ", " beside ", ", ")


def make_synthetic(root, *, num_train: int = 3000, num_dev: int = 100, num_test: int = 300,
                   regions: int = 12, feature_dim: int = 64, noise: float = 1.0,
                   seed: int = 0) -> Path:
    """Write the dataset under `root` (created if needed; existing files are overwritten).

    Defaults: 3,000 train / 100 dev / 300 test images, 12 regions of 64 features, 5 captions
    each (~10 MB): a small DivE model learns it on CPU in a minute or two. num_dev=0 writes no
    dev split. `noise` is the std of the Gaussian noise on every feature (prototype entries have
    std 1): at 1.0 a mean-pooled linear / bag-of-words stand-in reaches ~65% R@1 both ways on
    test in 30 s of CPU training, so there is headroom above it and far above chance (0.33%).
    """
    # 9 regions hold the largest image (3 objects of 3 regions); past MAX_IMAGES a split's
    # distinct concept bags (~218K possible) get slow to draw by rejection.
    for name, n, low, high in (("num_train", num_train, 1, MAX_IMAGES),
                               ("num_dev", num_dev, 0, MAX_IMAGES),
                               ("num_test", num_test, 1, MAX_IMAGES),
                               ("regions", regions, 9, None), ("feature_dim", feature_dim, 1, None),
                               ("seed", seed, 0, None)):
        if isinstance(n, bool) or not isinstance(n, int) or n < low or (high and n > high):
            raise ValueError(f"{name} must be an int >= {low}" + (f" and <= {high}" if high else "")
                             + f", got {n!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    world = _World(np.random.default_rng([seed, 0]), feature_dim)
    splits = (("train", num_train), ("dev", num_dev), ("test", num_test))
    for k, (split, n) in enumerate(splits, 1):
        if n == 0:
            continue
        rng = np.random.default_rng([seed, k])
        seen = set()
        images = [_sample_objects(rng, seen) for _ in range(n)]
        features = np.stack([world.regions(rng, objs, regions, noise) for objs in images])
        np.save(root / f"{split}_ims.npy", features.astype("<f4"))
        lines = [_caption(rng, objs) for objs in images for _ in range(CAPTIONS_PER_IMAGE)]
        (root / f"{split}_caps.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "README.txt").write_text(_readme(splits, regions, feature_dim, noise, seed),
                                     encoding="utf-8")
    return root


class _World:
    """The fixed prototypes every split draws from."""

    def __init__(self, rng, dim):
        self.nouns = rng.standard_normal((len(NOUNS), dim))
        self.attributes = rng.standard_normal((len(ATTRIBUTES), dim))
        self.appearance = rng.standard_normal((len(NOUNS), APPEARANCE_DIMS, dim)) * 0.5
        self.background = rng.standard_normal((BACKGROUND_KINDS, dim))

    def regions(self, rng, objects, count, noise):
        rows = []
        for noun, attr in objects:
            for _ in range(rng.integers(1, 4)):
                style = rng.standard_normal(APPEARANCE_DIMS)
                row = self.nouns[noun] + style @ self.appearance[noun]
                if attr is not None:
                    row = row + self.attributes[attr]
                rows.append(row)
        kinds = rng.integers(0, BACKGROUND_KINDS, count - len(rows))
        rows = np.concatenate([np.array(rows), self.background[kinds]])
        rows = rows + noise * rng.standard_normal(rows.shape)
        return rows[rng.permutation(count)]


def _sample_objects(rng, seen):
    """1-3 (noun, attribute or None) pairs, 2-4 concepts, a concept bag not in `seen`."""
    while True:
        nouns = rng.choice(len(NOUNS), size=rng.integers(1, 4), replace=False)
        attrs = [int(rng.integers(len(ATTRIBUTES))) if rng.random() < 0.5 else None
                 for _ in nouns]
        bag = (tuple(sorted(int(n) for n in nouns)),
               tuple(sorted(a for a in attrs if a is not None)))
        if 2 <= len(bag[0]) + len(bag[1]) <= 4 and bag not in seen:
            seen.add(bag)
            return [(int(n), a) for n, a in zip(nouns, attrs)]


def _pick(rng, options):
    return options[rng.integers(len(options))]


def _caption(rng, objects):
    phrases = []
    for i in rng.permutation(len(objects)):
        noun, attr = objects[i]
        words = ([_pick(rng, ATTRIBUTES[attr])] if attr is not None else []) \
            + [_pick(rng, NOUNS[noun])]
        article = "the" if rng.random() < 0.3 else ("an" if words[0][0] in "aeiou" else "a")
        phrases.append(" ".join([article, *words]))
    text = phrases[0]
    for phrase in phrases[1:]:
        text += _pick(rng, CONNECTORS) + phrase
    return _pick(rng, TEMPLATES).format(text)


def _readme(splits, regions, dim, noise, seed):
    sizes = "\n".join(f"  {split}: {n} images, {CAPTIONS_PER_IMAGE * n} captions"
                      for split, n in splits if n)
    test = splits[-1][1]
    return (
        "Synthetic retrieval data written by dive.data.make_synthetic (SCAN precomputed format).\n"
        "Not real images: each image is 1-3 objects (a noun, maybe an attribute) drawn from\n"
        f"{len(NOUNS)} nouns and {len(ATTRIBUTES)} attributes; its {regions} regions of {dim} "
        "features are noisy\nprototypes of its concepts plus background distractors, and its "
        f"{CAPTIONS_PER_IMAGE} captions name the objects\nin varied order and wording.\n\n"
        f"seed={seed} noise={noise}\n{sizes}\n\n"
        f"Chance R@1 on test: 1/{test} = {100 / test:.3f}% (image->text and text->image).\n"
    )
