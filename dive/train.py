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
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from . import ddp, distributed
from .config import Config
from .data import (Augmentation, CaptionDataset, ImageCaptionsDataset, ImageDataset,
                   PairDataset, Vocabulary, collate_captions, collate_image_captions,
                   collate_images, collate_pairs, karpathy_split, load_scan)
from .eval import coco_1k_5fold, eccv_metrics, recall_metrics
from .losses import DiveLoss
from .models import DivE
from .models.text import load_bert_tokens
from .paper import first_images, official_hyperparameters
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


def text_tokens(config: Config, run_dir: Path, captions=None, save: bool = True):
    """The caption tokenizer: the run's saved vocabulary (built from `captions` on first use,
    and written there when `save`) for the bi-GRU, or the BERT model's own tokenizer."""
    if config.model.text_encoder == "bert":
        return load_bert_tokens(config.model.bert_path)
    path = run_dir / "vocab.json"
    if path.exists():
        return Vocabulary.load(path)
    if captions is None:
        raise FileNotFoundError(f"{path} is missing: the run's vocabulary is saved beside its "
                                "checkpoints")
    vocab = Vocabulary.build(captions)
    if save:
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
        batch = _to(batch, device)
        out_images.append(model.encode_images(batch["images"], batch["image_mask"]).float())
    loader = DataLoader(caption_data, batch_size=batch_size, collate_fn=collate_captions,
                        num_workers=workers)
    for batch in tqdm(loader, desc="encode captions", disable=not progress, leave=False):
        batch = _to(batch, device)
        out_captions.append(model.encode_captions(batch["captions"],
                                                  batch["caption_mask"]).float())
    return _cat(out_images), _cat(out_captions)


def _cat(parts: list) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0)


def evaluate(model, split, tokens, device, *, temperature=16.0, batch_size=256, progress=True,
             workers=0, save_sets=None, eccv_ids=None):
    """recall_metrics of the split's full gallery (images x all their captions); a COCO 5K
    test split (5,000 images) also gets the 1K five-fold average under "coco_1k". With
    `save_sets` (a folder; one process only) the encoded sets go there as images.npy and
    captions.npy (float32 (N, K, D), split order) beside image_ids.npy, the input of
    `dive evaluate-embeddings`.

    Under torch.distributed (a collective): each rank encodes its share of the images and
    captions, the sets are gathered, and `dive.ddp.sharded_recall` splits the matrix over the
    ranks; every rank returns the same metrics.
    """
    coco_1k = split.num_images == 5000
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if distributed.world_size() > 1:
            if save_sets is not None:
                raise ValueError("save_sets works in a single process only")
            images, captions = encode_split(
                model, split, tokens, device, batch_size, progress,
                images=ddp.shard_range(split.num_images),
                captions=ddp.shard_range(split.num_captions), workers=workers)
            images, captions = ddp.gather_rows(images), ddp.gather_rows(captions)
            return ddp.sharded_recall(images, captions, split.captions_per_image,
                                      temperature=temperature, coco_1k=coco_1k)
        images, captions = encode_split(model, split, tokens, device, batch_size, progress,
                                        workers=workers)
    if save_sets is not None:
        _save_sets(Path(save_sets), images, captions, split)
    sim = similarity_matrix(images, captions, temperature=temperature)
    metrics = recall_metrics(sim, split.captions_per_image)
    if coco_1k:
        metrics["coco_1k"] = coco_1k_5fold(sim, split.captions_per_image)
    if eccv_ids is not None:  # (image ids, caption ids): ECCV Caption / CxC (dive.eval.eccv)
        metrics["eccv"] = eccv_metrics(sim, *eccv_ids)
    return metrics


