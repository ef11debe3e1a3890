"""Turns a gpu_check.sh benchmark run (DIVE_BENCH_JSON) into the dispatch table entries of its
card: the faster of triton and cuda per op and <dtype>/<class> (see dive/ops/dispatch.py), and
folds such entries into the shipped table.

    python benchmarks/dispatch_table.py $OUT/bench.json > $OUT/dispatch.json
    python benchmarks/dispatch_table.py --merge $OUT/dispatch.json   # into dive/ops/dispatch.json
"""
import json
import os
import re
import sys
from collections import defaultdict

# benchmark group -> (op, dtype, class)
GROUPS = [
    (re.compile(r"gpu coco5k (\w+) forward"), "smooth_chamfer", "gallery"),
    (re.compile(r"gpu train 200x1000 (\w+) fwd\+bwd"), "smooth_chamfer", "train"),
    (re.compile(r"gpu slot-attn N=\d+ (\w+) fwd\+bwd"), "slot_attention", "train"),
]
CANDIDATES = ("triton", "cuda")
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "dive", "ops",
                       "dispatch.json")
_ENTRY = re.compile(r"(bf16|fp16|fp32|tf32)/(gallery|train)")


def entries(rows):
    """{op: {"dtype/class": fastest backend}}; several groups of one key (e.g. token counts)
    add their times. Rows of the non-default Triton tile tables ("op[triton:name]") only
    inform the summary: launches use the default table."""
    totals = defaultdict(lambda: defaultdict(float))
    counts = defaultdict(lambda: defaultdict(int))
    for row in rows:
        backend = re.fullmatch(r"\w+\[(\w+)\]", row["name"])
        if not backend or backend.group(1) not in CANDIDATES:
            continue
        for pattern, op, cls in GROUPS:
            found = pattern.fullmatch(row["group"])
            if found:
                k = (op, f"{found.group(1)}/{cls}")
                totals[k][backend.group(1)] += row["median_ms"]
                counts[k][backend.group(1)] += 1
    table = defaultdict(dict)
    for (op, entry), times in totals.items():
        complete = {b: t for b, t in times.items() if counts[(op, entry)][b] == max(
            counts[(op, entry)].values())}
        table[op][entry] = min(complete, key=complete.get)
    return dict(table)


def main(path):
    if not os.path.exists(path):
        # conftest writes it as rows come: a run that wrote none has no file.
        sys.exit(f"{path} is missing: the benchmark run did not finish (see bench.log)")
    with open(path) as fh:
        run = json.load(fh)
    print(json.dumps({run["device"]: entries(run["rows"])}, indent=1, sort_keys=True))


def merge(path, table_path=SHIPPED):
    """Folds the {card: {op: {entry: backend}}} of `path` into the "cards" of `table_path`; a new
    figure replaces an old one of the same card, op and entry. A dry run's (card "cpu") or a
    malformed file is refused with a SystemExit naming what is wrong; nothing is written then."""
    with open(path) as fh:
        new = json.load(fh)
    if not isinstance(new, dict) or not new:
        sys.exit(f"{path}: expected {{card: {{op: {{entry: backend}}}}}}, got {new!r:.200}")
    for card, ops in new.items():
        if card == "cpu":
            sys.exit(f"{path}: card 'cpu' is a dry run (DIVE_GPU_CHECK_DRY=1), not a GPU")
        if not isinstance(ops, dict):
            sys.exit(f"{path}: card {card!r}: expected {{op: {{entry: backend}}}}")
        for op, picks in ops.items():
            if not isinstance(picks, dict):
                sys.exit(f"{path}: {card!r} {op!r}: expected {{entry: backend}}")
            for entry, backend in picks.items():
                if not _ENTRY.fullmatch(entry) or backend not in CANDIDATES:
                    sys.exit(f"{path}: {card!r} {op!r}: bad entry {entry!r}: {backend!r} "
                             f"(entries are <bf16|fp16|fp32|tf32>/<gallery|train>, backends "
                             f"{' or '.join(CANDIDATES)})")
    with open(table_path) as fh:
        table = json.load(fh)
    for card, ops in new.items():
        for op, picks in ops.items():
            table["cards"].setdefault(card, {}).setdefault(op, {}).update(picks)
            print(f"{card} {op}: " + ", ".join(f"{k} {v}" for k, v in sorted(picks.items())))
    with open(table_path, "w") as fh:
        json.dump(table, fh, indent=1, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--merge":
        merge(*sys.argv[2:4])
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        sys.exit(__doc__)
