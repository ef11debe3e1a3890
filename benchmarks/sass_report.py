"""Static report of every shipped kernel, read from its SASS: no GPU needed.

Compiles each shipped Triton config (kernels/*.py: `KERNELS`, `aot_spec`, the cases of
tests/test_triton_compile.py) ahead of time and the CUDA sources (`nvcc -cubin` of csrc/*.cu),
for sm_86 and sm_90 by default, reads the cubins with the cuobjdump inside the triton wheel and
prints one row per kernel:

    regs      registers per thread (cuobjdump --dump-resource-usage)
    spill     stack bytes + local bytes + STL instructions (0 means no spills)
    smem      shared memory per block, bytes (Triton: the launch's dynamic size; CUDA: static)
    blk/SM    resident blocks per SM, the least of the register, shared-memory, thread and block
              limits of the arch (registers allocated per warp in units of 256, shared memory
              with 1 KB reserved per block)
    mma       tensor-core instruction kinds (HGMMA, HMMA); "-" for none
    ldgsts    cp.async copies (LDGSTS); tma: TMA/bulk copies (UTMALDG, UBLKCP)
    ldsm      ldmatrix loads (LDSM)
    gatom     global atomics (RED, REDG, ATOM, ATOMG); satom: shared-memory atomics (ATOMS)
    epi       epilogue instructions, static (defined below)
    epi/cos   epi per accumulator element per thread (smooth-Chamfer kernels only)

Counts are static: each instruction in the SASS counts once, whatever the trip count.

Epilogue. The matrix loop is the first loop of the kernel (a backward branch and the
instructions between its target and itself; of several, the one that ends first) that contains
a matrix instruction: HMMA/HGMMA, or FFMA in a kernel without tensor-core instructions. `epi`
counts the instructions of the straight-line walk from that loop's closing branch: addresses in
order; an unpredicated forward BRA, and a predicated one that jumps over a later matrix loop,
jump to their target; every other branch (predicated, BRA.DIV, backward) falls through (its
code is counted: an upper bound); the walk ends at the first unpredicated EXIT. NOPs and matrix
instructions are not counted. That is the hot path of the Triton kernels' `if exact: ... else:
<recompute the cosines>` (the branch to the exact block jumps over the else block and its
matrix loop), without the cold stubs after the EXIT (divergent-shuffle paths, the slow path of
the accurate log2). `epi/cos` divides it by the accumulator elements per thread: tile rows x tile
columns / threads (Triton: (BM*MP) x (BN*NP) / (32*num_warps); CUDA C++: 64 x 64 / 256 = 16).
Where the epilogue loops over set elements (the CUDA C++ kernels) the executed count is higher;
in kernels without tensor-core instructions the FFMA rule can pick an epilogue loop (the CUDA C++
fp32 kernels), so their `epi` is indicative only.

Usage: python benchmarks/sass_report.py [--arch 86 90] [--json FILE]
Importable: `triton_reports`, `cuda_reports`, `format_table`. The Triton compiles run in worker
processes (this file run with --worker) without TRITON_INTERPRET, which must not be set when
triton's own jit helpers are imported; the kernel files and kernels/launch.py are loaded from
this repository, not from an installed dive.
"""
import argparse
import concurrent.futures
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import types

REPO = pathlib.Path(__file__).resolve().parents[1]
ARCHS = (86, 90)
# Per-SM limits: (shared memory bytes usable by blocks, threads, blocks); 64K registers each.
HARDWARE = {80: (167936, 2048, 32), 86: (102400, 1536, 16), 89: (102400, 1536, 24),
            90: (233472, 2048, 32)}
REGISTERS = 65536
# (op, variant) -> (torch dtype, tl.dot input precision), as tests/test_triton_compile.py.
VARIANTS = {"bf16": ("bfloat16", "ieee"), "fp16": ("float16", "ieee"),
            "fp32-ieee": ("float32", "ieee"), "fp32-tf32": ("float32", "tf32")}
