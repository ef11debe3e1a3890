"""The `dive` command.

  dive gallery                 a synthetic COCO-5K-shaped gallery with planted matches, end to end:
                               smooth-Chamfer over the whole gallery, then the recall protocols
  dive evaluate-embeddings     saved image and caption set embeddings -> the field's metrics
  dive info                    what this install was built with
  dive train / evaluate        train DivE on SCAN-format data; metrics of a checkpoint
  dive demo                    synthetic data -> a small DivE trained on it -> R@K beside chance
  dive visualize               per-slot attention over regions and words of one pair, as a PNG

Each subcommand is a subparser whose `run` default takes the parsed arguments (this module's
`add_parsers`, and dive.commands' for the model commands). A ValueError or OSError it raises
becomes one line, `dive <command>: error: ...`, under that command's usage, with exit code 2.
"""
import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import build_info, commands
from .arguments import device, nonnegative_float, positive_float, positive_int
from .eval import coco_1k_5fold, coco_5k, eccv_metrics, f30k_1k, fold_metrics, recall_metrics
from .eval.model import check_finite
from .ops import smooth_chamfer
from .report import chance_recalls, print_eccv_table, print_recall_table
from .retrieval import similarity_matrix

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROTOCOLS = {"coco5k": ("COCO 5K", (5000, 25000)), "coco1k": ("COCO 1K, 5-fold", (5000, 25000)),
             "f30k": ("Flickr30K 1K", (1000, 5000)), "eccv": ("COCO 5K / ECCV Caption", None),
             "generic": ("recall_metrics", None)}
# Caption noise of `dive gallery`: R@1 at COCO 5K well below 100% yet far above chance.
NOISE = 14.0


def synthetic_gallery(images, captions_per_image, set_size, dim, noise, seed):
    """Image sets and captions planted near their image (caption j belongs to image j // cpi)."""
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(images, set_size, dim, generator=gen), dim=-1)
    owner = torch.arange(images * captions_per_image) // captions_per_image
    cap = img[owner] + noise * torch.randn(len(owner), set_size, dim, generator=gen) / dim**0.5
    return img, F.normalize(cap, dim=-1), owner


class Stages:
    """Wall time of each named stage (CUDA synchronised), for the closing table."""

    def __init__(self, device):
        self.device, self.seconds, self.notes = device, {}, {}

    @contextmanager
    def __call__(self, name):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = time.perf_counter() - start

    def print(self):
        print("stage                seconds")
        for name, sec in self.seconds.items():
            note = self.notes.get(name)
            print(f"  {name:<16} {sec:9.3f}" + (f"   {note}" if note else ""))


