"""benchmarks/gpu_check.sh end to end without a GPU, so an edit that breaks the script breaks CI
instead of a lent GPU's few minutes: DIVE_GPU_CHECK_DRY=1 uses the installed package (no build),
collects the GPU tests and skips them, and runs the GPU benchmarks on CPU at tiny sizes."""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
RESULT_FILES = {"summary.md", "tests.xml", "bench.json", "dispatch.json", "logs.tgz"}
DTYPES = ("bf16", "fp16", "fp32", "tf32")


def _report_module():
    spec = importlib.util.spec_from_file_location("_gpu_report",
                                                  REPO / "benchmarks" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if not SCRIPT.exists() or shutil.which("bash") is None:
        pytest.skip("needs bash and the repository's benchmarks/")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the dry run would run the real tests on it")
    out = tmp_path_factory.mktemp("gpu-check-out")
    # Generous stage limits: on a loaded CI machine no time limit may decide the outcome.
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, DIVE_GPU_CHECK_DRY="1",
               TEST_SECONDS="900", BENCH_SECONDS="900")
    env.pop("DIVE_BENCH_JSON", None)
    done = subprocess.run(["bash", str(SCRIPT), "quick"], cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=2400)
    return done, out


def test_the_dry_run_exits_0_with_at_most_8_small_files(dry_run):
    done, out = dry_run
    assert done.returncode == 0, (f"gpu_check.sh failed:\n{done.stdout[-6000:]}\n"
                                  f"{done.stderr[-2000:]}")
    files = sorted(p.name for p in out.iterdir())
    # The device tool brings back at most 8 files of at most 16 MiB each.
    assert set(files) == RESULT_FILES and len(files) <= 8, files
    assert all((out / name).is_file() and (out / name).stat().st_size < 16 * 2**20
               for name in files)


def test_the_summary_has_every_stage_and_shape_class_beside_its_prediction(dry_run):
    done, out = dry_run
    summary = (out / "summary.md").read_text()
    assert summary in done.stdout  # printed last, too
    assert "DRY RUN" in summary
    for stage in ("card", "build", "tests", "benchmarks", "dispatch"):
        assert f"| {stage} |" in summary, stage
    rows = [line.split("|")[1:-1] for line in summary.splitlines()
            if line.startswith("| gpu ")]
    by_key = {(cells[0].strip(), cells[1].strip()): [c.strip() for c in cells] for cells in rows}
    header = next(line for line in summary.splitlines() if line.startswith("| group | name |"))
    assert "pred." in header and "extra MB" in header
    for dt in DTYPES:
        for group in (f"gpu coco5k {dt} forward", f"gpu train 200x1000 {dt} fwd+bwd"):
            assert (group, "smooth_chamfer[triton]") in by_key, group
            assert any(k[0] == group and k[1].endswith("(floor)") for k in by_key), group
        assert any(k[0].startswith("gpu slot-attn") and dt in k[0] for k in by_key), dt
    assert ("gpu coco5k bf16 evaluation", "similarity_matrix") in by_key
    # Predictions from benchmarks/RESULTS.md stand beside the measured ratio (column "pred."
    # after "x floor"); "–" where a cell has none.
    triton_bf16 = by_key[("gpu coco5k bf16 forward", "smooth_chamfer[triton]")]
    assert triton_bf16[3] != "–" and triton_bf16[5] != "–", triton_bf16
    assert "## Winners per card" in summary


def test_the_dispatch_json_is_well_formed_and_never_merged(dry_run, tmp_path):
    _, out = dry_run
    cards = json.loads((out / "dispatch.json").read_text())
    assert list(cards) == ["cpu"]
    ops = cards["cpu"]
    assert set(ops["smooth_chamfer"]) == {f"{dt}/{cls}" for dt in DTYPES
                                          for cls in ("gallery", "train")}
    assert set(ops["slot_attention"]) == {f"{dt}/train" for dt in DTYPES}
    assert {b for entries in ops.values() for b in entries.values()} <= {"triton", "cuda"}
    spec = importlib.util.spec_from_file_location("_dispatch_table",
                                                  REPO / "benchmarks" / "dispatch_table.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    table = tmp_path / "dispatch.json"
    table.write_text(json.dumps({"cards": {}}))
    with pytest.raises(SystemExit, match="dry run"):
        builder.merge(str(out / "dispatch.json"), str(table))


def test_tests_xml_and_logs_hold_every_gpu_test_file(dry_run):
    _, out = dry_run
    root = ET.parse(out / "tests.xml").getroot()
    assert root.tag == "testsuites"
    cases = list(root.iter("testcase"))
    assert cases, "no GPU test was collected"
    # Without a GPU every collected GPU test is skipped, none fails.
    assert all(c.find("skipped") is not None for c in cases)
    with tarfile.open(out / "logs.tgz") as tar:
        names = {pathlib.PurePath(n).name for n in tar.getnames()}
    assert {"build.log", "bench.log", "test_smooth_chamfer.log",
            "test_slot_attention.log"} <= names
    run = json.loads((out / "bench.json").read_text())
    assert run["dry"] is True and run["device"] == "cpu" and run["rows"]


def test_predictions_parse_and_cover_the_headline_kernels():
    predicted = _report_module().predictions()
    for key in [("gpu coco5k bf16 forward", "torch.mm (floor)"),
                ("gpu coco5k bf16 forward", "smooth_chamfer[triton]"),
                ("gpu coco5k bf16 forward", "smooth_chamfer[cuda]"),
                ("gpu train 200x1000 bf16 fwd+bwd", "smooth_chamfer[triton]"),
                ("gpu slot-attn N=36 bf16 fwd+bwd", "slot_attention[triton]")]:
        assert key in predicted, key
        assert predicted[key]["ms"] is not None, key
    low, high = predicted[("gpu coco5k bf16 forward", "smooth_chamfer[triton]")]["x_floor"]
    assert 1.0 <= low <= high


@pytest.mark.parametrize("text,expected", [("12–15", (12.0, 15.0)), ("2.0-2.7", (2.0, 2.7)),
                                           ("7,000–9,500", (7000.0, 9500.0)), ("1", (1.0, 1.0)),
                                           ("", None), ("fast", None)])
def test_prediction_ranges(text, expected):
    assert _report_module().parse_range(text) == expected


def test_verdicts_allow_ten_percent_either_side():
    verdict = _report_module().verdict
    assert verdict(2.9, (2.0, 2.7)) == "in"
    assert verdict(3.0, (2.0, 2.7)) == "above"
    assert verdict(1.8, (2.0, 2.7)) == "below"
    assert verdict(None, (2.0, 2.7)) == "" and verdict(2.0, None) == ""
