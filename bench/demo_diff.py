#!/usr/bin/env python3
"""Compare two runs of the same run file (e.g. `legora demo` built from two commits).

Usage: bench/demo_diff.py OUT_A OUT_B [--steps N]

OUT_A and OUT_B are output folders (`out/demo`). Prints

- every evaluation number of report.json (val losses and evaluator metrics per task and
  model, routing accuracy, entropy and load) side by side, with |a - b| and whether the two
  agree to 4 decimals;
- per training stage, the first N steps of metrics.jsonl (loss and gradient norm) and the
  first step at which they differ, with the relative difference: where two builds first
  part tells a change of arithmetic (a relative difference near 1e-7 that training then
  amplifies) from a change of method (a different loss or gradient from the first step).

Standard library only; exits 0 whatever it finds.
"""

import json
import sys
from pathlib import Path


def leaves(x, path=""):
    """(path, number) for every number in a JSON value."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}/{i}")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, float(x)


def report_numbers(out):
    """Evaluation numbers of report.json keyed by task name and path."""
    report = json.loads((out / "report.json").read_text())
    rows = {}
    for task in report["tasks"]:
        for path, v in leaves(task):
            if path != "/n_eval":
                rows[f"{task['task']}{path}"] = v
    return rows


def train_steps(out):
    """{stage: [(step, loss, grad_norm)]} from metrics.jsonl."""
    stages = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            stages.setdefault(r["stage"], []).append((r["step"], r["loss"], r["grad_norm"]))
    return stages


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def compare_reports(a, b):
    ra, rb = report_numbers(a), report_numbers(b)
    keys = [k for k in ra if k in rb]
    width = max(len(k) for k in keys)
    equal = 0
    print(f"{'number':<{width}}  {'A':>10}  {'B':>10}  {'|A-B|':>9}  4 dp")
    for k in keys:
        same = f"{ra[k]:.4f}" == f"{rb[k]:.4f}"
        equal += same
        print(f"{k:<{width}}  {ra[k]:10.4f}  {rb[k]:10.4f}  {abs(ra[k] - rb[k]):9.2e}  "
              f"{'=' if same else 'differs'}")
    only = sorted(set(ra) ^ set(rb))
    print(f"\n{equal} of {len(keys)} numbers equal to 4 decimals"
          + (f"; in one report only: {', '.join(only)}" if only else ""))


def compare_steps(a, b, n):
    sa, sb = train_steps(a), train_steps(b)
    for stage in [s for s in sa if s in sb]:
        print(f"\nstage {stage}: step, loss A, loss B, grad_norm A, grad_norm B")
        pairs = list(zip(sa[stage], sb[stage]))
        for (step, la, ga), (_, lb, gb) in pairs[:n]:
            print(f"  {step:4d}  {la:.9f}  {lb:.9f}  {ga:.9f}  {gb:.9f}")
        first = next(((x, y) for x, y in pairs if x[1:] != y[1:]), None)
        if first is None:
            print(f"  all {len(pairs)} steps equal")
        else:
            (step, la, ga), (_, lb, gb) = first
            print(f"  first difference at step {step}: loss rel {rel(la, lb):.1e}, "
                  f"grad_norm rel {rel(ga, gb):.1e}")


def main():
    args = sys.argv[1:]
    n = 4
    if "--steps" in args:
        i = args.index("--steps")
        n = int(args[i + 1])
        del args[i:i + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    a, b = Path(args[0]), Path(args[1])
    compare_reports(a, b)
    compare_steps(a, b, n)


if __name__ == "__main__":
    main()
