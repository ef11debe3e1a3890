"""backend="auto" follows the measured table when the card is known; the table builder."""
import importlib.util
import json
import pathlib
from importlib import resources

import pytest
import torch

from dive.ops import dispatch, registry

CARDS = {
    "NVIDIA H100 80GB HBM3": {"smooth_chamfer": {"bf16/gallery": "cuda", "bf16/train": "triton"}},
    "NVIDIA GeForce RTX 3090": {"slot_attention": {"fp32/train": "cuda"}},
}


def test_the_shipped_table_loads():
    assert isinstance(dispatch.table(), dict)


def test_keys_follow_dtype_tf32_and_grad():
    matmul = torch.backends.cuda.matmul  # a module proxy: monkeypatch cannot restore it
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert dispatch.key(torch.bfloat16, False) == "bf16/gallery"
        assert dispatch.key(torch.float32, True) == "fp32/train"
        matmul.allow_tf32 = True
        assert dispatch.key(torch.float32, False) == "tf32/gallery"
        assert dispatch.key(torch.float64, False) is None
    finally:
        matmul.allow_tf32 = before


def test_lookup_by_exact_name_then_family():
    assert dispatch.lookup(CARDS, "NVIDIA H100 80GB HBM3", "smooth_chamfer", "bf16/gallery") \
        == "cuda"
    assert dispatch.lookup(CARDS, "NVIDIA H100 PCIe", "smooth_chamfer", "bf16/train") == "triton"
    assert dispatch.lookup(CARDS, "NVIDIA GeForce RTX 3090 Ti", "slot_attention",
                           "fp32/train") is None  # another family
    assert dispatch.lookup(CARDS, "NVIDIA H200", "smooth_chamfer", "bf16/gallery") is None
    assert dispatch.lookup(CARDS, "NVIDIA H100 80GB HBM3", "smooth_chamfer", "fp16/gallery") \
        is None


def test_cpu_tensors_never_consult_the_table():
    assert dispatch.measured("smooth_chamfer", torch.device("cpu"), torch.bfloat16, False) is None


def test_resolve_takes_a_measured_backend_only_when_it_can_run():
    cpu = torch.device("cpu")
    assert registry.resolve("smooth_chamfer", "auto", cpu, "torch").name == "torch"
    assert registry.resolve("smooth_chamfer", "auto", cpu, "cuda").name == "cpu"  # cannot run
    assert registry.resolve("smooth_chamfer", "auto", cpu, None).name == "cpu"
    assert registry.resolve("smooth_chamfer", "cpu", cpu, "torch").name == "cpu"  # explicit wins


def _builder():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "dispatch_table.py"
    if not path.exists():
        pytest.skip("benchmarks/dispatch_table.py is not in this checkout")
    spec = importlib.util.spec_from_file_location("_dispatch_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_builder_picks_the_faster_kernel(tmp_path, capsys):
    rows = [
        {"group": "gpu coco5k bf16 forward", "name": "smooth_chamfer[triton]", "median_ms": 7.0},
        {"group": "gpu coco5k bf16 forward", "name": "smooth_chamfer[cuda]", "median_ms": 6.0},
        {"group": "gpu coco5k bf16 forward", "name": "smooth_chamfer[torch]", "median_ms": 1.0},
        {"group": "gpu coco5k bf16 forward", "name": "torch.mm (floor)", "median_ms": 0.5},
        {"group": "gpu train 200x1000 fp32 fwd+bwd", "name": "smooth_chamfer[triton]",
         "median_ms": 0.4},
        {"group": "gpu train 200x1000 fp32 fwd+bwd", "name": "smooth_chamfer[cuda]",
         "median_ms": 0.9},
        # Summed over token counts: cuda wins 0.3 + 0.3 against 0.2 + 0.5.
        {"group": "gpu slot-attn N=36 bf16 fwd+bwd", "name": "slot_attention[triton]",
         "median_ms": 0.2},
        {"group": "gpu slot-attn N=36 bf16 fwd+bwd", "name": "slot_attention[cuda]",
         "median_ms": 0.3},
        {"group": "gpu slot-attn N=64 bf16 fwd+bwd", "name": "slot_attention[triton]",
         "median_ms": 0.5},
        {"group": "gpu slot-attn N=64 bf16 fwd+bwd", "name": "slot_attention[cuda]",
         "median_ms": 0.3},
    ]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"device": "NVIDIA H200", "rows": rows}))
    _builder().main(str(bench))
    table = json.loads(capsys.readouterr().out)
    assert table == {"NVIDIA H200": {
        "smooth_chamfer": {"bf16/gallery": "cuda", "fp32/train": "triton"},
        "slot_attention": {"bf16/train": "cuda"}}}
    # The output merges straight into the shipped file's "cards" and is found there.
    assert dispatch.lookup(table, "NVIDIA H200", "slot_attention", "bf16/train") == "cuda"


