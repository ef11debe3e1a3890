"""The model commands of the CLI: train, evaluate, demo, visualize."""
import importlib.util
import json
import time
from pathlib import Path

from . import convert
from .arguments import device, nonnegative_int, positive_float, positive_int
from .config import PRESETS, Config
from .data import load_scan, make_synthetic
from .distributed import DEFAULT_TIMEOUT
from .eval.eccv import package_order_ids
from .eval.model import evaluate, load_for_eval
from .report import chance_recalls, print_eccv_table, print_recall_table
from .runs import clear_run, load_split
from .train import train

DEFAULT_PRESET = "butd_bigru"
# The training flags that override a setting of the config's "train" section.
TRAIN_FLAGS = ("epochs", "batch_size", "lr", "seed", "save_every")


def _config(args):
    """The run's config from --config or --preset and the flags. On --resume: None when no
    option sets anything (the run keeps its own), else what they ask for, which `train`
    checks against the saved run."""
    changes = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    if args.config:
        base = Config.load(args.config)
    elif args.preset or not args.resume:
        base = PRESETS[args.preset or DEFAULT_PRESET]
    elif changes:
        last = Path(args.out) / "last.pt"
        if not last.exists():
            raise FileNotFoundError(f"--resume: {last} does not exist")
        base = Config.load(Path(args.out) / "config.json")  # the run's, then the flags
    else:
        return None
    return base.with_changes("train", **changes) if changes else base


def run_train(args):
    summary = train(_config(args), args.data, args.out, device=args.device, resume=args.resume,
                    progress=not args.quiet, image_root=args.image_root,
                    distributed_run=args.distributed, timeout=args.dist_timeout,
                    workers=args.workers)
    if summary["rank"] != 0:
        return  # rank 0 reports
    best = summary["best"]
    if "metrics" in best:
        print_recall_table(f"best (epoch {best['epoch']})", best["metrics"])
    print(f"checkpoints in {args.out}: best.pt, last.pt; log: {Path(args.out) / 'log.jsonl'}")


def _print_metrics(title, metrics, split):
    print_recall_table(f"{title} ({split.num_images} images)", metrics,
                       chance_recalls(split.num_images, split.captions_per_image))
    if "coco_1k" in metrics:
        print_recall_table("COCO 1K, 5-fold mean", metrics["coco_1k"],
                           chance_recalls(1000, split.captions_per_image))
    if "eccv" in metrics:
        print_eccv_table(metrics["eccv"])


def run_evaluate(args):
    model, tokens, config = load_for_eval(args.checkpoint, args.device)
    split = load_split(args.data, args.split, args.image_root, config.model.image_size)
    eccv_ids = package_order_ids() if args.eccv else None
    try:
        metrics = evaluate(model, split, tokens, args.device,
                           temperature=config.loss.temperature, progress=not args.quiet,
                           save_sets=args.save_sets, eccv_ids=eccv_ids)
    except ValueError as exc:  # e.g. NaN in the sets: the checkpoint is the file to blame
        raise ValueError(f"--checkpoint {args.checkpoint}: {exc}") from None
    if args.json:
        print(json.dumps(metrics))
    else:
        _print_metrics(args.split, metrics, split)
    return metrics


def run_demo(args):
    config = PRESETS["demo"].with_changes("train", seed=args.seed)
    if args.epochs is not None:
        config = config.with_changes("train", epochs=args.epochs)
    out = Path(args.out)
    data, run = out / "data", out / "run"
    t0 = time.monotonic()
    print(f"1/3 synthetic dataset -> {data}")
    make_synthetic(data, seed=args.seed)
    if run.is_dir():
        clear_run(run)  # a fresh run each time; only files a run writes are removed
    print(f"2/3 training the demo model on {args.device} ({config.train.epochs} epochs)")
    train(config, data, run, device=args.device, progress=not args.quiet)
    print("3/3 evaluating the best checkpoint on the test split")
    model, tokens, config = load_for_eval(run / "best.pt", args.device)
    split = load_scan(data, "test")
    metrics = evaluate(model, split, tokens, args.device, temperature=config.loss.temperature,
                       progress=not args.quiet)
    level = chance_recalls(split.num_images, split.captions_per_image)
    print()
    _print_metrics("test", metrics, split)
    for d in ("i2t", "t2i"):
        print(f"  {d} R@1 = {metrics[d]['r1'] / level[d]['r1']:.0f}x chance")
    print(f"done in {time.monotonic() - t0:.0f} s. Same numbers: dive evaluate --checkpoint "
          f"{run / 'best.pt'} --data {data} --split test")
    if args.json:
        print(json.dumps(metrics))
    return metrics


