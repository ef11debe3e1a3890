"""Turns a gpu_check.sh benchmark run (DIVE_BENCH_JSON) into the dispatch table entries of its
card: the faster of triton and cuda per op and <dtype>/<class> (see dive/ops/dispatch.py).

    python benchmarks/dispatch_table.py $OUT/bench.json > $OUT/dispatch.json
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


def entries(rows):
    """{op: {"dtype/class": fastest backend}}; several groups of one key (e.g. token counts)
    add their times."""
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
        # conftest writes it at the end of the session: a run killed by its time limit has none.
        sys.exit(f"{path} is missing: the benchmark run did not finish (see bench.log)")
    with open(path) as fh:
        run = json.load(fh)
    print(json.dumps({run["device"]: entries(run["rows"])}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
