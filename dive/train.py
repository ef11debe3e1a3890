"""Training of DivE: AdamW + warm-up/cosine, gradient clipping, AMP on GPU, a JSONL log,
full-gallery evaluation each epoch (dive.eval.model), best/last checkpoints, and an exact resume
from the last checkpoint (weights, optimiser, schedule, RNG, data position and log)."""
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm.auto import tqdm

from . import ddp, distributed
from .config import Config
from .data import (Augmentation, ImageCaptionsDataset, PairDataset, RetrievalSplit,
                   collate_image_captions, collate_pairs)
from .eval.model import evaluate
from .io import atomic_write
from .losses import DiveLoss
from .models import DivE
from .paper import first_images, official_hyperparameters
from .runs import (clear_run, load_checkpoint, load_split, pick_device, split_or_fallback,
                   text_tokens, to_device)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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
    atomic_write(path, lambda tmp: torch.save(state, tmp))  # never a truncated checkpoint


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
    """log.jsonl: one JSON record a line. A checkpoint keeps the log's size, and a resume cuts
    the log back to it, so every step is in the log once."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **record):
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, size: int):
        if self.path.exists() and self.path.stat().st_size > size:
            with open(self.path, "r+b") as fh:
                fh.truncate(size)


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




def train(config: Optional[Config], data_dir, out_dir, *, device="auto", resume=False,
          progress=True, image_root=None, distributed_run=None,
          timeout: float = distributed.DEFAULT_TIMEOUT, workers=None) -> dict:
    """Train, evaluating on the validation split each epoch; returns the final summary (steps,
    epochs, best metrics, seconds, world_size, and this process's rank).

    A new run (`resume=False`) refuses a folder that holds one (a last.pt) and replaces every
    other file a run writes there, so nothing of a failed start is reused. With `resume` the
    run in `out_dir` goes on with its saved settings: `config` None, or one equal to the saved
    one but for `workers` (ValueError naming the settings that differ).

    Under torchrun (or with distributed_run=True, which then requires it) every rank runs this:
    DistributedDataParallel over a DistributedSampler shard of each global batch of
    `batch_size`, the loss on the whole global batch (`batch_loss`), BatchNorm over it, sharded
    evaluation; rank 0 alone logs and writes checkpoints. Collectives time out after `timeout`
    seconds; an error on one rank during set-up is raised on all of them. `workers` (DataLoader
    processes) overrides the config's, on a resume too: the results do not depend on it.
    """
    started_group = _start_distributed(distributed_run, timeout)
    try:
        device = _rank_device(pick_device(device))
        with distributed.fail_together("starting the run"):
            setup = _setup(config, data_dir, Path(out_dir), resume, workers, image_root)
        return _Run(setup, device, progress).fit()
    finally:
        if started_group:
            dist.destroy_process_group()


@dataclass
class _Setup:
    config: Config
    out: Path
    train_split: RetrievalSplit
    val_split: RetrievalSplit
    val_name: str
    tokens: object
    state: Optional[dict]  # the checkpoint to resume from


def _setup(config, data_dir, out: Path, resume, workers, image_root) -> _Setup:
    """The run's settings, data and tokenizer; the folder made (or checked, on a resume)."""
    main = distributed.rank() == 0
    if config is None and not resume:
        raise ValueError("a new run needs a config (a preset from dive.config.PRESETS)")
    if resume:
        state = _resume_state(out, config)
        config = state["config"]  # the run's own settings
    else:
        state = None
        _new_folder(out, main)
    if workers is not None:
        config = config.with_changes("train", workers=workers)
    tc = config.train
    epoch_batches(1, tc.batch_size, tc.seed, 0)  # the batch must split over the ranks
    size = config.model.image_size
    train_split = load_split(data_dir, "train", image_root, size)
    val_split, val_name = split_or_fallback(data_dir, tc.val_split, image_root, size)
    val_split = first_images(val_split, tc.val_images)
    config = _fit_images(config, train_split)
    if main:
        config.save(out / "config.json")
    tokens = text_tokens(config, out, None if resume else train_split.captions, save=main)
    return _Setup(config, out, train_split, val_split, val_name, tokens, state)


def _new_folder(out: Path, main: bool):
    if (out / "last.pt").exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or "
                              "choose another --out")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        clear_run(out)  # what a failed start left: a stale vocabulary, log, best.pt