def _save_sets(folder: Path, images, captions, split):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", images.cpu().numpy())
    np.save(folder / "captions.npy", captions.cpu().numpy())
    np.save(folder / "image_ids.npy", split.image_ids)


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
    """This rank's batches of item indices (images or pairs) for the epoch: a
    DistributedSampler's shard of a shuffle that is a function of (seed, epoch) only, so a
    resumed run sees the same order, cut into batch_size / W per rank. Batch b of every rank
    together is the global batch b that a single process with batch_size would take (the
    positions bW.., (b+1)W.. of the shuffle)."""
    world = distributed.world_size()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is the global batch: it must be a multiple of "
                         f"the {world} ranks")
    sampler = DistributedSampler(range(n), num_replicas=world, rank=distributed.rank(),
                                 shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(BatchSampler(sampler, batch_size // world, drop_last=False))


def param_groups(model, tc) -> list:
    """The reference's learning rates: lr * spm_lr_scale for the image encoder but its ResNet
    backbone (projection, set prediction module, global feature) and for the text encoder's set
    prediction module; lr for the rest (backbone, word embeddings, GRU or BERT)."""
    def scaled(name):
        if name.startswith("image_encoder."):
            return ".backbone." not in name
        return ".head.spm." in name
    named = list(model.named_parameters())
    slow = [p for n, p in named if scaled(n)]
    rest = [p for n, p in named if not scaled(n)]
    return [{"params": rest, "lr": tc.lr}, {"params": slow, "lr": tc.lr * tc.spm_lr_scale}]


class Log:
    def __init__(self, path: Path):
        self.path = path

    def write(self, **record):
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))  # autocast outputs bf16/fp16


def _sets(out, ids):
    """The global batch's sets, slots and image ids, gathered from every rank with gradient."""
    return (ddp.gather_grad(_at_least_fp32(out.sets)), ddp.gather_grad(_at_least_fp32(out.slots)),
            ddp.gather_rows(ids))


def batch_loss(criterion, img, cap, image_ids, caption_image_ids=None):
    """The loss of the global batch from this rank's model outputs (SetPrediction), the image
    id of each image row and of each caption (default: the same, for pairs): the same value on
    every rank, and gradients through `ddp.gather_grad`."""
    if caption_image_ids is None:
        caption_image_ids = image_ids
    img_sets, img_slots, img_ids = _sets(img, image_ids)
    cap_sets, cap_slots, cap_ids = _sets(cap, caption_image_ids)
    return criterion(img_sets, cap_sets, img_ids, cap_ids, img_residuals=img_slots,
                     cap_residuals=cap_slots)


def _start_distributed(requested, timeout: float) -> bool:
    """Joins torchrun's process group when asked to or when launched by torchrun; whether this
    call started it (and so ends it)."""
    launched = "WORLD_SIZE" in os.environ
    if requested and not launched and not dist.is_initialized():
        raise ValueError("--distributed: this process was not launched by torchrun (no "
                         "WORLD_SIZE in the environment): run `torchrun --nproc-per-node N -m "
                         "dive train ...`, or drop --distributed for a single process")
    if not (requested or launched) or dist.is_initialized():
        return False
    distributed.init(timeout=timeout)
    return True


def _rank_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None and distributed.world_size() > 1:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def train(config: Config, data_dir, out_dir, *, device="auto", resume=False,
          progress=True, image_root=None, distributed_run=None,
          timeout: float = distributed.DEFAULT_TIMEOUT, workers=None) -> dict:
    """Train, evaluating on the validation split each epoch; returns the final summary (steps,
    epochs, best metrics, seconds, world_size, and this process's rank).

    Under torchrun (or with distributed_run=True, which then requires it) every rank runs this:
    DistributedDataParallel over a DistributedSampler shard of each global batch of
    `batch_size`, the loss on the whole global batch (`batch_loss`), BatchNorm over it, sharded
    evaluation; rank 0 alone logs and writes checkpoints. Collectives time out after `timeout`
    seconds; an error on one rank during set-up is raised on all of them. `workers` (DataLoader
    processes) overrides the config's, on a resume too: the results do not depend on it.
    """
    started_group = _start_distributed(distributed_run, timeout)
    try:
        return _train(config, data_dir, out_dir, device, resume, progress, image_root, workers)
    finally:
        if started_group:
            dist.destroy_process_group()


def _train(config, data_dir, out_dir, device, resume, progress, image_root, workers):
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    progress = progress and main
    device = _rank_device(pick_device(device))
    out = Path(out_dir)
    last_path = out / "last.pt"
    with distributed.fail_together("starting the run"):
        if resume:
            if not last_path.exists():
                raise FileNotFoundError(f"--resume: {last_path} does not exist")
            state = torch.load(last_path, map_location="cpu", weights_only=False)
            config = Config.from_dict(state["config"])  # the run's own settings
            saved_world = state.get("world_size", 1)
            if saved_world != world:
                raise ValueError(f"{last_path} was written by a run on {saved_world} "
                                 f"rank(s) and this one has {world}: resume with as many "
                                 "(torchrun --nproc-per-node / --nnodes), or start a new run")
        else:
            if last_path.exists():
                raise FileExistsError(f"{out} already holds a run; pass --resume to continue "
                                      "it or choose another --out")
            if main:
                out.mkdir(parents=True, exist_ok=True)
            state = None
        if workers is not None:
            config = config.with_changes("train", workers=workers)
        tc = config.train
        epoch_batches(1, tc.batch_size, tc.seed, 0)  # the batch must split over the ranks

        size = config.model.image_size
        train_split = load_split(data_dir, "train", image_root, size)
        val_split, val_name = split_or_fallback(data_dir, tc.val_split, image_root, size)
        val_split = first_images(val_split, tc.val_images)
        if config.model.image_encoder == "regions":
            if train_split.images.ndim != 3:
                raise ValueError("image_encoder='regions' needs precomputed features (a SCAN "
                                 "folder); raw images need a 'resnet' preset")
            region_dim = train_split.images.shape[2]
            if config.model.region_dim != region_dim:
                config = config.with_changes("model", region_dim=region_dim)
        elif train_split.images.ndim != 4:
            raise ValueError("image_encoder='resnet' needs raw images (a Karpathy split file "
                             "with --image-root), not precomputed features")
        if main:
            config.save(out / "config.json")
        tokens = text_tokens(config, out, train_split.captions, save=main)

    torch.manual_seed(tc.seed)
    net = DivE(config.model, tokens if config.model.text_encoder == "bigru" else None)
    net.to(device)
    model = net
    if world > 1:
        net = ddp.sync_batchnorm(net)
        # BERT's pooler is never used ([CLS] of the last layer is the global feature).
        model = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.model.text_encoder == "bert")
    if rank:
        # Dropout differs per rank; rank 0 keeps the single-process stream, so that torchrun
        # with one process trains exactly as a plain run.
        torch.manual_seed(tc.seed + 1_000_003 * rank)
    # With warm_epochs > 0 (the demo; the paper presets have none) the first epochs rank
    # against all negatives, then the hardest ones (the reference's tri_mean_to_max).
    warm_criterion = DiveLoss(dataclasses.replace(config.loss, hardest=False))
    hard_criterion = DiveLoss(config.loss)
    optimizer = torch.optim.AdamW(param_groups(net, tc), weight_decay=tc.weight_decay)
    augment = Augmentation.from_config(tc)
    if tc.sampling == "image":
        items, collate = ImageCaptionsDataset(train_split, tokens, augment), collate_image_captions
    else:
        items, collate = PairDataset(train_split, tokens, augment), collate_pairs
    steps_per_epoch = len(epoch_batches(len(items), tc.batch_size, tc.seed, 0))
    total = steps_per_epoch * tc.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, total))
    use_amp = tc.amp and device.type == "cuda"
    amp_dtype = (torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported()
                 else torch.float16)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    step, epoch, start_batch, best = 0, 0, 0, {"rsum": -1.0}
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, start_batch, best = (state["step"], state["epoch"], state["batch"],
                                          state["best"])
        rng = state["rng"]
        _set_rng_state(rng[rank] if isinstance(rng, list) else rng, device)
    log = Log(out / "log.jsonl") if main else None
    if main and state is None:
        log.write(event="config", **official_hyperparameters(config))

    def checkpoint(batch_in_epoch):
        rng = distributed.gather_object(_rng_state(device))  # a collective: every rank calls
        if main:
            _save(last_path, {"config": config.to_dict(), "model": net.state_dict(),
                              "optimizer": optimizer.state_dict(),
                              "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                              "step": step, "epoch": epoch, "batch": batch_in_epoch,
                              "best": best, "rng": rng, "world_size": world})

    started = time.monotonic()
    while epoch < tc.epochs:
        model.train()
        criterion = warm_criterion if epoch < tc.warm_epochs else hard_criterion
        batches = epoch_batches(len(items), tc.batch_size, tc.seed, epoch)
        items.set_epoch(epoch)
        # A private generator: each new DataLoader iterator draws a seed from its generator, and
        # drawing it from the global one would shift the dropout stream of a resumed run.
        loader = DataLoader(items, batch_sampler=batches[start_batch:], collate_fn=collate,
                            generator=torch.Generator(), num_workers=tc.workers,
                            pin_memory=device.type == "cuda")
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not progress,
                   initial=start_batch, total=len(batches))
        for i, batch in enumerate(bar, start=start_batch):
            batch = _to(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                img, cap = model(batch["images"], batch["image_mask"], batch["captions"],
                                 batch["caption_mask"])
            loss, terms = batch_loss(criterion, img, cap, batch["image_ids"],
                                     batch["caption_image_ids"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            step += 1
            if main and (step % tc.log_every == 0 or step == 1):
                log.write(event="step", step=step, epoch=epoch, loss=loss.item(),
                          **{k: float(v) for k, v in terms.items()},
                          grad_norm=float(grad_norm), lr=schedule.get_last_lr()[0])
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % tc.save_every == 0:
                checkpoint(i + 1)
        bar.close()
        epoch, start_batch = epoch + 1, 0
        metrics = evaluate(net, val_split, tokens, device, temperature=config.loss.temperature,
                           batch_size=tc.eval_batch_size, progress=progress,
                           workers=tc.workers)
        if main:
            log.write(event="eval", epoch=epoch, step=step, split=val_name, **metrics)
        if metrics["rsum"] > best["rsum"]:
            best = {"rsum": metrics["rsum"], "epoch": epoch, "metrics": metrics}
            if main:
                _save(out / "best.pt", {"config": config.to_dict(), "model": net.state_dict(),
                                        "epoch": epoch, "step": step, "metrics": metrics})
        checkpoint(0)
        if progress:
            tqdm.write(f"epoch {epoch}: rsum {metrics['rsum']:.1f}  i2t R@1 "
                       f"{metrics['i2t']['r1']:.1f}  t2i R@1 {metrics['t2i']['r1']:.1f}")
    summary = {"steps": step, "epochs": epoch, "best": best,
               "seconds": time.monotonic() - started, "world_size": world}
    if main:
        log.write(event="done", **summary)
    return {**summary, "rank": rank}
