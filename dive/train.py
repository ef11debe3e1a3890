"""Training and evaluation of DivE on SCAN-format data: AdamW + warm-up/cosine, gradient
clipping, AMP on GPU, a JSONL log, full-gallery evaluation each epoch, best/last checkpoints, and
an exact resume from the last checkpoint (weights, optimiser, schedule, RNG and data position)."""
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import Config
from .data import (CaptionDataset, ImageDataset, PairDataset, Vocabulary, collate_captions,
                   collate_images, collate_pairs, karpathy_split, load_scan)
from .eval import coco_1k_5fold, recall_metrics
from .losses import DiveLoss
from .models import DivE
from .models.text import load_bert_tokens
from .retrieval import similarity_matrix


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def text_tokens(config: Config, run_dir: Path, captions=None):
    """The caption tokenizer: the run's saved vocabulary (built from `captions` on first use) for
    the bi-GRU, or the BERT model's own tokenizer."""
    if config.model.text_encoder == "bert":
        return load_bert_tokens(config.model.bert_path)
    path = run_dir / "vocab.json"
    if path.exists():
        return Vocabulary.load(path)
    if captions is None:
        raise FileNotFoundError(f"{path} is missing: the run's vocabulary is saved beside its "
                                "checkpoints")
    vocab = Vocabulary.build(captions)
    vocab.save(path)
    return vocab


def load_split(data, name: str, image_root=None, image_size: int = 512):
    """A split of a SCAN folder (precomputed features), or of a Karpathy split file (raw
    images under `image_root`, for the CNN setting)."""
    path = Path(data)
    if path.suffix == ".json":
        if image_root is None:
            raise ValueError(f"{path} is a Karpathy split file: give --image-root, the folder "
                             "its image paths start from")
        return karpathy_split(path, image_root, name, image_size=image_size)
    return load_scan(path, name)


def split_or_fallback(data, name: str, image_root=None, image_size: int = 512):
    """(split, its name): the dev split falls back to test when the data has none."""
    try:
        return load_split(data, name, image_root, image_size), name
    except FileNotFoundError:
        if name != "dev" or Path(data).suffix == ".json":
            raise
        return load_scan(data, "test"), "test"


# ----------------------------------------------------------------------------- evaluation


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


@torch.no_grad()
def encode_split(model, split, tokens, device, batch_size=256, progress=True):
    """(images (N_img, K, D), captions (N_cap, K, D)) sets of a whole split, in order."""
    model.eval()
    images, captions = [], []
    loader = DataLoader(ImageDataset(split), batch_size=batch_size, collate_fn=collate_images)
    for batch in tqdm(loader, desc="encode images", disable=not progress, leave=False):
        batch = _to(batch, device)
        images.append(model.encode_images(batch["images"], batch["image_mask"]).float())
    loader = DataLoader(CaptionDataset(split, tokens), batch_size=batch_size,
                        collate_fn=collate_captions)
    for batch in tqdm(loader, desc="encode captions", disable=not progress, leave=False):
        batch = _to(batch, device)
        captions.append(model.encode_captions(batch["captions"], batch["caption_mask"]).float())
    return torch.cat(images), torch.cat(captions)


def evaluate(model, split, tokens, device, *, temperature=16.0, batch_size=256, progress=True):
    """recall_metrics of the split's full gallery (images x all their captions); a COCO 5K
    test split (5,000 images) also gets the 1K five-fold average under "coco_1k"."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        images, captions = encode_split(model, split, tokens, device, batch_size, progress)
    sim = similarity_matrix(images, captions, temperature=temperature)
    metrics = recall_metrics(sim, split.captions_per_image)
    if split.num_images == 5000:
        metrics["coco_1k"] = coco_1k_5fold(sim, split.captions_per_image)
    return metrics


def load_for_eval(checkpoint, device="auto"):
    """(model, tokens, config) from a checkpoint written by `train`."""
    device = pick_device(device)
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = Config.from_dict(state["config"])
    tokens = text_tokens(config, path.parent)
    model = DivE(config.model, tokens if config.model.text_encoder == "bigru" else None)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokens, config


# ----------------------------------------------------------------------------- training


def _rng_state(device):
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save(path: Path, state: dict):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-write never leaves a truncated checkpoint


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list:
    """The epoch's shuffled batches of pair indices; a function of (seed, epoch) only, so a
    resumed run sees the same order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]


def param_groups(model, tc) -> list:
    """The set prediction modules at lr * spm_lr_scale, everything else at lr (the paper)."""
    spm = [p for n, p in model.named_parameters() if ".head.spm." in n]
    chosen = {id(p) for p in spm}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    return [{"params": rest, "lr": tc.lr}, {"params": spm, "lr": tc.lr * tc.spm_lr_scale}]