def _resume_state(out: Path, config: Optional[Config]) -> dict:
    path = out / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"--resume: {path} does not exist")
    state = load_checkpoint(path, keys=("config", "model", "optimizer", "schedule", "scaler",
                                        "step", "epoch", "batch", "best", "rng"))
    saved_world, world = state.get("world_size", 1), distributed.world_size()
    if saved_world != world:
        raise ValueError(f"{path} was written by a run on {saved_world} rank(s) and this one "
                         f"has {world}: resume with as many (torchrun --nproc-per-node / "
                         "--nnodes), or start a new run")
    if config is not None:
        _check_same_run(config, state["config"], path)
    return state


# Settings a resume may change: workers (the results do not depend on it) and region_dim (set
# from the data, so a preset's default differs from what the run saved).
_RESUME_FREE = ("train.workers", "model.region_dim")


def _check_same_run(given: Config, saved: Config, path: Path):
    """ValueError naming each setting in which `given` contradicts the saved run."""
    def flat(config):
        return {f"{section}.{key}": value for section, values in config.to_dict().items()
                for key, value in values.items() if f"{section}.{key}" not in _RESUME_FREE}
    want, have = flat(given), flat(saved)
    differ = [key for key in have if want.get(key) != have[key]]
    if differ:
        listing = ", ".join(f"{key} {want.get(key)!r} (the run has {have[key]!r})"
                            for key in differ)
        raise ValueError(f"--resume: {listing} contradicts the run saved in {path}: a resumed "
                         "run keeps its settings; drop those options, or start a new run in "
                         "another --out")


def _fit_images(config: Config, split) -> Config:
    """The config with the region size of the data; ValueError when the image encoder does not
    fit the data (features against raw images)."""
    if config.model.image_encoder == "regions":
        if split.images.ndim != 3:
            raise ValueError("image_encoder='regions' needs precomputed features (a SCAN "
                             "folder); raw images need a 'resnet' preset")
        region_dim = split.images.shape[2]
        if config.model.region_dim != region_dim:
            config = config.with_changes("model", region_dim=region_dim)
    elif split.images.ndim != 4:
        raise ValueError("image_encoder='resnet' needs raw images (a Karpathy split file "
                         "with --image-root), not precomputed features")
    return config


