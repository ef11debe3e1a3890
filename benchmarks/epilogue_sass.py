"""Static SASS count of the Triton smooth-Chamfer forward epilogue, no GPU needed.

    python -P benchmarks/epilogue_sass.py [--arch 90 86] [--variant bf16 fp16 fp32-tf32 fp32-ieee]
        [--shape 4x4 ...]

compiles kernels/smooth_chamfer.py's forward ahead of time for each (arch, variant, set sizes)
the way tests/test_triton_compile.py does, disassembles the cubin with the cuobjdump in the
triton wheel and prints, per compile: registers, stack, shared memory, the tensor-core
instruction, MUFU counts and the epilogue's thread-instructions per cosine = the SASS
instructions after the last tensor-core instruction of the kernel (the end of the matrix loop)
divided by the cosines one thread holds (tile rows * cols / threads). Static: every instruction
counts once, loops and untaken branches included, so it is an upper bound of what one tile runs
after its main loop when the epilogue has no loop.

`epilogue_count(sass, cosines_per_thread)` and `compile_forward(...)` are importable for other
reports. Run without TRITON_INTERPRET (the compile needs triton's real `@jit` helpers).
"""
import argparse
import importlib.util
import json
import pathlib
import re
import subprocess
import tempfile

import torch
import triton

KERNEL_FILE = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "smooth_chamfer.py"
CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
VARIANTS = {"bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"),
            "fp32-tf32": (torch.float32, "tf32"), "fp32-ieee": (torch.float32, "ieee")}
_INSTR = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.M)
_TENSOR = ("HGMMA", "HMMA", "WARPGROUP")


def instructions(sass):
    """Opcodes (with modifiers) of the SASS listing, in order."""
    return [m[2] for m in _INSTR.finditer(sass)]


def epilogue_count(sass, cosines_per_thread):
    """(instructions after the last tensor-core instruction, the same per cosine, its MUFU ops).

    Trailing padding (NOP, the final self-branch) is not counted; fp32 "ieee" dots have no
    tensor-core instruction: then the last FFMA of the main loop is used."""
    ops = instructions(sass)
    last = max((i for i, op in enumerate(ops) if op.startswith(_TENSOR)), default=None)
    if last is None:
        last = max(i for i, op in enumerate(ops) if op.startswith("FFMA"))
    tail = [op for op in ops[last + 1:] if op != "NOP"]
    while tail and tail[-1].startswith("BRA"):
        tail.pop()
    mufu = {}
    for op in tail:
        if op.startswith("MUFU"):
            mufu[op] = mufu.get(op, 0) + 1
    return len(tail), len(tail) / cosines_per_thread, mufu


def _load_kernels(path=KERNEL_FILE):
    spec = importlib.util.spec_from_file_location("_smooth_chamfer_sass", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_forward(arch, variant, m, n, module=None, **spec_kwargs):
    """dict(regs, stack, smem, mma, epilogue, per_cosine, mufu, consts, options) of one compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = module or _load_kernels()
    dtype, precision = VARIANTS[variant]
    signature, consts, attrs, options = module.aot_spec("forward", dtype, m, n, precision,
                                                        **spec_kwargs)
    src = ASTSource(fn=module.KERNELS["forward"], signature=signature, constexprs=consts,
                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "--dump-sass", f.name], check=True,
                              capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    threads = options["num_warps"] * 32
    cosines = consts["BM"] * consts["MP"] * consts["BN"] * consts["NP"]
    count, per_cosine, mufu = epilogue_count(sass, cosines / threads)
    return dict(regs=int(regs), stack=int(stack), smem=compiled.metadata.shared,
                mma=sorted(set(re.findall(r"\b(HGMMA\.\w+|HMMA\.\w+)", sass))),
                stl=len(re.findall(r"\bSTL\b", sass)), epilogue=count, per_cosine=per_cosine,
                mufu=mufu, consts=consts, options=options, sass=sass)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 86])
    parser.add_argument("--variant", nargs="+", default=["bf16", "fp32-tf32"], choices=VARIANTS)
    parser.add_argument("--shape", nargs="+", default=["4x4"], help="set sizes m x n")
    parser.add_argument("--path", nargs="+", default=["safe-dense", "safe-masked"],
                        choices=["safe-dense", "safe-masked", "fallback-dense", "fallback-masked"],
                        help="forward variant: host-proved shared max (safe) or with the exact "
                             "fallback; without (dense) or with masks")
    parser.add_argument("--sass", help="write the last compile's SASS to this file")
    parser.add_argument("--json", action="store_true", help="one JSON list of the results")
    args = parser.parse_args()
    results = []
    module = _load_kernels()
    if not args.json:
        print(f"triton {triton.__version__}, {KERNEL_FILE}")
    for arch in args.arch:
        for variant in args.variant:
            for shape, path in ((s, p) for s in args.shape for p in args.path):
                m, n = map(int, shape.split("x"))
                r = compile_forward(arch, variant, m, n, module, safe=path.startswith("safe"),
                                    masked=path.endswith("masked"))
                c = r["consts"]
                if args.json:
                    results.append(dict(arch=arch, variant=variant, shape=shape, path=path,
                                        **{k: v for k, v in r.items()
                                           if k not in ("sass", "consts")}))
                    continue
                print(f"sm_{arch} {variant:9} {m}x{n} {path:15}: tile {c['BM'] * c['MP']}x{c['BN'] * c['NP']}"
                      f" BK={c['BK']} warps={r['options']['num_warps']} "
                      f"stages={r['options']['num_stages']} | {r['regs']} regs, stack "
                      f"{r['stack']}, STL {r['stl']}, smem {r['smem']} B, {','.join(r['mma'])}"
                      f" | epilogue {r['epilogue']} instr = {r['per_cosine']:.1f} per cosine, "
                      f"{r['mufu']}")
                if args.sass:
                    pathlib.Path(args.sass).write_text(r["sass"])
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
