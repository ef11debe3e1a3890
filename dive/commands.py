"""The model commands of the CLI: train, evaluate, demo, visualize."""
import json
import time
from pathlib import Path

from . import convert
from .config import PRESETS, Config
from .data import load_scan, make_synthetic
from .distributed import DEFAULT_TIMEOUT
from .eval.eccv import package_order_ids
from .report import chance_recalls, print_eccv_table, print_recall_table
from .train import evaluate, load_for_eval, load_split, pick_device, train

RUN_FILES = ("config.json", "vocab.json", "log.jsonl", "last.pt", "best.pt", "last.tmp",
             "best.tmp")


def _config(args) -> Config:
    if args.config:
        config = Config.load(args.config)
    else:
        config = PRESETS[args.preset]
    changes = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                 ("lr", args.lr), ("seed", args.seed),
                                 ("save_every", args.save_every)) if v is not None}
    return config.with_changes("train", **changes) if changes else config


def run_train(args):
    config = None if args.resume else _config(args)
    summary = train(config, args.data, args.out, device=args.device, resume=args.resume,
                    progress=not args.quiet, image_root=args.image_root,
                    distributed_run=args.distributed, timeout=args.dist_timeout,
                    workers=args.workers)
    if summary["rank"] != 0:
        return  # rank 0 reports
    best = summary["best"]
    if "metrics" in best:
        print_recall_table(f"best (epoch {best['epoch']})", best["metrics"])
    print(f"checkpoints in {args.out}: best.pt, last.pt; log: {Path(args.out) / 'log.jsonl'}")


def run_evaluate(args):
    model, tokens, config = load_for_eval(args.checkpoint, args.device)
    split = load_split(args.data, args.split, args.image_root, config.model.image_size)
    eccv_ids = package_order_ids() if args.eccv else None
    metrics = evaluate(model, split, tokens, pick_device(args.device),
                       temperature=config.loss.temperature, progress=not args.quiet,
                       save_sets=args.save_sets, eccv_ids=eccv_ids)
    if args.json:
        print(json.dumps(metrics))
    else:
        print_recall_table(f"{args.split} ({split.num_images} images)", metrics,
                           chance_recalls(split.num_images, split.captions_per_image))
        if "coco_1k" in metrics:
            print_recall_table("COCO 1K, 5-fold mean", metrics["coco_1k"],
                               chance_recalls(1000, split.captions_per_image))
        if "eccv" in metrics:
            print_eccv_table(metrics["eccv"])
    return metrics


def run_demo(args):
    out = Path(args.out)
    data, run = out / "data", out / "run"
    t0 = time.monotonic()
    print(f"1/3 synthetic dataset -> {data}")
    make_synthetic(data, seed=args.seed)
    for name in RUN_FILES:  # a fresh run each time; only files a run writes are removed
        (run / name).unlink(missing_ok=True)
    config = PRESETS["demo"].with_changes("train", seed=args.seed)
    if args.epochs:
        config = config.with_changes("train", epochs=args.epochs)
    device = pick_device(args.device)
    print(f"2/3 training the demo model on {device} ({config.train.epochs} epochs)")
    train(config, data, run, device=device, progress=not args.quiet)
    print("3/3 evaluating the best checkpoint on the test split")
    model, tokens, config = load_for_eval(run / "best.pt", device)
    split = load_scan(data, "test")
    metrics = evaluate(model, split, tokens, device, temperature=config.loss.temperature,
                       progress=not args.quiet)
    level = chance_recalls(split.num_images, split.captions_per_image)
    print()
    print_recall_table(f"test ({split.num_images} images)", metrics, level)
    for d in ("i2t", "t2i"):
        print(f"  {d} R@1 = {metrics[d]['r1'] / level[d]['r1']:.0f}x chance")
    print(f"done in {time.monotonic() - t0:.0f} s. Same numbers: dive evaluate --checkpoint "
          f"{run / 'best.pt'} --data {data} --split test")
    if args.json:
        print(json.dumps(metrics))
    return metrics


def run_visualize(args):
    from .visualize import attention_figure
    model, tokens, config = load_for_eval(args.checkpoint, args.device)
    split = load_split(args.data, args.split, args.image_root, config.model.image_size)
    path = attention_figure(model, split, tokens, args.index, args.out,
                            pick_device(args.device))
    print(f"wrote {path}")


def add_parsers(sub):
    t = sub.add_parser("train", help="train DivE on SCAN-format data")
    t.add_argument("--preset", choices=sorted(PRESETS), default="butd_bigru")
    t.add_argument("--config", help="a config.json (overrides --preset)")
    t.add_argument("--data", required=True, help="a SCAN folder ({train,dev,test}_ims.npy and "
                   "_caps.txt) or a Karpathy split file (with --image-root)")
    t.add_argument("--out", default="runs/dive", help="run folder (checkpoints, log)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    for name, kind in (("epochs", int), ("batch-size", int), ("lr", float), ("seed", int),
                       ("save-every", int), ("workers", int)):
        t.add_argument(f"--{name}", type=kind)
    t.add_argument("--distributed", action="store_true",
                   help="require torchrun's process group (launched by torchrun, the run is "
                   "distributed without this flag too); --batch-size is the global batch")
    t.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds a rank waits for the others at a collective before failing")
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
    d = sub.add_parser("demo", help="synthetic data -> train a small DivE -> evaluate (CPU: a "
                       "couple of minutes)")
    d.add_argument("--out", default="dive-demo", help="where the data and the run go")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epochs", type=int, help="override the demo's epoch count")
    d.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    v = sub.add_parser("visualize", help="per-slot attention over regions and words, as a PNG")
    v.add_argument("--checkpoint", required=True)
    v.add_argument("--data", required=True)
    v.add_argument("--split", default="test")
    v.add_argument("--index", type=int, default=0, help="image index (its first caption too)")
    v.add_argument("--out", default="attention.png")
    for p in (t, e, v):
        p.add_argument("--image-root", help="image folder, when --data is a Karpathy .json")
    for p in (t, e, d, v):
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    return {"train": run_train, "evaluate": run_evaluate, "demo": run_demo,
            "visualize": run_visualize, "convert-official": convert.add_parser(sub)}