def run_visualize(args):
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError('needs matplotlib: pip install "dive[viz]" (or matplotlib)')
    from .visualize import attention_figure
    model, tokens, config = load_for_eval(args.checkpoint, args.device)
    split = load_split(args.data, args.split, args.image_root, config.model.image_size)
    path = attention_figure(model, split, tokens, args.index, args.out, args.device)
    print(f"wrote {path}")


def add_parsers(sub):
    """train, evaluate, demo and visualize."""
    t = sub.add_parser("train", help="train DivE on SCAN-format data")
    start = t.add_mutually_exclusive_group()
    start.add_argument("--preset", choices=sorted(PRESETS),
                       help=f"the paper's settings to start from (default {DEFAULT_PRESET})")
    start.add_argument("--config", help="a config.json (instead of --preset)")
    t.add_argument("--data", required=True, help="a SCAN folder ({train,dev,test}_ims.npy and "
                   "_caps.txt) or a Karpathy split file (with --image-root)")
    t.add_argument("--out", default="runs/dive", help="run folder (checkpoints, log)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out, with its "
                   "saved settings (options that contradict them are an error)")
    for name, kind in (("epochs", positive_int), ("batch-size", positive_int),
                       ("lr", positive_float), ("seed", nonnegative_int),
                       ("save-every", positive_int), ("workers", nonnegative_int)):
        t.add_argument(f"--{name}", type=kind)
    t.add_argument("--distributed", action="store_true",
                   help="require torchrun's process group (launched by torchrun, the run is "
                   "distributed without this flag too); --batch-size is the global batch")
    t.add_argument("--dist-timeout", type=positive_float, default=DEFAULT_TIMEOUT,
                   help="seconds a rank waits for the others at a collective before failing")
    t.set_defaults(run=run_train)
    e = sub.add_parser("evaluate", help="metrics of a trained checkpoint on a data split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test", help="test (SCAN COCO: testall = 5K), dev, ...")
    e.add_argument("--json", action="store_true")
    e.add_argument("--eccv", action="store_true", help="also ECCV Caption / CxC / COCO 1K-5K "
                   "(eccv-caption package metrics); the split must be COCO 5K test in "
                   "SCAN testall order")
    e.add_argument("--save-sets", metavar="DIR", help="also write the encoded sets there "
                   "(images.npy, captions.npy, image_ids.npy) for dive evaluate-embeddings")
    e.set_defaults(run=run_evaluate)
    d = sub.add_parser("demo", help="synthetic data -> train a small DivE -> evaluate (CPU: a "
                       "couple of minutes)")
    d.add_argument("--out", default="dive-demo", help="where the data and the run go")
    d.add_argument("--seed", type=nonnegative_int, default=0)
    d.add_argument("--epochs", type=positive_int, help="override the demo's epoch count")
    d.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    d.set_defaults(run=run_demo)
    v = sub.add_parser("visualize", help="per-slot attention over regions and words, as a PNG "
                       '(needs matplotlib: pip install "dive[viz]")')
    v.add_argument("--checkpoint", required=True)
    v.add_argument("--data", required=True)
    v.add_argument("--split", default="test")
    v.add_argument("--index", type=nonnegative_int, default=0,
                   help="image index (its first caption too)")
    v.add_argument("--out", default="attention.png")
    v.set_defaults(run=run_visualize)
    for p in (t, e, v):
        p.add_argument("--image-root", help="image folder, when --data is a Karpathy .json")
    for p in (t, e, d, v):
        p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda or cuda:N")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    convert.add_parser(sub)
