"""Command line: `dive gallery` runs smooth-Chamfer over a whole synthetic COCO-5K-shaped gallery."""
import argparse
import json
import resource
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import build_info
from .ops import smooth_chamfer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def synthetic_gallery(images, captions_per_image, set_size, dim, noise, seed):
    """Image sets and captions planted near their image (caption j belongs to image j // cpi)."""
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(images, set_size, dim, generator=gen), dim=-1)
    owner = torch.arange(images * captions_per_image) // captions_per_image
    cap = img[owner] + noise * torch.randn(len(owner), set_size, dim, generator=gen) / dim**0.5
    return img, F.normalize(cap, dim=-1), owner


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_gallery(args):
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    img, cap, owner = synthetic_gallery(args.images, args.captions_per_image, args.set_size,
                                        args.dim, args.noise, args.seed)
    img, cap = img.to(device, dtype), cap.to(device, dtype)
    sim = torch.empty(len(img), len(cap), dtype=torch.float32, device=device)
    smooth_chamfer(img[:2], cap[:2], backend=args.backend)  # warm-up: kernels, thread pools
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _peak_rss_bytes()
    start = time.perf_counter()
    chunk = max(1, args.images // 20)
    for a0 in tqdm(range(0, len(img), chunk), desc="similarity", unit="block",
                   disable=args.quiet, file=sys.stderr):
        sim[a0:a0 + chunk] = smooth_chamfer(img[a0:a0 + chunk], cap,
                                            temperature=args.temperature, backend=args.backend)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        extra = torch.cuda.max_memory_allocated(device) - base
    else:
        extra = max(0, _peak_rss_bytes() - base)
    owner = owner.to(device)
    t2i_r1 = (sim.argmax(0) == owner).float().mean().item()
    i2t_r1 = (owner[sim.argmax(1)] == torch.arange(len(img), device=device)).float().mean().item()
    flops = 2.0 * img.shape[0] * img.shape[1] * cap.shape[0] * cap.shape[1] * args.dim
    report = {
        "device": str(device), "dtype": args.dtype, "backend": args.backend,
        "images": len(img), "captions": len(cap), "set_size": args.set_size, "dim": args.dim,
        "seconds": round(seconds, 4), "tflops": round(flops / seconds / 1e12, 3),
        "extra_memory_mb": round(extra / 2**20, 1),
        "note_memory": "beyond inputs and the (images x captions) result; peak RSS on CPU",
        "i2t_r1": round(i2t_r1, 4), "t2i_r1": round(t2i_r1, 4),
        "chance_r1": {"i2t": round(args.captions_per_image / len(cap), 6),
                      "t2i": round(1 / len(img), 6)},
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"smooth-Chamfer over {len(img):,} images x {len(cap):,} captions "
              f"(K={args.set_size}, D={args.dim}, {args.dtype}) on {device}")
        print(f"  time          {seconds * 1e3:10.1f} ms   ({report['tflops']} TFLOP/s of GEMM work)")
        print(f"  extra memory  {report['extra_memory_mb']:10.1f} MB   ({report['note_memory']})")
        print(f"  planted R@1   i2t {i2t_r1:.4f}  t2i {t2i_r1:.4f}   "
              f"(chance {report['chance_r1']['i2t']:.2e} / {report['chance_r1']['t2i']:.2e})")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(prog="dive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gallery", help="smooth-Chamfer over a synthetic full gallery (default: "
                       "COCO 5K shape, 5,000 images x 25,000 captions, K=4, D=1024)")
    g.add_argument("--images", type=int, default=5000)
    g.add_argument("--captions-per-image", type=int, default=5)
    g.add_argument("--set-size", type=int, default=4)
    g.add_argument("--dim", type=int, default=1024)
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--backend", default="auto", help="auto, cpu, triton, cuda or torch")
    g.add_argument("--temperature", type=float, default=16.0)
    g.add_argument("--noise", type=float, default=1.0, help="caption noise (planted matches)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("info", help="what this install was built with")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(json.dumps(build_info(), indent=2))
        return 0
    for name in ("images", "captions_per_image", "set_size", "dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        run_gallery(args)
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
