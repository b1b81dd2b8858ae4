#!/usr/bin/env python3
"""Render the latest benchmark results into README.md, between the markers

    <!-- ditfast-bench:start -->
    <!-- ditfast-bench:end -->

The table carries the device, the versions, the commit and the date of the run it came from. Only
GPU runs are used (CPU smoke results are not a speed claim) unless --allow-smoke is given.

    python scripts/render_readme_table.py                 # newest GPU run under benchmarks/results/
    python scripts/render_readme_table.py --results benchmarks/results/h100-80gb-hbm3/bench_....json
    python scripts/render_readme_table.py --check         # exit 1 if README.md is out of date
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

from ditfast.bench import report  # noqa: E402


def candidates(path: str, allow_smoke: bool):
    """(date, file, results) of every readable results JSON under ``path`` (or the file itself)."""
    files = [path] if os.path.isfile(path) else glob.glob(os.path.join(path, "**", "*.json"), recursive=True)
    out = []
    for f in files:
        try:
            res = report.load_json(f)
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(res, dict) or not str(res.get("schema", "")).startswith("ditfast-bench/"):
            continue
        if res.get("meta", {}).get("mode") != "gpu" and not allow_smoke:
            continue
        out.append((res["meta"].get("date", ""), f, res))
    return sorted(out, key=lambda t: (t[0], t[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"),
                   help="a results JSON, or a folder searched recursively for the newest one")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the README would change")
    p.add_argument("--allow-smoke", action="store_true", help="accept a CPU smoke run (labelled as such)")
    args = p.parse_args(argv)

    found = candidates(args.results, args.allow_smoke)
    if not found:
        kind = "results" if args.allow_smoke else "GPU results (CPU smoke runs need --allow-smoke)"
        print(f"no {kind} under {args.results}", file=sys.stderr)
        return 2
    _, path, results = found[-1]
    problems = report.validate(results)
    if problems:
        print(f"{path} fails the results schema:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
        return 2
    try:
        source = os.path.relpath(path, os.path.dirname(os.path.abspath(args.readme)))
    except ValueError:
        source = path
    with open(args.readme) as f:
        old = f.read()
    try:
        new = report.update_readme(old, report.render_markdown(results, source=source))
    except ValueError as exc:
        print(f"{args.readme}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != old:
            print(f"{args.readme} is out of date with {path}; run scripts/render_readme_table.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        with open(args.readme, "w") as f:
            f.write(new)
    print(f"{args.readme}: table from {path} ({results['meta']['device']['name']}, {results['meta']['date']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
