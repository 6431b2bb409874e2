"""Side-by-side benchmarks: ours vs the reference, same run, same inputs, median of N repetitions.

    python benchmarks/run.py [--only NAME ...] [--repeat N]

Writes benchmarks/results.json (list of {name, ours, reference, unit, ratio}; ratio = reference / ours, higher is
better), benchmarks/results.md (its Markdown table) and the same table into README.md between the bench markers.

Rows report wall time by default; a row with a `metric` reports `metric(result)` instead (e.g. peak memory
measured by the callable itself), and a row's `summary(ours, reference)` is appended to its note once the
medians are known (e.g. a throughput derived from the timings).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
sys.path.insert(0, str(HERE))

from predict_rows import ROWS as PREDICT_ROWS  # noqa: E402
from rows import ROWS as BASE_ROWS  # noqa: E402

ROWS = {**BASE_ROWS, **PREDICT_ROWS}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_row(name: str, repeat: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as tmp:
        row = ROWS[name](Path(tmp))
        repeat = min(repeat, row.repeat or repeat)
        if row.metric is None and not row.warmed:  # a row measuring its own quantity (fresh processes) needs none
            row.ours()  # warm-up (imports, caches, first-call allocations), not timed
            row.reference()
        ours_t, ref_t = [], []
        for k in range(repeat):
            # alternate the order so that neither side always runs on a warmer machine
            if k % 2 == 0:
                t_o, r_o = timed(row.ours)
                t_r, r_r = timed(row.reference)
            else:
                t_r, r_r = timed(row.reference)
                t_o, r_o = timed(row.ours)
            if k == 0:
                row.check(r_o, r_r)
            if row.metric is not None:
                t_o, t_r = row.metric(r_o), row.metric(r_r)
            ours_t.append(t_o)
            ref_t.append(t_r)
        note = getattr(row.check, "note", row.note)
    ours, ref = statistics.median(ours_t), statistics.median(ref_t)
    if row.summary is not None:
        note = f"{note}; {row.summary(ours, ref)}"
    return {"name": name, "ours": round(ours, 4), "reference": round(ref, 4), "unit": row.unit,
            "ratio": round(ref / ours, 2), "repeat": repeat, "note": note}


def markdown(results: list[dict]) -> str:
    lines = ["| benchmark | ours | reference | ratio (ref / ours) | inputs |", "|---|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| `{r['name']}` | {r['ours']:.3f} {r['unit']} | {r['reference']:.3f} {r['unit']} | "
                     f"{r['ratio']:.2f}x | {r['note']} |")
    return "\n".join(lines) + "\n"


def update_readme(results: list[dict]) -> None:
    """Replace the README's performance table (between the bench markers) with the table of `results`."""
    text = README.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{README}: no {README_START} ... {README_END} markers around the performance table")
    README.write_text(text[: start + len(README_START)] + "\n" + markdown(results) + text[end:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(ROWS), metavar="NAME", help=f"rows: {', '.join(ROWS)}")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions per side (median reported)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    names = args.only or list(ROWS)
    results = []
    print(f"{'benchmark':<26}{'ours':>12}{'reference':>12}{'ratio':>9}", flush=True)
    for name in names:
        r = run_row(name, args.repeat)
        results.append(r)
        print(f"{name:<26}{r['ours']:>10.3f} {r['unit']}{r['reference']:>10.3f} {r['unit']}{r['ratio']:>8.2f}x"
              f"   {r['note']}", flush=True)
    if args.only:  # partial run: update those rows, keep the others
        path = HERE / "results.json"
        old = json.loads(path.read_text()) if path.is_file() else []
        merged = {r["name"]: r for r in old}
        merged.update({r["name"]: r for r in results})
        results = [merged[n] for n in ROWS if n in merged] + [r for n, r in merged.items() if n not in ROWS]
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(results))
    update_readme(results)
    print(f"wrote {HERE / 'results.json'}, {HERE / 'results.md'} and the table in {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
