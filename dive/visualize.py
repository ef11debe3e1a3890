"""Per-slot attention of a trained model over one image's regions and one caption's words (the
paper's qualitative figure), as a PNG."""
from pathlib import Path

import torch

from .data import collate_captions, collate_images
from .data.loaders import CaptionDataset, ImageDataset


def _last_round(maps):
    """(heads, K, N) weights of the last aggregation round -> (K, N), averaged over heads."""
    return maps[-1][0].float().mean(0).cpu()


@torch.no_grad()
def attention_maps(model, split, tokens, index: int, device):
    """(region weights (K, R), word weights (K, L), caption words) for image `index` of `split`
    and its first caption."""
    if not 0 <= index < split.num_images:
        raise ValueError(f"--index must be in [0, {split.num_images}), got {index}")
    model.eval()
    image = collate_images([ImageDataset(split)[index]])
    caption_index = index * split.captions_per_image
    caption = collate_captions([CaptionDataset(split, tokens)[caption_index]])
    mask = image["image_mask"]  # None for raw images (grid cells are all real)
    _, image_maps = model.encode_images(image["images"].to(device),
                                        None if mask is None else mask.to(device),
                                        return_attention=True)
    _, word_maps = model.encode_captions(caption["captions"].to(device),
                                         caption["caption_mask"].to(device),
                                         return_attention=True)
    ids = caption["captions"][0].tolist()
    words = [tokens.words[i] for i in ids] if hasattr(tokens, "words") else \
        tokens.tokenizer.convert_ids_to_tokens(ids)
    return _last_round(image_maps), _last_round(word_maps), words, split.captions[caption_index]


def attention_figure(model, split, tokens, index: int, out, device) -> Path:
    """The figure of `attention_maps`: slots x regions and slots x words heat maps; for raw
    images (the CNN setting) also each slot's weights over the grid cells laid on the image."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("dive visualize needs matplotlib: pip install matplotlib") from exc
    regions, words, labels, text = attention_maps(model, split, tokens, index, device)
    slots = regions.shape[0]
    raw = split.images.ndim == 4
    fig = plt.figure(figsize=(max(6.0, 4 + 0.35 * (regions.shape[1] + words.shape[1])),
                              1.2 + 0.5 * slots + (2.4 if raw else 0)))
    grid = fig.add_gridspec(2 if raw else 1, max(2, slots) if raw else 2,
                            height_ratios=[2.2, 0.5 * slots] if raw else None)
    if raw:
        _overlays(fig, grid, split.images[index], regions)
        left, right = fig.add_subplot(grid[1, :slots // 2 or 1]), fig.add_subplot(
            grid[1, slots // 2 or 1:])
    else:
        left, right = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    for ax, weights, title in ((left, regions, f"image {index}: "
                                + ("grid cells" if raw else "regions")),
                               (right, words, f"caption: {text[:60]}")):
        shown = ax.imshow(weights.numpy(), aspect="auto", cmap="viridis")
        fig.colorbar(shown, ax=ax, fraction=0.05, pad=0.02)
        ax.set_yticks(range(slots), [f"slot {k}" for k in range(slots)])
        ax.set_title(title, fontsize=9)
    left.set_xlabel("grid cell" if raw else "region")
    right.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    fig.suptitle("slot attention, last aggregation round, mean over heads", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _overlays(fig, grid, pixels, weights):
    """One panel per slot: the (normalised) input image under its weights over the square grid of
    cells, upsampled to the image."""
    from .data.images import MEAN, STD
    image = (pixels * STD + MEAN).clip(0, 1).transpose(1, 2, 0)
    side = round(weights.shape[1] ** 0.5)
    if side * side != weights.shape[1]:
        raise ValueError(f"{weights.shape[1]} grid cells do not form a square grid")
    h, w = image.shape[:2]
    low, top = float(weights.min()), float(weights.max())  # one colour scale for all slots
    for k in range(weights.shape[0]):
        ax = fig.add_subplot(grid[0, k])
        ax.imshow(image)
        ax.imshow(weights[k].view(side, side).numpy(), cmap="jet", alpha=0.45, vmin=low,
                  vmax=top, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
        ax.set_title(f"slot {k}", fontsize=9)
        ax.axis("off")