class Log:
    def __init__(self, path: Path):
        self.path = path

    def write(self, **record):
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def train(config: Config, data_dir, out_dir, *, device="auto", resume=False,
          progress=True, image_root=None) -> dict:
    """Train, evaluating on the validation split each epoch; returns the final summary."""
    device = pick_device(device)
    out = Path(out_dir)
    last_path = out / "last.pt"
    if resume:
        if not last_path.exists():
            raise FileNotFoundError(f"--resume: {last_path} does not exist")
        state = torch.load(last_path, map_location="cpu", weights_only=False)
        config = Config.from_dict(state["config"])  # the run's own settings, not the caller's
    else:
        if last_path.exists():
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or "
                                  "choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        state = None
    tc = config.train

    size = config.model.image_size
    train_split = load_split(data_dir, "train", image_root, size)
    val_split, val_name = split_or_fallback(data_dir, tc.val_split, image_root, size)
    if config.model.image_encoder == "regions":
        if train_split.images.ndim != 3:
            raise ValueError("image_encoder='regions' needs precomputed features (a SCAN "
                             "folder); raw images need a 'resnet' preset")
        region_dim = train_split.images.shape[2]
        if config.model.region_dim != region_dim:
            config = config.with_changes("model", region_dim=region_dim)
    elif train_split.images.ndim != 4:
        raise ValueError("image_encoder='resnet' needs raw images (a Karpathy split file with "
                         "--image-root), not precomputed features")
    config.save(out / "config.json")
    tokens = text_tokens(config, out, train_split.captions)

    torch.manual_seed(tc.seed)
    model = DivE(config.model, tokens if config.model.text_encoder == "bigru" else None)
    model.to(device)
    # Hardest negatives from the first step tend to collapse every embedding together, so the
    # first epochs rank against all negatives (the reference's tri_mean_to_max).
    warm_criterion = DiveLoss(dataclasses.replace(config.loss, hardest=False))
    hard_criterion = DiveLoss(config.loss)
    optimizer = torch.optim.AdamW(param_groups(model, tc), weight_decay=tc.weight_decay)
    pairs = PairDataset(train_split, tokens)
    steps_per_epoch = math.ceil(len(pairs) / tc.batch_size)
    total = steps_per_epoch * tc.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, total))
    use_amp = tc.amp and device.type == "cuda"
    amp_dtype = (torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported()
                 else torch.float16)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    step, epoch, start_batch, best = 0, 0, 0, {"rsum": -1.0}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, start_batch, best = (state["step"], state["epoch"], state["batch"],
                                          state["best"])
        _set_rng_state(state["rng"], device)
    log = Log(out / "log.jsonl")

    def checkpoint(batch_in_epoch):
        _save(last_path, {"config": config.to_dict(), "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                          "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                          "batch": batch_in_epoch, "best": best, "rng": _rng_state(device)})

    started = time.monotonic()
    while epoch < tc.epochs:
        model.train()
        criterion = warm_criterion if epoch < tc.warm_epochs else hard_criterion
        batches = epoch_batches(len(pairs), tc.batch_size, tc.seed, epoch)
        # A private generator: each new DataLoader iterator draws a seed from its generator, and
        # drawing it from the global one would shift the dropout stream of a resumed run.
        loader = DataLoader(pairs, batch_sampler=batches[start_batch:], collate_fn=collate_pairs,
                            generator=torch.Generator())
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not progress,
                   initial=start_batch, total=len(batches))
        for i, batch in enumerate(bar, start=start_batch):
            batch = _to(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                img, cap = model(batch["images"], batch["image_mask"], batch["captions"],
                                 batch["caption_mask"])
            loss, terms = criterion(img.sets.float(), cap.sets.float(), batch["image_ids"],
                                    batch["image_ids"], img_residuals=img.slots.float(),
                                    cap_residuals=cap.slots.float())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            step += 1
            if step % tc.log_every == 0 or step == 1:
                log.write(event="step", step=step, epoch=epoch, loss=loss.item(),
                          **{k: float(v) for k, v in terms.items()},
                          grad_norm=float(grad_norm), lr=schedule.get_last_lr()[0])
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % tc.save_every == 0:
                checkpoint(i + 1)
        bar.close()
        epoch, start_batch = epoch + 1, 0
        metrics = evaluate(model, val_split, tokens, device, temperature=config.loss.temperature,
                           batch_size=tc.eval_batch_size, progress=progress)
        log.write(event="eval", epoch=epoch, step=step, split=val_name, **metrics)
        if metrics["rsum"] > best["rsum"]:
            best = {"rsum": metrics["rsum"], "epoch": epoch, "metrics": metrics}
            _save(out / "best.pt", {"config": config.to_dict(), "model": model.state_dict(),
                                    "epoch": epoch, "step": step, "metrics": metrics})
        checkpoint(0)
        if progress:
            tqdm.write(f"epoch {epoch}: rsum {metrics['rsum']:.1f}  i2t R@1 "
                       f"{metrics['i2t']['r1']:.1f}  t2i R@1 {metrics['t2i']['r1']:.1f}")
    summary = {"steps": step, "epochs": epoch, "best": best,
               "seconds": time.monotonic() - started}
    log.write(event="done", **summary)
    return summary
