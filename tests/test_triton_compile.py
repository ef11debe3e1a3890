"""Ahead-of-time compile of every shipped Triton kernel config, no GPU needed (docs/design.md §6.3).

Each (op, kernel, dot variant, shape class) of kernels/smooth_chamfer.py and
kernels/slot_attention.py is compiled for sm_80, sm_86 and sm_90 and its cubin read with the
cuobjdump shipped in the triton wheel. Fails on register spills (stack, local
memory or STL in the SASS) and on 16-bit or TF32 kernels without tensor-core instructions.

The compiles run in worker processes (this file run as a script) without TRITON_INTERPRET:
when it is set at import, triton's own `@jit` helpers (tl.cdiv, tl.max, ...) are interpreter
objects that cannot be compiled, whatever the kernel module does. Workers also use every core.
"""
import importlib.util
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

if os.environ.get("DIVE_REQUIRE_AOT") == "1":  # CI: a missing triton is a failure, not a skip
    import triton
    import triton.language as tl
else:
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

ARCHS = (80, 86, 90)
KERNELS = ("forward", "backward")
# id -> (torch dtype name, tl.dot input precision, TILES kind): every dot variant a launch picks.
VARIANTS = {
    "bf16": ("bfloat16", "ieee", "16bit"),
    "fp16": ("float16", "ieee", "16bit"),
    "fp32-ieee": ("float32", "ieee", "ieee"),
    "fp32-tf32": ("float32", "tf32", "tf32"),
}
# Shape classes per op: the arguments of its `aot_spec` after (kernel, dtype), paper's first.
SHAPES = {
    # Set sizes (m, n) only change the epilogue's (BM, MP, BN, NP) shape at fixed tile rows: the
    # paper's K=4, the two lopsided extremes and the largest sets (the most registers with 3.6).
    "smooth_chamfer": ((4, 4), (32, 1), (1, 32), (32, 32)),
    # (K, d, dv): the paper's, the most slots (KP = 32, the most registers) and sizes below one
    # chunk (every tile clamped to tl.dot's 16).
    "slot_attention": ((4, 512, 512), (32, 512, 512), (1, 1, 1)),
}

_REPO_KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"
_LAUNCH = "dive.kernels.launch"  # what the kernel files import their shared helpers from
_CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_SKIP = 3  # worker exit status: this triton cannot compile ahead of time; stderr says why


