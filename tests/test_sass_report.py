"""The static SASS report (benchmarks/sass_report.py) on this repository's kernels/ and csrc/:
no spills, tensor cores where the dot asks for them, no global atomics in any backward kernel.
Plus the report's own parsing on hand-written SASS.

The compiles (Triton ahead of time in worker processes, nvcc for the .cu files) run once per
session. Without nvcc or an ahead-of-time-capable triton the compile tests skip, except under
DIVE_REQUIRE_AOT=1 (CI), where they fail.
"""
import importlib.util
import os
import pathlib
import shutil

import pytest

REQUIRE = os.environ.get("DIVE_REQUIRE_AOT") == "1"
_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "sass_report.py"


def _load():
    spec = importlib.util.spec_from_file_location("_sass_report", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sass_report = _load()


def _missing(why):
    (pytest.fail if REQUIRE else pytest.skip)(why)


@pytest.fixture(scope="session")
def triton_rows():
    if importlib.util.find_spec("triton") is None or sass_report.cuobjdump() is None:
        _missing("triton or its bundled cuobjdump is missing")
    # Every op's backward, a tensor-core and an FMA variant, both archs: ~8 compiles.
    cases = sass_report.triton_cases(kernels=("backward",), variants=("bf16", "fp32-ieee"))
    try:
        rows = sass_report.triton_reports(cases)
    except RuntimeError as e:
        if "no ahead-of-time compile API" in str(e) and not REQUIRE:
            pytest.skip(str(e))
        raise
    print("\n" + sass_report.format_table(rows))
    return rows


@pytest.fixture(scope="session")
def cuda_rows():
    if shutil.which("nvcc") is None or sass_report.cuobjdump() is None:
        _missing("nvcc or triton's bundled cuobjdump is missing")
    rows = sass_report.cuda_reports()
    print("\n" + sass_report.format_table(rows))
    return rows


def _check(rows):
    assert rows
    for r in rows:
        where = f"{r['name']} sm_{r['arch']}"
        assert r["stack"] == 0 and r["local"] == 0 and r["stl"] == 0, f"{where} spills: {r}"
        if sass_report.is_backward(r):
            assert r["gatom"] == 0, f"{where}: {r['gatom']} global atomics in a backward kernel"


def test_triton_backwards_have_no_spills_or_global_atomics(triton_rows):
    _check(triton_rows)
    assert {r["op"] for r in triton_rows} == set(sass_report.SHAPES)
    for r in triton_rows:
        if r["variant"] != "fp32-ieee":
            want = {"HMMA", "HGMMA"} if r["arch"] >= 90 else {"HMMA"}
            assert want & set(r["mma"]), f"{r['name']} sm_{r['arch']}: no tensor-core instruction"


def test_cuda_kernels_have_no_spills_and_backwards_no_global_atomics(cuda_rows):
    _check(cuda_rows)
    chamfer = [r for r in cuda_rows if r["op"] == "smooth_chamfer_cuda"]
    assert any(sass_report.is_backward(r) for r in chamfer), "no smooth-Chamfer backward kernel"
    for r in chamfer:
        if "half" in r["kernel"] or "bfloat16" in r["kernel"]:
            assert "HMMA" in r["mma"], f"{r['name']} sm_{r['arch']}: no tensor-core instruction"
        assert r["threads"] and r["blocks"] >= 1, r


# ----------------------------------------------------------------------------- parsing

SASS = """
        Function : _Z6kernelPf
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0020*/                   LDSM.16.M88.4 R8, [R3] ;
        /*0030*/                   HMMA.16816.F32.BF16 R12, R8, R6, R12 ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/                   MUFU.EX2 R0, R0 ;
        /*0060*/               @P1 BRA 0xa0 ;
        /*0070*/                   BRA 0xc0 ;
        /*0080*/                   HMMA.16816.F32.BF16 R12, R8, R6, R12 ;
        /*0090*/              @!P1 BRA 0x80 ;
        /*00a0*/                   FADD R0, R0, R1 ;
        /*00b0*/                   MUFU.LG2 R0, R0 ;
        /*00c0*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R0 ;
        /*00d0*/                   NOP ;
        /*00e0*/               @P2 EXIT ;
        /*00f0*/                   ATOMS.ADD R5, [R6], R7 ;
        /*0100*/                   EXIT ;
        /*0110*/                   SHFL.IDX PT, R0, R0, RZ, 0x1f ;
"""


def test_sass_counts_read_each_instruction_kind():
    (instrs,) = sass_report.parse_sass(SASS).values()
    counts = sass_report.sass_counts(instrs)
    assert counts["mma"] == ["HMMA"] and counts["ldgsts"] == 1 and counts["ldsm"] == 1
    assert counts["gatom"] == 1 and counts["satom"] == 1 and counts["instructions"] == 18
    # The walk from the first matrix loop (0x10..0x40): MUFU, the predicated BRA that jumps over
    # the later matrix loop (0x80..0x90, the cold recompute) to 0xa0, FADD, MUFU.LG2, RED, the
    # predicated EXIT, ATOMS, EXIT; not the NOP, nor the stub after the EXIT.
    assert counts["epi"] == 8


def test_epilogue_is_none_without_a_matrix_loop():
    (instrs,) = sass_report.parse_sass(
        "Function : f\n /*0000*/ FADD R0, R0, R1 ;\n /*0010*/ EXIT ;\n").values()
    assert sass_report.epilogue_count(instrs) is None


@pytest.mark.parametrize("regs,smem,threads,arch,blocks", [
    (255, 0, 256, 90, 1),       # 8 warps of 256 registers: 64K / (8 * 8K) = 1
    (128, 0, 256, 90, 2),
    (32, 0, 256, 86, 6),        # thread limit: 1536 / 256
    (32, 50 * 1024, 128, 86, 1),  # two 50 KB blocks plus the reserve exceed 100 KB
    (32, 0, 32, 86, 16),        # block limit
])
def test_blocks_per_sm(regs, smem, threads, arch, blocks):
    assert sass_report.blocks_per_sm(regs, smem, threads, arch) == blocks