def _proc_status_bytes(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


@contextmanager
def _peak_memory(device, out):
    """Peak memory of the block beyond what was held before it: device memory on CUDA; on CPU
    the resident set, whose high-water mark Linux resets on request. out["bytes"] stays None
    where neither is available."""
    out["bytes"] = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        out["bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _proc_status_bytes("VmRSS")
    except OSError:
        yield
        return
    yield
    out["bytes"] = _proc_status_bytes("VmHWM") - base


def run_gallery(args):
    device = args.device
    stages = Stages(device)
    with stages("synthesize"):
        img, cap, _ = synthetic_gallery(args.images, args.captions_per_image, args.set_size,
                                        args.dim, args.noise, args.seed)
        img, cap = img.to(device, DTYPES[args.dtype]), cap.to(device, DTYPES[args.dtype])
    smooth_chamfer(img[:2], cap[:2], backend=args.backend)  # warm-up: kernels, thread pools
    peak = {}
    with _peak_memory(device, peak), stages("similarity"):
        sim = similarity_matrix(img, cap, temperature=args.temperature, backend=args.backend,
                                progress=not args.quiet)
    extra_mb = None if peak["bytes"] is None else \
        round(max(0, peak["bytes"] - sim.numel() * 4) / 2**20, 1)
    flops = 2.0 * img.shape[0] * img.shape[1] * cap.shape[0] * cap.shape[1] * args.dim
    tflops = flops / stages.seconds["similarity"] / 1e12
    stages.notes["similarity"] = (f"{tflops:.3f} TFLOP/s of GEMM work, extra memory "
                                  f"{'n/a' if extra_mb is None else f'{extra_mb} MB'}")
    with stages("metrics"):
        full = recall_metrics(sim, args.captions_per_image)
        fold = fold_metrics(sim, args.captions_per_image) if args.images % 5 == 0 else None
    report = {
        "device": str(device), "dtype": args.dtype, "backend": args.backend,
        "images": len(img), "captions": len(cap), "set_size": args.set_size, "dim": args.dim,
        "noise": args.noise, "seconds": {k: round(v, 4) for k, v in stages.seconds.items()},
        "tflops": round(tflops, 3), "extra_memory_mb": extra_mb,
        "note_memory": "peak beyond inputs and the (images x captions) result; resident "
                       "set on CPU",
        "recall": full, "chance": chance_recalls(args.images, args.captions_per_image),
    }
    if fold:
        report["recall_5fold"] = fold
        report["chance_5fold"] = chance_recalls(args.images // 5, args.captions_per_image)
    if args.json:
        print(json.dumps(report))
        return report
    print(f"dive gallery: {len(img):,} images x {len(cap):,} captions (K={args.set_size}, "
          f"D={args.dim}, {args.dtype}) on {device}, planted matches (caption noise "
          f"{args.noise})")
    stages.print()
    print_recall_table(f"{len(img):,} images", full, report["chance"])
    if fold:
        print_recall_table(f"5 folds of {len(img) // 5:,} images", fold, report["chance_5fold"])
    return report


def load_sets(path, flag="--images"):
    """(N, K, D) set embeddings from .npy or safetensors (one tensor, or the one named "sets",
    as a dive SetIndex file has); (N, D) means sets of one. ValueError or OSError naming `flag`
    and the file for anything else: not such a file, not float, NaN or inf in a set."""
    path = Path(path)
    what = f"{flag} {path}"
    if path.is_dir():
        raise IsADirectoryError(f"{what} is a folder, not an embeddings file")
    array = _read_npy(path, what) if path.suffix == ".npy" else _read_safetensors(path, what)
    try:
        sets = torch.as_tensor(array)
    except (TypeError, RuntimeError):
        raise ValueError(f"{what}: expected float (N, K, D) or (N, D) embeddings, got "
                         f"{array.dtype} {array.shape}") from None
    if sets.dim() == 2:
        sets = sets[:, None]
    if sets.dim() != 3 or not sets.dtype.is_floating_point:
        raise ValueError(f"{what}: expected float (N, K, D) or (N, D) embeddings, got "
                         f"{sets.dtype} {tuple(sets.shape)}")
    check_finite(what, sets)
    return sets


def _read_npy(path: Path, what: str) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{what} does not exist")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise ValueError(f"{what} is not a whole .npy array (empty, truncated or of objects: "
                         f"{exc})") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{what} is an .npz archive, not one .npy array")
    return array


def _read_safetensors(path: Path, what: str):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not path.exists():
        raise FileNotFoundError(f"{what} does not exist")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{what}: not a .npy or safetensors file ({exc})") from None
    if len(tensors) != 1 and "sets" not in tensors:
        raise ValueError(f"{what}: expected one tensor or one named 'sets', found "
                         f"{sorted(tensors)}")
    return tensors["sets"] if "sets" in tensors else next(iter(tensors.values()))


def load_ids(path, flag):
    """Int ids from .npy or a text file (whitespace separated)."""
    path = Path(path)
    what = f"{flag} {path}"
    if path.is_dir():
        raise IsADirectoryError(f"{what} is a folder, not a file of ids")
    if path.suffix == ".npy":
        ids = _read_npy(path, what).reshape(-1)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"{what}: expected integer ids, got {ids.dtype}")
        return ids
    if not path.exists():
        raise FileNotFoundError(f"{what} does not exist")
    try:
        return np.array(path.read_text().split(), dtype=np.int64)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: expected whitespace-separated integer ids ({exc})") from None


def generic_captions_per_image(images: int, captions: int, given=None) -> int:
    """c of the generic protocol: N images and N * c captions, caption j of image j // c."""
    if images and captions % images == 0 and captions // images >= 1 \
            and given in (None, captions // images):
        return captions // images
    wanted = f"{given} per image" if given else "c per image"
    raise ValueError(f"--protocol generic needs N images and N * c captions ({wanted}, caption "
                     f"j of image j // c), got {images:,} images and {captions:,} captions")


def run_evaluate_embeddings(args):
    device = args.device
    stages = Stages(device)
    title, shape = PROTOCOLS[args.protocol]
    with stages("load"):
        img, cap = load_sets(args.images, "--images"), load_sets(args.captions, "--captions")
        if img.shape[2] != cap.shape[2]:
            raise ValueError(f"image sets have D={img.shape[2]} but caption sets D="
                             f"{cap.shape[2]}")
        if shape and (len(img), len(cap)) != shape:
            raise ValueError(f"{title} needs {shape[0]:,} images and {shape[1]:,} captions, got "
                             f"{len(img):,} and {len(cap):,}")
        if args.protocol == "generic":
            cpi = generic_captions_per_image(len(img), len(cap), args.captions_per_image)
            title = f"{len(img):,} images, {cpi} captions each"
        if args.protocol == "eccv":
            if not (args.image_ids and args.caption_ids):
                raise ValueError("--protocol eccv needs --image-ids and --caption-ids (COCO ids "
                                 "in the order of the embeddings)")
            image_ids = load_ids(args.image_ids, "--image-ids")
            caption_ids = load_ids(args.caption_ids, "--caption-ids")
            if (len(image_ids), len(caption_ids)) != (len(img), len(cap)):
                raise ValueError(f"{len(image_ids):,} image ids and {len(caption_ids):,} caption "
                                 f"ids for {len(img):,} image and {len(cap):,} caption sets")
        img = img.to(device, DTYPES[args.dtype])
        cap = cap.to(device, DTYPES[args.dtype])
    with stages("similarity"):
        sim = similarity_matrix(img, cap, temperature=args.temperature, backend=args.backend,
                                progress=not args.quiet)
    with stages("metrics"):
        if args.protocol == "eccv":
            metrics = eccv_metrics(sim, image_ids, caption_ids)
        else:
            protocol = {"coco5k": coco_5k, "coco1k": coco_1k_5fold, "f30k": f30k_1k,
                        "generic": lambda sim: recall_metrics(sim, cpi)}
            metrics = protocol[args.protocol](sim)
    if args.json:
        print(json.dumps({"protocol": args.protocol, "metrics": metrics,
                          "seconds": {k: round(v, 4) for k, v in stages.seconds.items()}}))
        return metrics
    print(f"dive evaluate-embeddings: {title}, {len(img):,} image sets x {len(cap):,} caption "
          f"sets (K={img.shape[1]}/{cap.shape[1]}, D={img.shape[2]}, {args.dtype}) on {device}")
    stages.print()
    if args.protocol == "eccv":
        print_eccv_table(metrics)
    else:
        print_recall_table(title, metrics)
    return metrics


def _common(p):
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype the sets are compared in")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", default="auto", help="auto, cpu, triton, cuda or torch")
    p.add_argument("--temperature", type=positive_float, default=16.0)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_info(args):
    print(json.dumps(build_info(), indent=2))


def add_parsers(sub):
    """gallery, evaluate-embeddings and info."""
    g = sub.add_parser("gallery", help="smooth-Chamfer and recall over a synthetic full gallery "
                       "(default: COCO 5K shape, 5,000 images x 25,000 captions, K=4, D=1024)")
    g.add_argument("--images", type=positive_int, default=5000)
    g.add_argument("--captions-per-image", type=positive_int, default=5)
    g.add_argument("--set-size", type=positive_int, default=4)
    g.add_argument("--dim", type=positive_int, default=1024)
    g.add_argument("--noise", type=nonnegative_float, default=NOISE,
                   help="caption noise: higher makes the planted matches harder to find")
    g.add_argument("--seed", type=int, default=0)
    _common(g)
    g.set_defaults(run=run_gallery)
    e = sub.add_parser("evaluate-embeddings", help="metrics of saved image and caption set "
                       "embeddings ((N, K, D) .npy or safetensors)")
    e.add_argument("--images", required=True, help="image sets, (N, K, D) .npy or safetensors")
    e.add_argument("--captions", required=True, help="caption sets, caption j of image j // 5 "
                   "(except for --protocol eccv, where the ids say)")
    e.add_argument("--protocol", choices=list(PROTOCOLS), default="coco5k",
                   help="generic: any N images x N*c captions, the recall_metrics rule (e.g. "
                   "the sets `dive evaluate --save-sets` writes)")
    e.add_argument("--captions-per-image", type=positive_int, default=None,
                   help="c of --protocol generic (default: captions / images)")
    e.add_argument("--image-ids", help="COCO image ids of the image sets (.npy or text)")
    e.add_argument("--caption-ids", help="COCO caption ids of the caption sets (.npy or text)")
    _common(e)
    e.set_defaults(run=run_evaluate_embeddings)
    sub.add_parser("info", help="what this install was built with").set_defaults(run=run_info)


def main(argv=None) -> int:
    top = argparse.ArgumentParser(prog="dive", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    commands.add_parsers(sub)
    args = top.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as exc:
        # One line under the command's own usage; exits with code 2.
        sub.choices[args.command].error(" ".join(str(exc).split()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