def _probe(X, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    tl.store(X + r, tl.load(X + r) + 1)


def _cuobjdump(cubin_path, flag):
    return subprocess.run([str(_CUOBJDUMP), flag, str(cubin_path)], check=True,
                          capture_output=True, text=True).stdout


def _worker(sources, cases, scratch):
    """Compile `cases` [(op, kernel, variant, shape, arch)] of the files `sources` {op: path}."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        print(f"triton {triton.__version__}: no ahead-of-time compile API ({e})", file=sys.stderr)
        sys.exit(_SKIP)

    def compile_(fn, signature, constexprs, attrs, options, arch):
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)

    if not _CUOBJDUMP.exists():
        print(f"no cuobjdump in the triton wheel ({_CUOBJDUMP})", file=sys.stderr)
        sys.exit(_SKIP)
    try:
        compile_(triton.jit(_probe), {"X": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16}, {},
                 {"num_warps": 1}, 80)
    except Exception as e:  # noqa: BLE001 - a trivial kernel failing means the API moved
        print(f"triton {triton.__version__}: ASTSource/compile API differs ({e!r})",
              file=sys.stderr)
        sys.exit(_SKIP)

    import torch

    modules = {op: _load(op, path) for op, path in sources.items()}
    results = []
    for op, kernel, variant, shape, arch in cases:
        dtype, precision, _ = VARIANTS[variant]
        try:
            signature, constexprs, attrs, options = modules[op].aot_spec(
                kernel, getattr(torch, dtype), *shape, precision)
            compiled = compile_(modules[op].KERNELS[kernel], signature, constexprs, attrs,
                                options, arch)
        except Exception as e:  # noqa: BLE001 - reported by that case's test
            results.append({"error": f"{type(e).__name__}: {e}"})
            continue
        cubin = pathlib.Path(scratch) / f"{os.getpid()}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)",
                          _cuobjdump(cubin, "--dump-resource-usage"))
        sass = _cuobjdump(cubin, "--dump-sass")
        results.append({
            "regs": int(usage[1]), "stack": int(usage[2]), "local": int(usage[3]),
            "stl": len(re.findall(r"\bSTL\b", sass)), "smem": compiled.metadata.shared,
            "mma": sorted(set(re.findall(r"\b(HGMMA|HMMA)\.", sass))), "options": options,
        })
    return results


def _exec_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(op, path):
    """The kernel file `path`, its `dive.kernels.launch` import bound to the launch.py beside it
    (the repository's for the repository's kernels), not to whichever copy is installed."""
    import dive.kernels  # noqa: F401 - the package the launch module is bound under

    path = pathlib.Path(path)
    installed = sys.modules.get(_LAUNCH)
    sys.modules[_LAUNCH] = _exec_file(_LAUNCH, path.parent / "launch.py")
    try:
        return _exec_file(f"_{op}_aot", path)
    finally:
        if installed is None:
            del sys.modules[_LAUNCH]
        else:  # the rest of the test session keeps the installed package's own launch module
            sys.modules[_LAUNCH] = installed


def _source_file(op):
    repo_file = _REPO_KERNELS / f"{op}.py"
    if repo_file.exists():
        return repo_file
    spec = importlib.util.find_spec(f"dive.kernels.{op}")
    if spec is None or spec.origin is None:
        pytest.skip(f"kernels/{op}.py not found")
    return pathlib.Path(spec.origin)


def _compiled(op, variant, shape):
    """Whether a case is worth its compile: the test is kept near a minute."""
    if variant == "fp16":
        # The same code as bf16 (same tiles; identical register counts over all 36
        # smooth-Chamfer set-size classes in a full sweep): the paper's shape only.
        return shape == SHAPES[op][0]
    if op == "slot_attention" and variant.startswith("fp32"):
        # The most slots take the most registers of the same code (K=4 and 1x1x1: 20-80 fewer).
        return shape == SHAPES[op][1]
    return True


CASES = [(op, k, v, shape, a) for op, shapes in SHAPES.items() for k in KERNELS
         for v in VARIANTS for shape in shapes for a in ARCHS if _compiled(op, v, shape)]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Case -> compile report, from one worker process per core."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    scratch = tmp_path_factory.mktemp("cubin")
    workers = min(len(CASES), os.cpu_count() or 1)
    chunks = [CASES[i::workers] for i in range(workers)]
    sources = json.dumps({op: str(_source_file(op)) for op in SHAPES})
    procs = [subprocess.Popen([sys.executable, __file__, sources, json.dumps(chunk), str(scratch)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for chunk in chunks]
    reports = {}
    for proc, chunk in zip(procs, chunks):
        out, err = proc.communicate()
        if proc.returncode == _SKIP:
            # CI sets DIVE_REQUIRE_AOT=1: there a skip would hide a kernel that no longer builds.
            (pytest.fail if os.environ.get("DIVE_REQUIRE_AOT") == "1" else pytest.skip)(err.strip())
        assert proc.returncode == 0, f"compile worker failed:\n{err[-4000:]}"
        reports.update(zip(chunk, json.loads(out.splitlines()[-1])))
    return reports


@pytest.mark.parametrize("op,kernel,variant,shape,arch", CASES,
                         ids=[f"{op}-{k}-{v}-{'x'.join(map(str, s))}-sm{a}"
                              for op, k, v, s, a in CASES])
def test_compiles_without_spills(reports, op, kernel, variant, shape, arch):
    report = reports[(op, kernel, variant, shape, arch)]
    assert "error" not in report, report.get("error")
    print(f"{op} {kernel} {variant} {shape} sm_{arch}: {report['regs']} regs, stack "
          f"{report['stack']}, local {report['local']}, smem {report['smem']} B, "
          f"{report['options']}")
    assert report["stack"] == 0 and report["local"] == 0 and report["stl"] == 0, (
        f"register spill: {report}")
    if variant != "fp32-ieee":
        allowed = {"HMMA", "HGMMA"} if arch >= 90 else {"HMMA"}
        assert allowed & set(report["mma"]), (
            f"no {'/'.join(sorted(allowed))} instruction: the dot does not use tensor cores")


@pytest.mark.parametrize("op", SHAPES)
def test_kernels_use_the_launch_module_beside_them(op):
    path = _source_file(op)
    module = _load(op, path)
    beside = (path.parent / "launch.py").resolve()
    for helper in (module.aot_signature, module.next_pow2):
        assert pathlib.Path(inspect.getsourcefile(helper)).resolve() == beside


@pytest.mark.parametrize("op", SHAPES)
def test_variants_cover_every_tile(op):
    module = _load(op, _source_file(op))
    assert {(k, kind) for k in KERNELS for *_, kind in VARIANTS.values()} == set(module.TILES)


if __name__ == "__main__":
    cases = [(op, k, v, tuple(s), a) for op, k, v, s, a in json.loads(sys.argv[2])]
    print(json.dumps(_worker(json.loads(sys.argv[1]), cases, sys.argv[3])))
