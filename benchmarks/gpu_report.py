"""Writes summary.md and tests.xml of a benchmarks/gpu_check.sh run: the time of each stage, the
GPU tests' counts and failures, every benchmark row beside its prediction in
benchmarks/RESULTS.md, the extra memory, and the winners per card.

    python -P benchmarks/gpu_report.py --out $OUT --work $WORK --mode quick --card "..." --dry 0

Also usable on its own: `python benchmarks/gpu_report.py --bench bench.json` prints the
benchmark table with the predictions.
"""
import argparse
import datetime
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
PREDICTIONS_HEADING = "## GPU predictions"
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def parse_range(text):
    """'12–15', '12-15', '2.0' or '' -> (low, high) or None."""
    found = re.fullmatch(rf"\s*({_NUMBER})\s*(?:[–-]\s*({_NUMBER}))?\s*", text.replace(",", ""))
    if not found:
        return None
    low = float(found.group(1))
    return low, float(found.group(2)) if found.group(2) else low


def predictions(path=RESULTS):
    """{(group, name): {"ms": range, "x_floor": range, "x_ref": range}} from the first table
    under PREDICTIONS_HEADING in RESULTS.md (columns group, name, ms, x floor, x ref, ...)."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(PREDICTIONS_HEADING))
    except StopIteration:
        return {}
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            rows.append([c.strip().strip("`") for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    if len(rows) < 2:
        return {}
    header = [h.lower() for h in rows[0]]
    col = {name: header.index(name) for name in ("group", "name", "ms", "x floor", "x ref")
           if name in header}
    out = {}
    for cells in rows[2:]:  # rows[1] is the |---| line
        cell = {key: cells[i] if i < len(cells) else "" for key, i in col.items()}
        out[(cell.get("group", ""), cell.get("name", ""))] = {
            "ms": parse_range(cell.get("ms", "")), "x_floor": parse_range(cell.get("x floor", "")),
            "x_ref": parse_range(cell.get("x ref", ""))}
    return out


def with_ratios(rows):
    """Each row with x_floor (time / the group's floor) and x_ref (the group's reference time /
    time), both None where the group has no such row."""
    out = []
    for row in rows:
        same = [r for r in rows if r["group"] == row["group"]]
        floor = next((r["median_ms"] for r in same if r.get("role") == "floor"), None)
        ref = next((r["median_ms"] for r in same if r.get("role") == "ref"), None)
        ms = row["median_ms"]
        out.append(dict(row, x_floor=ms / floor if floor and ms else None,
                        x_ref=ref / ms if ref and ms else None))
    return out


def _fmt(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_range(r):
    if r is None:
        return "–"
    return f"{r[0]:g}" if r[0] == r[1] else f"{r[0]:g}–{r[1]:g}"


def verdict(value, expected):
    """'in', 'above' or 'below' the predicted range (10% slack), '' when either is missing."""
    if value is None or expected is None:
        return ""
    low, high = expected
    if value > high * 1.1:
        return "above"
    if value < low / 1.1:
        return "below"
    return "in"


def bench_table(run, predicted):
    rows = with_ratios(run.get("rows", []))
    lines = ["| group | name | ms | pred. ms | x floor | pred. | x ref | pred. | extra MB "
             "| vs pred. |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        p = predicted.get((row["group"], row["name"]), {})
        checks = [verdict(row["x_floor"], p.get("x_floor")) if row.get("role") != "floor" else "",
                  verdict(row["x_ref"], p.get("x_ref")) if row.get("role") != "ref" else ""]
        if not any(checks):
            checks = [verdict(row["median_ms"], p.get("ms"))]
        lines.append(
            f"| {row['group']} | {row['name']} | {_fmt(row['median_ms'], 3)} | "
            f"{_fmt_range(p.get('ms'))} | {_fmt(row['x_floor'])} | "
            f"{_fmt_range(p.get('x_floor'))} | "
            f"{_fmt(row['x_ref'], 1)} | {_fmt_range(p.get('x_ref'))} | "
            f"{_fmt(row.get('extra_mb'), 1)} | {', '.join(c for c in checks if c)} |")
    return lines


def triton_tables(run):
    """The fastest Triton tile table per benchmark group, where a group timed several."""
    best = {}
    for row in run.get("rows", []):
        found = re.fullmatch(r"\w+\[triton(?::(\w+))?\]", row["name"])
        if found:
            table = found.group(1) or "default"
            if row["group"] not in best or row["median_ms"] < best[row["group"]][1]:
                best[row["group"]] = (table, row["median_ms"])
    return best


def merge_junit(paths, dest):
    """One <testsuites> file of every report; (per-file counts, failed test ids)."""
    root = ET.Element("testsuites")
    counts, failed = {}, []
    for path in sorted(paths):
        name = os.path.splitext(os.path.basename(path))[0]
        try:
            tree = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as err:
            counts[name] = f"no report ({err.__class__.__name__}: killed by its time limit?)"
            continue
        suites = [tree] if tree.tag == "testsuite" else list(tree)
        total = defaultdict(int)
        for suite in suites:
            root.append(suite)
            for key in ("tests", "failures", "errors", "skipped"):
                total[key] += int(suite.get(key, 0))
            for case in suite.iter("testcase"):
                bad = case.find("failure")
                bad = bad if bad is not None else case.find("error")
                if bad is not None:
                    message = (bad.get("message") or "").splitlines()
                    failed.append(f"{case.get('classname')}::{case.get('name')}: "
                                  f"{message[0][:160] if message else ''}")
        ran = total["tests"] - total["skipped"]
        counts[name] = (f"{ran - total['failures'] - total['errors']} passed, "
                        f"{total['failures']} failed, {total['errors']} errors, "
                        f"{total['skipped']} skipped")
    ET.ElementTree(root).write(dest, encoding="utf-8", xml_declaration=True)
    return counts, failed


def _stages(path):
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [line.rstrip("\n").split("\t") for line in fh if line.strip()]


def summary(args):
    dry = ", DRY RUN: tiny sizes on CPU" if args.dry == "1" else ""
    out = [f"# dive GPU check ({args.mode}{dry})",
           "", f"- card: {args.card}",
           f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"]
    build = os.path.join(args.work, "build.log")
    if os.path.exists(build):
        info = [line for line in open(build) if line.startswith("{")]
        out.append(f"- build: {info[-1].strip() if info else 'see logs.tgz build.log'}")
    out += ["", "## Stages", "", "| stage | seconds | rc |", "|---|---:|---:|"]
    stages = _stages(os.path.join(args.work, "stages.tsv"))
    out += [f"| {s} | {t} | {rc} |" for s, t, rc in stages]
    out.append(f"| total | {sum(int(t) for _, t, _ in stages)} | |")

    counts, failed = merge_junit(glob.glob(os.path.join(args.work, "junit", "*.xml")),
                                 os.path.join(args.out, "tests.xml"))
    out += ["", "## GPU tests", ""] + [f"- {name}: {c}" for name, c in counts.items()]
    if failed:
        out += ["", "Failed:"] + [f"- {f}" for f in failed[:30]]

    bench = os.path.join(args.out, "bench.json")
    out += ["", "## Benchmarks (median; x floor = time / the GEMM floor of the same run, x ref = "
            "the reference's time / time; pred. = benchmarks/RESULTS.md)", ""]
    if os.path.exists(bench):
        with open(bench) as fh:
            run = json.load(fh)
        out += bench_table(run, predictions())
        tables = triton_tables(run)
        if any(t != "default" for t, _ in tables.values()):
            out += ["", "Fastest Triton tile table per group:"] + [
                f"- {group}: {t} ({ms:.3f} ms)" for group, (t, ms) in tables.items()]
    else:
        out.append("no bench.json: the benchmarks did not run (see logs.tgz bench.log)")

    dispatch = os.path.join(args.out, "dispatch.json")
    out += ["", "## Winners per card (dispatch.json)", ""]
    try:
        with open(dispatch) as fh:
            cards = json.load(fh)
        for card, ops in cards.items():
            for op, entries in sorted(ops.items()):
                out.append(f"- {card} {op}: " + ", ".join(
                    f"{k} {v}" for k, v in sorted(entries.items())))
    except (OSError, ValueError):
        out.append("none (see logs.tgz dispatch.log)")
    with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(out) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--work")
    parser.add_argument("--mode", default="quick")
    parser.add_argument("--card", default="unknown")
    parser.add_argument("--dry", default="0")
    parser.add_argument("--bench", help="print the table of this bench.json and stop")
    args = parser.parse_args(argv)
    if args.bench:
        with open(args.bench) as fh:
            print("\n".join(bench_table(json.load(fh), predictions())))
        return
    if not (args.out and args.work):
        parser.error("--out and --work are needed (or --bench)")
    summary(args)


if __name__ == "__main__":
    sys.exit(main())