def test_a_backend_missing_from_some_groups_does_not_win_on_a_partial_sum(tmp_path, capsys):
    rows = [
        {"group": "gpu slot-attn N=36 bf16 fwd+bwd", "name": "slot_attention[triton]",
         "median_ms": 0.9},
        {"group": "gpu slot-attn N=36 bf16 fwd+bwd", "name": "slot_attention[cuda]",
         "median_ms": 0.8},
        {"group": "gpu slot-attn N=64 bf16 fwd+bwd", "name": "slot_attention[triton]",
         "median_ms": 0.9},
    ]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"device": "X", "rows": rows}))
    _builder().main(str(bench))
    assert json.loads(capsys.readouterr().out)["X"]["slot_attention"]["bf16/train"] == "triton"


def test_a_run_that_wrote_no_results_is_a_clear_error(tmp_path):
    # gpu_check.sh's time limit can kill pytest before conftest writes bench.json.
    with pytest.raises(SystemExit, match="bench.json is missing"):
        _builder().main(str(tmp_path / "bench.json"))


FIXTURE = pathlib.Path(__file__).resolve().parent / "data" / "gpu_check_bench.json"


def _shipped_copy(tmp_path):
    table = tmp_path / "dispatch.json"
    table.write_text(resources.files("dive.ops").joinpath("dispatch.json").read_text())
    return table


def test_a_runs_winners_merge_into_the_shipped_table(tmp_path, capsys):
    builder = _builder()
    builder.main(str(FIXTURE))
    winners = tmp_path / "winners.json"
    winners.write_text(capsys.readouterr().out)
    table = _shipped_copy(tmp_path)
    builder.merge(str(winners), str(table))
    merged = json.loads(table.read_text())
    assert "_doc" in merged
    cards = merged["cards"]
    # The non-default tile table ("triton:wide") is faster but does not count: launches use
    # the default one. fp32 cosines: cuda; summed over N=36 and 64: cuda for bf16.
    assert cards["NVIDIA H200"]["smooth_chamfer"] == {
        "bf16/gallery": "triton", "fp16/gallery": "triton", "fp32/gallery": "cuda",
        "tf32/gallery": "triton", "bf16/train": "triton", "fp16/train": "triton",
        "fp32/train": "cuda", "tf32/train": "triton"}
    assert cards["NVIDIA H200"]["slot_attention"] == {"bf16/train": "cuda",
                                                     "fp32/train": "triton"}
    assert dispatch.lookup(cards, "NVIDIA H200", "smooth_chamfer", "fp32/gallery") == "cuda"
    # A later run of the same card replaces its entries and keeps the others.
    winners.write_text(json.dumps({"NVIDIA H200": {"smooth_chamfer": {"fp32/gallery": "triton"}},
                                   "NVIDIA H100 80GB HBM3": {"slot_attention":
                                                             {"bf16/train": "triton"}}}))
    builder.merge(str(winners), str(table))
    cards = json.loads(table.read_text())["cards"]
    assert cards["NVIDIA H200"]["smooth_chamfer"]["fp32/gallery"] == "triton"
    assert cards["NVIDIA H200"]["smooth_chamfer"]["fp32/train"] == "cuda"
    assert dispatch.lookup(cards, "NVIDIA H100 PCIe", "slot_attention", "bf16/train") == "triton"


@pytest.mark.parametrize("winners,message", [
    ({"cpu": {"smooth_chamfer": {"bf16/gallery": "triton"}}}, "dry run"),
    ({"NVIDIA H200": {"smooth_chamfer": {"bf16/gallery": "torch"}}}, "bad entry"),
    ({"NVIDIA H200": {"smooth_chamfer": {"int8/gallery": "cuda"}}}, "bad entry"),
    ({"NVIDIA H200": ["cuda"]}, "expected"),
    ({}, "expected"),
])
def test_merge_refuses_a_dry_run_or_a_malformed_file_and_writes_nothing(tmp_path, winners,
                                                                        message):
    path = tmp_path / "winners.json"
    path.write_text(json.dumps(winners))
    table = _shipped_copy(tmp_path)
    before = table.read_text()
    with pytest.raises(SystemExit, match=message):
        _builder().merge(str(path), str(table))
    assert table.read_text() == before
