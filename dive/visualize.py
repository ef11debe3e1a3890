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
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("dive visualize needs matplotlib: pip install matplotlib") from exc
    regions, words, labels, text = attention_maps(model, split, tokens, index, device)
    slots = regions.shape[0]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(4 + 0.35 * (regions.shape[1] + words.shape[1]), 1.2 + 0.5 * slots),
        gridspec_kw={"width_ratios": [regions.shape[1], words.shape[1]]})
    for ax, weights, title in ((left, regions, f"image {index}: regions"),
                               (right, words, f"caption: {text[:60]}")):
        ax.imshow(weights.numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(slots), [f"slot {k}" for k in range(slots)])
        ax.set_title(title, fontsize=9)
    left.set_xlabel("region")
    right.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
