"""Evaluation of a DivE model: the sets of a whole split, the recall metrics of its full gallery
(sharded over the ranks under torch.distributed), and loading a checkpoint for it.

Not re-exported by dive.eval: this module imports dive.ddp, which imports dive.eval.recall.
"""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .. import ddp, distributed
from ..data import CaptionDataset, ImageDataset, collate_captions, collate_images
from ..models import DivE
from ..retrieval import similarity_matrix
from ..runs import load_checkpoint, pick_device, text_tokens, to_device
from .eccv import eccv_metrics
from .recall import coco_1k_5fold, recall_metrics, sharded_recall


@torch.no_grad()
def encode_split(model, split, tokens, device, batch_size=256, progress=True, images=None,
                 captions=None, workers=0):
    """(images (N_img, K, D), captions (N_cap, K, D)) sets of a whole split, in order, or of the
    ranges `images` / `captions` of it; `workers` DataLoader processes read the data."""
    model.eval()
    image_data, caption_data = ImageDataset(split), CaptionDataset(split, tokens)
    if images is not None:
        image_data = Subset(image_data, images)
    if captions is not None:
        caption_data = Subset(caption_data, captions)
    out_images, out_captions = [], []
    loader = DataLoader(image_data, batch_size=batch_size, collate_fn=collate_images,
                        num_workers=workers)
    for batch in tqdm(loader, desc="encode images", disable=not progress, leave=False):
        batch = to_device(batch, device)
        out_images.append(model.encode_images(batch["images"], batch["image_mask"]).float())
    loader = DataLoader(caption_data, batch_size=batch_size, collate_fn=collate_captions,
                        num_workers=workers)
    for batch in tqdm(loader, desc="encode captions", disable=not progress, leave=False):
        batch = to_device(batch, device)
        out_captions.append(model.encode_captions(batch["captions"],
                                                  batch["caption_mask"]).float())
    return _cat(out_images), _cat(out_captions)


def _cat(parts: list) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0)


def check_finite(name: str, sets: torch.Tensor) -> None:
    """ValueError naming the rows of `sets` that hold NaN or inf: such a set would rank as
    nothing in particular, and its scores would look like numbers."""
    bad = (~torch.isfinite(sets)).flatten(1).any(1).nonzero().flatten().tolist() \
        if sets.numel() else []
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise ValueError(f"{name}: {len(bad)} of {len(sets)} sets hold NaN or inf (rows "
                         f"{shown})")


def evaluate(model, split, tokens, device, *, temperature=16.0, batch_size=256, progress=True,
             workers=0, save_sets=None, eccv_ids=None):
    """recall_metrics of the split's full gallery (images x all their captions); a COCO 5K
    test split (5,000 images) also gets the 1K five-fold average under "coco_1k". With
    `save_sets` (a folder; one process only) the encoded sets go there as images.npy and
    captions.npy (float32 (N, K, D), split order) beside image_ids.npy, the input of
    `dive evaluate-embeddings`. A model whose sets hold NaN or inf is a ValueError.

    Under torch.distributed (a collective): each rank encodes its share of the images and
    captions, the sets are gathered, and `sharded_recall` splits the matrix over the
    ranks; every rank returns the same metrics.
    """
    coco_1k = split.num_images == 5000
    sharded = distributed.world_size() > 1
    if sharded and save_sets is not None:
        raise ValueError("save_sets works in a single process only")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if sharded:
            images, captions = encode_split(
                model, split, tokens, device, batch_size, progress,
                images=ddp.shard_range(split.num_images),
                captions=ddp.shard_range(split.num_captions), workers=workers)
            images, captions = ddp.gather_rows(images), ddp.gather_rows(captions)
        else:
            images, captions = encode_split(model, split, tokens, device, batch_size, progress,
                                            workers=workers)
    check_finite("the model's image sets", images)
    check_finite("the model's caption sets", captions)
    if sharded:
        return sharded_recall(images, captions, split.captions_per_image,
                                  temperature=temperature, coco_1k=coco_1k)
    if save_sets is not None:
        save_split_sets(Path(save_sets), images, captions, split)
    sim = similarity_matrix(images, captions, temperature=temperature)
    metrics = recall_metrics(sim, split.captions_per_image)
    if coco_1k:
        metrics["coco_1k"] = coco_1k_5fold(sim, split.captions_per_image)
    if eccv_ids is not None:  # (image ids, caption ids): ECCV Caption / CxC (dive.eval.eccv)
        metrics["eccv"] = eccv_metrics(sim, *eccv_ids)
    return metrics


def save_split_sets(folder: Path, images, captions, split):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", images.cpu().numpy())
    np.save(folder / "captions.npy", captions.cpu().numpy())
    np.save(folder / "image_ids.npy", split.image_ids)


def load_for_eval(checkpoint, device="auto"):
    """(model, tokens, config) from a checkpoint written by `dive.train.train`."""
    device = pick_device(device)
    path = Path(checkpoint)
    state = load_checkpoint(path)
    config = state["config"]
    tokens = text_tokens(config, path.parent)
    model = DivE(config.model, tokens if config.model.text_encoder == "bigru" else None)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        reason = str(exc).splitlines()[0]
        raise ValueError(f"checkpoint {path}: its weights do not fit its config ({reason})") \
            from None
    return model.to(device).eval(), tokens, config