# The paper's shape class of each op (the arguments of its aot_spec after kernel and dtype).
SHAPES = {"smooth_chamfer": (4, 4), "slot_attention": (4, 512, 512)}
MMA = ("HMMA", "HGMMA")
GLOBAL_ATOMICS = ("RED", "REDG", "ATOM", "ATOMG")
_SKIP = 3  # worker exit status: this triton cannot compile ahead of time


def cuobjdump():
    import triton  # noqa: PLC0415 - only the path of its bundled tool
    path = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return path if path.exists() else None


def _run(*args):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True,
                          text=True).stdout


# ----------------------------------------------------------------------------- SASS parsing

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_sass(text):
    """{function name: [(address, opcode, operands, predicated)]} from `cuobjdump --dump-sass`."""
    functions, current = {}, None
    for line in text.splitlines():
        head = re.match(r"\s*Function : (\S+)", line)
        if head:
            current = functions.setdefault(head[1], [])
            continue
        m = _INSTR.search(line)
        if m and current is not None:
            current.append((int(m[1], 16), m[3], m[4].strip(), bool(m[2])))
    return functions


def _base(opcode):
    return opcode.split(".")[0]


def _target(args):
    found = re.search(r"0x([0-9a-f]+)", args)
    return int(found[1], 16) if found else None


def _loops(instrs):
    """[(start, end)] address ranges of backward branches."""
    loops = []
    for addr, op, args, _ in instrs:
        target = _target(args) if _base(op) in ("BRA", "JMP") else None
        if target is not None and target <= addr:
            loops.append((target, addr))
    return loops


def epilogue_count(instrs):
    """Static epilogue instructions (module docstring), or None without a matrix loop."""
    matrix = set(MMA) if any(_base(op) in MMA for _, op, _, _ in instrs) else {"FFMA"}
    addrs = [i[0] for i in instrs if _base(i[1]) in matrix]
    loops = [(s, e) for s, e in _loops(instrs) if any(s <= a <= e for a in addrs)]
    if not loops:
        return None
    end = min(loops, key=lambda r: r[1])[1]
    index = {addr: i for i, (addr, *_) in enumerate(instrs)}
    i, count = index[end] + 1, 0
    while i < len(instrs):
        addr, op, args, predicated = instrs[i]
        if _base(op) == "EXIT" and not predicated:
            return count + 1
        if _base(op) not in matrix and _base(op) != "NOP":
            count += 1
        # BRA.DIV (the divergent-warp escape of a shuffle) and other branches fall through.
        target = _target(args) if op in ("BRA", "BRA.U") else None
        if target is not None and target > addr and target in index and (
                not predicated or any(addr < s and e < target for s, e in loops)):
            i = index[target]
        else:
            i += 1
    return count


def sass_counts(instrs):
    ops = [_base(i[1]) for i in instrs]
    return {
        "mma": sorted({op for op in ops if op in MMA}),
        "ldgsts": ops.count("LDGSTS"),
        "tma": sum(ops.count(k) for k in ("UTMALDG", "UBLKCP")),
        "ldsm": ops.count("LDSM"),
        "gatom": sum(ops.count(k) for k in GLOBAL_ATOMICS),
        "satom": ops.count("ATOMS"),
        "stl": ops.count("STL"),
        "epi": epilogue_count(instrs),
        "instructions": len(ops),
    }


def parse_usage(text):
    """{function: (regs, stack, shared, local)} from `cuobjdump --dump-resource-usage`."""
    usage, name = {}, None
    for line in text.splitlines():
        head = re.match(r"\s*Function (\S+):", line)
        if head:
            name = head[1]
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            usage[name] = tuple(int(v) for v in m.groups())
    return usage