class _Run:
    """One process's part of a run: the model, its optimiser and schedule, the training data
    and the counters; `fit` trains from wherever the saved state left off."""

    def __init__(self, setup: _Setup, device: torch.device, progress: bool):
        self.setup, self.config, self.tc = setup, setup.config, setup.config.train
        self.device, self.rank, self.world = device, distributed.rank(), distributed.world_size()
        self.main = self.rank == 0
        self.progress = progress and self.main
        self._build_model()
        self._build_training()
        self.step, self.epoch, self.start_batch, self.best = 0, 0, 0, {"rsum": -1.0}
        self.log = Log(setup.out / "log.jsonl") if self.main else None
        if setup.state is not None:
            self._restore(setup.state)
        elif self.main:
            self.log.write(event="config", **official_hyperparameters(self.config))

    def _build_model(self):
        tc, model_config = self.tc, self.config.model
        torch.manual_seed(tc.seed)
        bigru = model_config.text_encoder == "bigru"
        net = DivE(model_config, self.setup.tokens if bigru else None).to(self.device)
        model = net
        if self.world > 1:
            net = ddp.sync_batchnorm(net)
            # BERT's pooler is never used ([CLS] of the last layer is the global feature).
            model = DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=model_config.text_encoder == "bert")
        if self.rank:
            # Dropout differs per rank; rank 0 keeps the single-process stream, so that
            # torchrun with one process trains exactly as a plain run.
            torch.manual_seed(tc.seed + 1_000_003 * self.rank)
        self.net, self.model = net, model

    def _build_training(self):
        tc, config = self.tc, self.config
        # With warm_epochs > 0 (the demo; the paper presets have none) the first epochs rank
        # against all negatives, then the hardest ones (the reference's tri_mean_to_max).
        self.warm_criterion = DiveLoss(dataclasses.replace(config.loss, hardest=False))
        self.hard_criterion = DiveLoss(config.loss)
        self.optimizer = torch.optim.AdamW(param_groups(self.net, tc),
                                           weight_decay=tc.weight_decay)
        augment = Augmentation.from_config(tc)
        split, tokens = self.setup.train_split, self.setup.tokens
        if tc.sampling == "image":
            self.items, self.collate = (ImageCaptionsDataset(split, tokens, augment),
                                        collate_image_captions)
        else:
            self.items, self.collate = PairDataset(split, tokens, augment), collate_pairs
        total = len(epoch_batches(len(self.items), tc.batch_size, tc.seed, 0)) * tc.epochs
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, tc.warmup_steps, total))
        self.use_amp = tc.amp and self.device.type == "cuda"
        self.amp_dtype = (torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported()
                          else torch.float16)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

    def _restore(self, state: dict):
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.start_batch, self.best = (state["step"], state["epoch"],
                                                              state["batch"], state["best"])
        rng = state["rng"]
        _set_rng_state(rng[self.rank] if isinstance(rng, list) else rng, self.device)
        if self.main and "log_bytes" in state:
            self.log.truncate(state["log_bytes"])  # records after the checkpoint come again

    def fit(self) -> dict:
        started = time.monotonic()
        while self.epoch < self.tc.epochs:
            self._train_epoch()
            self._end_epoch()
        summary = {"steps": self.step, "epochs": self.epoch, "best": self.best,
                   "seconds": time.monotonic() - started, "world_size": self.world}
        if self.main:
            self.log.write(event="done", **summary)
        return {**summary, "rank": self.rank}

    def _train_epoch(self):
        tc = self.tc
        self.model.train()
        criterion = self.warm_criterion if self.epoch < tc.warm_epochs else self.hard_criterion
        batches = epoch_batches(len(self.items), tc.batch_size, tc.seed, self.epoch)
        self.items.set_epoch(self.epoch)
        # A private generator: each new DataLoader iterator draws a seed from its generator,
        # and drawing it from the global one would shift the dropout stream of a resumed run.
        loader = DataLoader(self.items, batch_sampler=batches[self.start_batch:],
                            collate_fn=self.collate, generator=torch.Generator(),
                            num_workers=tc.workers, pin_memory=self.device.type == "cuda")
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{tc.epochs}",
                   disable=not self.progress, initial=self.start_batch, total=len(batches))
        for i, batch in enumerate(bar, start=self.start_batch):
            loss, terms, grad_norm = self._step(to_device(batch, self.device), criterion)
            self.step += 1
            if self.main and (self.step % tc.log_every == 0 or self.step == 1):
                self.log.write(event="step", step=self.step, epoch=self.epoch, loss=loss.item(),
                               **{k: float(v) for k, v in terms.items()},
                               grad_norm=float(grad_norm), lr=self.schedule.get_last_lr()[0])
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if self.step % tc.save_every == 0:
                self._checkpoint(i + 1)
        bar.close()
        self.epoch, self.start_batch = self.epoch + 1, 0

    def _step(self, batch: dict, criterion):
        """One optimiser step on a batch: (loss, its terms, the gradient norm before clipping)."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            img, cap = self.model(batch["images"], batch["image_mask"], batch["captions"],
                                  batch["caption_mask"])
        loss, terms = batch_loss(criterion, img, cap, batch["image_ids"],
                                 batch["caption_image_ids"])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        return loss, terms, grad_norm

    def _end_epoch(self):
        """Validation, best.pt when it improved, and the epoch's last.pt."""
        setup, config = self.setup, self.config
        metrics = evaluate(self.net, setup.val_split, setup.tokens, self.device,
                           temperature=config.loss.temperature,
                           batch_size=self.tc.eval_batch_size, progress=self.progress,
                           workers=self.tc.workers)
        if self.main:
            self.log.write(event="eval", epoch=self.epoch, step=self.step, split=setup.val_name,
                           **metrics)
        if metrics["rsum"] > self.best["rsum"]:
            self.best = {"rsum": metrics["rsum"], "epoch": self.epoch, "metrics": metrics}
            if self.main:
                _save(setup.out / "best.pt", {"config": config.to_dict(),
                                              "model": self.net.state_dict(),
                                              "epoch": self.epoch, "step": self.step,
                                              "metrics": metrics})
        self._checkpoint(0)
        if self.progress:
            tqdm.write(f"epoch {self.epoch}: rsum {metrics['rsum']:.1f}  i2t R@1 "
                       f"{metrics['i2t']['r1']:.1f}  t2i R@1 {metrics['t2i']['r1']:.1f}")

    def _checkpoint(self, batch_in_epoch: int):
        rng = distributed.gather_object(_rng_state(self.device))  # a collective: every rank
        if self.main:
            _save(self.setup.out / "last.pt", {
                "config": self.config.to_dict(), "model": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                "batch": batch_in_epoch, "best": self.best, "rng": rng,
                "world_size": self.world, "log_bytes": self.log.size()})
