"""The Triton forward's fast epilogue, read from its SASS (no GPU): after the last tensor-core
instruction of the main loop at most 25 thread-instructions per cosine (28 for sm_86 with masks
under Triton 3.6), no spills, the approximate MUFU exp2/log2 in use. Counted by benchmarks/epilogue_sass.py, run here in a
subprocess without TRITON_INTERPRET (see tests/test_triton_compile.py for why)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "epilogue_sass.py"
MAX_PER_COSINE = 25
# sm_86 with masks: 22.6 under Triton 3.8 but 27.3 under 3.6 (more registers, a longer select
# chain); every other case, the unmasked paper/gallery case on sm_86 included, stays <= 25.
MAX_MASKED_SM86 = 28


@pytest.fixture(scope="module")
def results():
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} not found")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = [["--arch", "90", "86", "--variant", "bf16"],
            ["--arch", "90", "--variant", "fp32-tf32", "--path", "safe-masked"]]
    out = []
    for args in runs:
        done = subprocess.run([sys.executable, "-P", str(SCRIPT), "--json", *args], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0 and "GPUTarget" in done.stderr:
            pytest.skip(f"no ahead-of-time compile API: {done.stderr[-500:]}")
        assert done.returncode == 0, done.stderr[-4000:]
        out += json.loads(done.stdout.splitlines()[-1])
    return out


def test_fast_epilogue_is_short_and_uses_tensor_cores(results):
    assert len(results) == 5
    for r in results:
        name = f"sm_{r['arch']} {r['variant']} {r['shape']} {r['path']}"
        print(f"{name}: {r['regs']} regs, {r['per_cosine']:.1f} instructions per cosine")
        assert r["stack"] == 0 and r["stl"] == 0, f"{name} spills: {r}"
        assert any(m.startswith("HGMMA" if r["arch"] >= 90 else "HMMA") for m in r["mma"]), name
        assert r["mufu"].get("MUFU.EX2", 0) and r["mufu"].get("MUFU.LG2", 0), name
        bound = MAX_MASKED_SM86 if r["arch"] < 90 and "masked" in r["path"] else MAX_PER_COSINE
        assert r["per_cosine"] <= bound, f"{name}: {r['per_cosine']:.1f} per cosine"