def blocks_per_sm(regs, smem, threads, arch):
    smem_sm, threads_sm, blocks_sm = HARDWARE[arch]
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (REGISTERS // per_warp) // warps
    by_smem = smem_sm // (smem + 1024)
    return max(0, min(by_regs, by_smem, threads_sm // threads, blocks_sm))


# ----------------------------------------------------------------------------- Triton


def _load_repo_kernels(repo):
    """The repo's kernels/*.py, with its kernels/launch.py standing in for dive.kernels.launch."""
    kernels = pathlib.Path(repo) / "kernels"
    for pkg in ("dive", "dive.kernels"):
        if pkg not in sys.modules:
            try:
                importlib.import_module(pkg)
            except ImportError:
                sys.modules[pkg] = types.ModuleType(pkg)
                sys.modules[pkg].__path__ = []
    spec = importlib.util.spec_from_file_location("dive.kernels.launch", kernels / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    sys.modules["dive.kernels.launch"] = launch
    spec.loader.exec_module(launch)
    modules = {}
    for op in SHAPES:
        spec = importlib.util.spec_from_file_location(f"_{op}_sass", kernels / f"{op}.py")
        modules[op] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[op])
    return modules


def _triton_worker(repo, cases):
    import triton  # noqa: PLC0415
    try:
        from triton.backends.compiler import GPUTarget  # noqa: PLC0415
        from triton.compiler import ASTSource  # noqa: PLC0415
    except ImportError as e:
        print(f"triton {triton.__version__}: no ahead-of-time compile API ({e})", file=sys.stderr)
        sys.exit(_SKIP)
    tool = cuobjdump()
    if tool is None:
        print("no cuobjdump in the triton wheel", file=sys.stderr)
        sys.exit(_SKIP)
    import torch  # noqa: PLC0415

    modules = _load_repo_kernels(repo)
    out = []
    with tempfile.TemporaryDirectory() as scratch:
        for op, kernel, variant, arch in cases:
            dtype, precision = VARIANTS[variant]
            signature, consts, attrs, options = modules[op].aot_spec(
                kernel, getattr(torch, dtype), *SHAPES[op], precision)
            src = ASTSource(fn=modules[op].KERNELS[kernel], signature=signature,
                            constexprs=consts, attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            cubin = pathlib.Path(scratch) / "k.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            (regs, stack, _, local), = parse_usage(_run(tool, "--dump-resource-usage", cubin)
                                                   ).values()
            (instrs,) = parse_sass(_run(tool, "--dump-sass", cubin)).values()
            threads = 32 * options["num_warps"]
            smem = compiled.metadata.shared
            row = dict(kind="triton", name=f"{op}.{kernel}[{variant}]", op=op, kernel=kernel,
                       variant=variant, arch=arch, regs=regs, stack=stack, local=local,
                       smem=smem, threads=threads,
                       blocks=blocks_per_sm(regs, smem, threads, arch), **sass_counts(instrs))
            if op == "smooth_chamfer":
                acc = consts["BM"] * consts["MP"] * consts["BN"] * consts["NP"] // threads
                row["epi_per_cos"] = None if row["epi"] is None else row["epi"] / acc
            out.append(row)
    return out


def triton_cases(ops=tuple(SHAPES), kernels=("forward", "backward"), variants=tuple(VARIANTS),
                 archs=ARCHS):
    return [(op, k, v, a) for op in ops for k in kernels for v in variants for a in archs]


def triton_reports(cases, repo=REPO, workers=None):
    """Rows of the report for Triton `cases` [(op, kernel, variant, arch)], compiled in worker
    processes. Raises RuntimeError if triton cannot compile ahead of time here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    workers = max(1, min(len(cases), workers or os.cpu_count() or 1))
    chunks = [cases[i::workers] for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(repo), json.dumps(c)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for c in chunks if c]
    rows = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"triton compile worker failed ({proc.returncode}):\n{err[-3000:]}")
        rows += json.loads(out.splitlines()[-1])
    return rows


# ----------------------------------------------------------------------------- CUDA C++


def _short_name(mangled):
    try:
        name = _run("c++filt", mangled).strip()
    except (OSError, subprocess.CalledProcessError):
        return mangled
    # "void dive::(anonymous namespace)::weights_kernel<float>(dive::...Args<float>)"
    found = re.search(r"(\w+(?:<[^()]*>)?)\(", name)
    return found[1] if found else mangled


def _max_threads(elf):
    """{function: EIATTR_MAX_THREADS x} from `cuobjdump --dump-elf` (__launch_bounds__)."""
    threads, name = {}, None
    lines = elf.splitlines()
    for i, line in enumerate(lines):
        head = re.match(r"\.nv\.info\.(\S+)$", line.strip())
        if head:
            name = head[1]
        elif "EIATTR_MAX_THREADS" in line and name:
            value = re.search(r"Value:\s+0x([0-9a-f]+)", "\n".join(lines[i:i + 3]))
            if value:
                threads[name] = int(value[1], 16)
    return threads


def _compile_cu(source, arch, scratch):
    nvcc = shutil.which("nvcc")
    cubin = pathlib.Path(scratch) / f"{source.stem}.sm{arch}.cubin"
    _run(nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", f"-I{source.parent}", source,
         "-o", cubin)
    return cubin


def cuda_reports(archs=ARCHS, repo=REPO, sources=None):
    """Rows of the report for every kernel of csrc/*.cu (or `sources`). Raises RuntimeError
    when nvcc or cuobjdump is missing."""
    tool = cuobjdump()
    if shutil.which("nvcc") is None or tool is None:
        raise RuntimeError("nvcc or the triton wheel's cuobjdump is missing")
    sources = sources or sorted((pathlib.Path(repo) / "csrc").glob("*.cu"))
    rows = []
    with tempfile.TemporaryDirectory() as scratch, \
            concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        jobs = {(src, arch): pool.submit(_compile_cu, src, arch, scratch)
                for src in sources for arch in archs}
        for (src, arch), job in jobs.items():
            cubin = job.result()
            usage = parse_usage(_run(tool, "--dump-resource-usage", cubin))
            sass = parse_sass(_run(tool, "--dump-sass", cubin))
            threads = _max_threads(_run(tool, "--dump-elf", cubin))
            for fn, instrs in sass.items():
                regs, stack, smem, local = usage[fn]
                t = threads.get(fn)
                row = dict(kind="cuda", name=f"{src.stem}:{_short_name(fn)}", op=src.stem,
                           kernel=_short_name(fn), variant="", arch=arch, regs=regs,
                           stack=stack, local=local, smem=smem, threads=t,
                           blocks=blocks_per_sm(regs, smem, t, arch) if t else None,
                           **sass_counts(instrs))
                if src.stem == "smooth_chamfer_cuda" and row["epi"] is not None:
                    row["epi_per_cos"] = row["epi"] / (64 * 64 / (t or 256))
                rows.append(row)
    return rows


def is_backward(row):
    """Whether a row is a backward kernel (one that forms gradients)."""
    return row["kernel"].startswith(("backward", "weights"))


# ----------------------------------------------------------------------------- table


def format_table(rows):
    cols = ("name", "arch", "regs", "spill", "smem", "blk/SM", "mma", "ldgsts", "tma", "ldsm",
            "gatom", "satom", "epi", "epi/cos")
    body = []
    for r in sorted(rows, key=lambda r: (r["kind"], r["name"], r["arch"])):
        epc = r.get("epi_per_cos")
        body.append((r["name"], f"sm_{r['arch']}", r["regs"], r["stack"] + r["local"] + r["stl"],
                     r["smem"], "?" if r["blocks"] is None else r["blocks"],
                     "/".join(r["mma"]) or "-", r["ldgsts"], r["tma"], r["ldsm"], r["gatom"],
                     r["satom"], "-" if r["epi"] is None else r["epi"],
                     "-" if epc is None else f"{epc:.1f}"))
    widths = [max(len(str(v)) for v in col) for col in zip(cols, *body)]
    line = lambda vals: "  ".join(str(v).ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--no-cuda", action="store_true", help="Triton kernels only")
    parser.add_argument("--no-triton", action="store_true", help="CUDA C++ kernels only")
    args = parser.parse_args(argv)
    rows = []
    if not args.no_triton:
        rows += triton_reports(triton_cases(archs=args.arch))
    if not args.no_cuda:
        rows += cuda_reports(args.arch)
    print(format_table(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        cases = [tuple(c) for c in json.loads(sys.argv[3])]
        print(json.dumps(_triton_worker(sys.argv[2], cases)))
    else:
        main()
