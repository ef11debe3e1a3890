"""Collects every benchmark's median and prints it against the GEMM floor and the reference of
its group, measured in the same run; DIVE_BENCH_JSON=path also writes the table as JSON.

The GPU benchmarks (marked gpu) run on the lent card at paper scale. In benchmarks/gpu_check.sh's
dry run (DIVE_GPU_CHECK_DRY=1, no GPU) they run on CPU at tiny sizes, one round each: the
`gpu` fixture below hides the difference."""
import contextlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

_ROWS = []


def cpu_extra_mb(nx, ny, k, d, backend):
    """Peak RSS growth of one smooth_chamfer call in a fresh process, less its (nx, ny) output.

    Linux only: the peak (VmHWM) is reset through /proc/self/clear_refs just before the call.
    """
    code = textwrap.dedent(f"""
        import json, torch
        from dive.ops import smooth_chamfer

        def kib(field):
            with open("/proc/self/status") as fh:
                return next(int(l.split()[1]) for l in fh if l.startswith(field + ":"))

        x, y = torch.randn({nx}, {k}, {d}), torch.randn({ny}, {k}, {d})
        x /= x.norm(dim=-1, keepdim=True)
        y /= y.norm(dim=-1, keepdim=True)
        smooth_chamfer(x[:2], y[:2], backend={backend!r})
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = kib("VmRSS")
        out = smooth_chamfer(x, y, backend={backend!r})
        print(json.dumps((kib("VmHWM") - before) * 1024 - out.numel() * 4))
    """)
    # -P: not the current folder on sys.path, which may be the unbuilt source tree.
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                          check=True)
    return round(max(0, json.loads(done.stdout.strip().splitlines()[-1])) / 2**20, 1)


def cuda_extra_mb(fn):
    """Peak device memory of fn() beyond what was allocated before it and its output."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    outs = () if out is None else out if isinstance(out, tuple) else (out,)
    out_bytes = sum(t.numel() * t.element_size() for t in outs)
    return round((torch.cuda.max_memory_allocated() - base - out_bytes) / 2**20, 1)


@contextlib.contextmanager
def tiles(op, name):
    """Launches of the Triton kernels of `op` inside the block use the shipped table `name`
    (config() reads TILES at call time)."""
    module = importlib.import_module(f"dive.kernels.{op}")
    saved = module.TILES
    module.TILES = module.SHIPPED_TILES[name]
    try:
        yield
    finally:
        module.TILES = saved


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_time(benchmark, fn, rounds=10, warmup_rounds=2, iterations=1):
    """benchmark.pedantic of fn with the device synchronised; one round on CPU (dry run)."""
    def run():
        out = fn()
        _sync()
        return out

    if not torch.cuda.is_available():
        rounds, warmup_rounds, iterations = 1, 0, 1
    return benchmark.pedantic(run, warmup_rounds=warmup_rounds, rounds=rounds,
                              iterations=iterations)


@pytest.fixture
def gpu():
    """What the GPU benchmarks share: the device (cuda, or cpu in the dry run), `time`, the extra
    memory of a call (None on CPU) and the Triton tile tables."""
    cuda = torch.cuda.is_available()
    return SimpleNamespace(device="cuda" if cuda else "cpu", time=gpu_time,
                           extra_mb=cuda_extra_mb if cuda else (lambda fn: None),
                           tiles=tiles)


@pytest.fixture
def memory():
    """Extra memory of an op beyond its inputs and output (see the two functions above)."""
    return SimpleNamespace(cpu_extra_mb=cpu_extra_mb, cuda_extra_mb=cuda_extra_mb)


@pytest.fixture
def record(benchmark):
    """record(group, name, role, **extra) after benchmark(...); role: floor, ref or kernel."""
    def add(group, name, role="kernel", **extra):
        benchmark.extra_info.update(extra)
        _ROWS.append(dict(group=group, name=name, role=role,
                          median_ms=benchmark.stats.stats.median * 1e3, **extra))
        _write_json()  # after every row: a run killed by its time limit keeps what it measured
    return add


def _write_json():
    path = os.environ.get("DIVE_BENCH_JSON")
    if path:
        dry = not torch.cuda.is_available() and os.environ.get("DIVE_GPU_CHECK_DRY") == "1"
        with open(path, "w") as fh:
            json.dump({"device": device_name(), "torch": torch.__version__, "dry": dry,
                       "rows": _ROWS}, fh, indent=1)


def device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    write = terminalreporter.write_line
    write("")
    write(f"dive benchmarks on {device_name()} (median; x floor = time / GEMM of the same shape)")
    write(f"{'group':<34} {'name':<26} {'ms':>10} {'x floor':>8} {'x ref':>8}  extra")
    for row in _ROWS:
        same = [r for r in _ROWS if r["group"] == row["group"]]
        floor = next((r["median_ms"] for r in same if r["role"] == "floor"), None)
        ref = next((r["median_ms"] for r in same if r["role"] == "ref"), None)
        row["x_floor"] = row["median_ms"] / floor if floor else None
        row["speedup_vs_ref"] = ref / row["median_ms"] if ref else None
        extra = {k: v for k, v in row.items() if k not in
                 ("group", "name", "role", "median_ms", "x_floor", "speedup_vs_ref")}
        xf = f"{row['x_floor']:.2f}" if row["x_floor"] else "-"
        xr = f"{row['speedup_vs_ref']:.1f}x" if row["speedup_vs_ref"] else "-"
        write(f"{row['group']:<34} {row['name']:<26} {row['median_ms']:>10.2f} {xf:>8} {xr:>8}  "
              f"{extra if extra else ''}")
    _write_json()
