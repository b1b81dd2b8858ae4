"""Write the measured backend table (ditfast/ops/cuda_impl.py) from a GPU benchmark results file.

usage: python scripts/backend_table.py benchmarks/results/bench_<date>_<commit>.json [--table PATH]

For every "ops" case of an op with both a "triton" and a "compiled" implementation where the run timed
both forced backends ("ditfast:triton", "ditfast:compiled"; results of older runs name it "ditfast:cuda"),
the faster one becomes the entry for that
op, dtype and row width (D, or Dh for the rope ops), exactly that width, by the total time over
the shapes of that width: other widths keep the fixed AUTO_ORDER. Forward + backward times decide
when both backends have them (training), else forward.
The device's entries in the table file are replaced; other devices' are kept. A CPU smoke run is
refused: its timings say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout that is not installed

from ditfast import _backend  # noqa: E402
from ditfast.ops import cuda_impl  # noqa: E402,F401  (registers the "compiled" implementations)


def _ops_with_a_choice() -> set:
    return {op for op in _backend.ops() if {"triton", "compiled"} <= set(_backend.implemented(op))}


def _time(variant: Optional[dict], direction: str) -> Optional[float]:
    if not variant or variant.get("status") != "ok" or not variant.get(direction):
        return None
    return variant[direction].get("ms")


def entries_from_results(results: dict) -> List[dict]:
    """One entry per (op, dtype, width): the backend with the smaller total time over every shape of
    that width the run measured (e.g. FLUX's image and text lengths share D), so no one shape decides."""
    ops = _ops_with_a_choice()
    totals = {}
    for case in results.get("results", []):
        if case.get("level") != "ops" or case.get("case") not in ops:
            continue
        by = {v["name"]: v for v in case.get("variants", [])}
        tri, cu = by.get("ditfast:triton"), by.get("ditfast:compiled") or by.get("ditfast:cuda")
        direction = "fwd_bwd" if _time(tri, "fwd_bwd") and _time(cu, "fwd_bwd") else "fwd"
        t_tri, t_cu = _time(tri, direction), _time(cu, direction)
        if not t_tri or not t_cu:
            continue
        dims = case["dims"]
        width = int(dims["Dh"] if "Dh" in dims else dims["D"])
        total = totals.setdefault((case["case"], case["dtype"], width), {"compiled": 0.0, "triton": 0.0, "shapes": []})
        total["compiled"] += t_cu
        total["triton"] += t_tri
        total["shapes"].append(f"{case.get('label')} ({direction})")
    return [{"op": op, "dtype": dtype, "width_min": width, "width_max": width,
             "backend": "compiled" if t["compiled"] < t["triton"] else "triton",
             "ms": {"compiled": t["compiled"], "triton": t["triton"], "shapes": t["shapes"]}}
            for (op, dtype, width), t in totals.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a results JSON written by python -m ditfast.bench on a GPU")
    ap.add_argument("--table", default=None, help=f"table file (default: ${cuda_impl.TABLE_ENV} or "
                                                   f"{cuda_impl.DEFAULT_TABLE})")
    args = ap.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    meta = results.get("meta", {})
    if meta.get("mode") != "gpu" or meta.get("device", {}).get("type") != "cuda":
        print(f"{args.results} is not a GPU run (mode {meta.get('mode')!r}); nothing written", file=sys.stderr)
        return 2
    entries = entries_from_results(results)
    if not entries:
        print(f"{args.results} times no op on both the triton and the compiled backend; nothing written", file=sys.stderr)
        return 2
    versions = meta.get("versions", {})
    measured = {"torch": versions.get("torch"), "triton": versions.get("triton"), "commit": meta.get("commit"),
                "date": meta.get("date"), "results": Path(args.results).name}
    path = cuda_impl.save_table(entries, meta["device"]["name"], args.table, measured=measured)
    for e in entries:
        print(f"{e['op']:<30} {e['dtype']:<9} width {e['width_min']:>5}: {e['backend']}  ({e['ms']})")
    print(f"wrote {len(entries)} entries for {meta['device']['name']!r} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
