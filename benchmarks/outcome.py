"""What a GPU run returned: its summary table, and the checks of its output folder.

    python benchmarks/outcome.py summary DIR      # the table gpu_run.sh prints last (and writes to summary.txt)
    python benchmarks/outcome.py check OUT_DIR [--expect a.json,b.json]
    python benchmarks/outcome.py merge OUT_DIR RESULT.json   # the bench tiers as one file, to commit

``check`` enforces what the GPU machine sends back (docs/gpu-run.md): at most 8 plain files, each at most
16 MB, at most two folders deep, plain names, no temporary file left behind; every JSON valid against
its schema (smoke.json: benchmarks/smoke.py; bench_*.json: ditfast.bench.report), the log archive
readable. The CPU rehearsal (gpu_run.sh --rehearse) runs it on its own output.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("_ditfast_bench_report", os.path.join(ROOT, "ditfast", "bench", "report.py"))
R = importlib.util.module_from_spec(_spec)  # report.py alone: no torch import, so the checks start in a blink
_spec.loader.exec_module(R)

SMOKE_SCHEMA = "ditfast-smoke/1"
STATUSES = ("ok", "fail", "error", "skipped")
MAX_FILES, MAX_BYTES, MAX_DEPTH = 8, 16 * 2**20, 2
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
BENCH_FILES = ("bench_ops.json", "bench_blocks.json", "bench_peers.json")


def _load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def validate_smoke(res: dict) -> List[str]:
    """Problems of a smoke results dict against its schema (empty: valid)."""
    errs = [f"top level: missing {k!r}" for k in ("schema", "meta", "peaks", "rows", "summary") if k not in res]
    if errs:
        return errs
    if res["schema"] != SMOKE_SCHEMA:
        errs.append(f"schema: {res['schema']!r} is not {SMOKE_SCHEMA!r}")
    errs += [f"meta: missing {k!r}" for k in ("device", "versions", "commit", "date", "dtype", "mode", "shapes")
             if k not in res["meta"]]
    errs += [f"peaks: missing {k!r}" for k in ("copy", "matmul") if k not in res["peaks"]]
    for i, r in enumerate(res["rows"]):
        where = f"rows[{i}] ({r.get('op')}/{r.get('backend')}/{r.get('shape')})"
        errs += [f"{where}: missing {k!r}" for k in ("op", "shape", "backend", "status", "checks", "fwd", "fwd_bwd")
                 if k not in r]
        if r.get("status") not in STATUSES:
            errs.append(f"{where}: status {r.get('status')!r}")
        elif r["status"] != "ok" and not r.get("reason"):
            errs.append(f"{where}: status {r['status']!r} without a reason")
        if r.get("status") in ("ok", "fail"):
            if not r.get("checks"):
                errs.append(f"{where}: judged without checks")
            for key in ("fwd", "fwd_bwd"):
                if not (r.get(key) or {}).get("ms", 0) > 0:
                    errs.append(f"{where}: no positive {key} time")
    counts = {s: sum(r.get("status") == s for r in res["rows"]) for s in STATUSES}
    if res["summary"].get("counts") != counts:
        errs.append(f"summary.counts {res['summary'].get('counts')} != rows {counts}")
    return errs


def smoke_table(res: dict) -> str:
    rows = []
    for r in res["rows"]:
        f, b = r.get("fwd") or {}, r.get("fwd_bwd") or {}
        unit = "TF" if r["metric"] == "TFLOP/s" else "GB/s"
        note = r.get("reason") if r["status"] != "ok" else ""
        if r.get("sm90"):
            note = (note + "; " if note else "") + "sm_90: " + r["sm90"]
        rows.append([r["op"], r["shape"], r["backend"], r["status"], R.fmt(r.get("max_err_over_bound")),
                     R.fmt(f.get("ms")), f"{R.fmt(f.get('rate'))} {unit}" if f else "",
                     R.fmt(f.get("pct_peak"), "%"), R.fmt(b.get("ms")), R.fmt(b.get("pct_peak"), "%"),
                     (note or "")[:200]])
    return R.format_table(["op", "shape", "backend", "status", "err/bound", "fwd ms", "fwd rate", "%pk", "f+b ms",
                                "%pk", "note"], rows, left=4)



def tests_summary(folder: str) -> List[str]:
    """The test tier in a few lines: counts from the JUnit XML, the failures by name."""
    xml = os.path.join(folder, "logs", "tests.xml")
    log = os.path.join(folder, "logs", "tests.log")
    lines = []
    if os.path.isfile(xml):
        try:
            root = ET.parse(xml).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            a = suite.attrib
            lines.append(f"tests: {a.get('tests')} run, {a.get('failures')} failed, {a.get('errors')} errors, "
                         f"{a.get('skipped')} skipped in {float(a.get('time', 0)):.0f} s (JUnit XML)")
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    lines.append(f"  FAILED {case.get('classname')}::{case.get('name')}")
        except (ET.ParseError, AttributeError) as exc:
            lines.append(f"tests: tests.xml unreadable ({exc})")
    if os.path.isfile(log):
        with open(log, errors="replace") as f:
            tail = [ln.rstrip() for ln in f if ln.strip()][-1:]
        lines += [f"tests.log last line: {t}" for t in tail]
    return lines or ["tests: no result (tier not reached)"]


def summary(folder: str) -> str:
    report = R
    out = []
    sm = _load(os.path.join(folder, "smoke.json"))
    meta = (sm or {}).get("meta") or next((b["meta"] for b in (_load(os.path.join(folder, f)) for f in BENCH_FILES) if b), None)
    if meta:
        v = meta["versions"]
        out.append(f"GPU run on {meta['device']['name']} | torch {v.get('torch')} | triton {v.get('triton')} | "
                   f"CUDA {v.get('cuda')} | commit {str(meta.get('commit'))[:10]} | {meta['date']} | {meta['mode']}")
    if sm:
        p = sm["peaks"]
        out += ["", f"== tier 2 smoke (bf16; peaks copy {report.fmt(p['copy']['gbps'])} GB/s, matmul "
                    f"{report.fmt(p['matmul']['tflops'])} TFLOP/s; sm_90 report: {sm.get('sm90_source') or 'no offline report'})",
                smoke_table(dict(sm, rows=[r for r in sm["rows"] if r["status"] != "skipped" or "time limit" in str(r.get("reason"))])),
                f"smoke: {sm['summary'].get('counts')} in {sm['summary'].get('elapsed_s', 0):.0f} s"]
    else:
        out += ["", "== tier 2 smoke: no smoke.json"]
    out += ["", "== tier 3 tests"] + tests_summary(folder)
    for name in BENCH_FILES:
        res = _load(os.path.join(folder, name))
        if not res:
            out += ["", f"== {name}: not written (tier not reached or failed)"]
            continue
        n_ok = sum(1 for c in res["results"] if any(v["name"] == "ditfast" and v["status"] == "ok" for v in c["variants"]))
        out += ["", f"== {name}: {len(res['results'])} cases, ditfast measured in {n_ok}, "
                    f"{res['meta'].get('elapsed_s', 0):.0f} s", report.summary_table(res)]
    return "\n".join(out)


def check(folder: str, expect: List[str]) -> List[str]:
    """Problems with what the machine would send back from ``folder`` (empty: fine)."""
    report = R
    problems, files = [], []
    for root, dirs, names in os.walk(folder):
        depth = os.path.relpath(root, folder).count(os.sep) + (root != folder)
        if depth > MAX_DEPTH:
            problems.append(f"{root}: more than {MAX_DEPTH} folders deep")
        files += [os.path.join(root, n) for n in names]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files, more than {MAX_FILES}: {sorted(os.path.relpath(f, folder) for f in files)}")
    for f in files:
        name = os.path.basename(f)
        if not NAME.match(name) or name.endswith((".tmp", ".part")):
            problems.append(f"{name}: a temporary or oddly named file")
        if os.path.islink(f) or not os.path.isfile(f):
            problems.append(f"{name}: not a plain file")
        elif os.path.getsize(f) > MAX_BYTES:
            problems.append(f"{name}: {os.path.getsize(f)} bytes, over 16 MB")
    for name in expect:
        if not os.path.isfile(os.path.join(folder, name)):
            problems.append(f"{name}: missing")
    for f in files:
        name = os.path.basename(f)
        if name.endswith(".json"):
            data = _load(f)
            if data is None:
                problems.append(f"{name}: not valid JSON")
            elif name == "smoke.json":
                problems += [f"smoke.json: {p}" for p in validate_smoke(data)]
            elif name.startswith("bench_"):
                problems += [f"{name}: {p}" for p in report.validate(data)]
        elif name.endswith(".tar.gz"):
            try:
                with tarfile.open(f) as tar:
                    members = tar.getnames()
                for need in ("logs/install.log", "logs/smoke.log", "logs/tests.log"):
                    if need not in members:
                        problems.append(f"{name}: no {need}")
            except (tarfile.TarError, OSError) as exc:
                problems.append(f"{name}: unreadable ({exc})")
        elif name.endswith(".txt") and os.path.getsize(f) == 0:
            problems.append(f"{name}: empty")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("summary", "check", "merge"))
    p.add_argument("folder")
    p.add_argument("target", nargs="?", help="merge: the results file to write")
    p.add_argument("--expect", default="", help="comma list of files that must be there (check)")
    args = p.parse_args(argv)
    if args.what == "summary":
        print(summary(args.folder))
        return 0
    if args.what == "merge":
        sys.path.insert(0, ROOT)
        from ditfast.bench import report  # merge recomputes speedups with the runner's code

        names = [f for f in BENCH_FILES if os.path.isfile(os.path.join(args.folder, f))]
        if not names or not args.target:
            print(f"merge needs bench_*.json in {args.folder} and a target file", file=sys.stderr)
            return 2
        merged = report.merge([_load(os.path.join(args.folder, f)) for f in names], names)
        problems = report.validate(merged)
        if problems:
            print("merged results fail the schema:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
            return 1
        report.write_json(merged, args.target)
        print(f"{args.target}: {len(merged['results'])} cases from {', '.join(names)}")
        return 0
    problems = check(args.folder, [e for e in args.expect.split(",") if e])
    files = sorted(os.listdir(args.folder))
    if problems:
        print("output check FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    size = max((os.path.getsize(os.path.join(args.folder, f)) for f in files), default=0)
    print(f"output check passed: {len(files)} files (<= {MAX_FILES}), largest {size / 1024:.0f} KB, schemas valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
