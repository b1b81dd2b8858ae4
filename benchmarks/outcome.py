"""What a GPU run returned: its summary table, and the checks of its output folder.

    python benchmarks/outcome.py summary DIR      # the full report gpu_run.sh writes to summary.txt
    python benchmarks/outcome.py digest DIR       # the short per-tier digest it prints last
    python benchmarks/outcome.py check OUT_DIR [--expect a.json,b.json] [--tiers 1,2,...]
    python benchmarks/outcome.py merge OUT_DIR RESULT.json   # the bench tiers as one file
    python benchmarks/outcome.py file OUT_DIR [OUT_DIR2 ...]  # file a run under benchmarks/results/<gpu>/
    python benchmarks/outcome.py tree-hash ROOT [--manifest FILE]   # the hash of the files that run

``check`` enforces what the GPU machine sends back (docs/gpu-run.md): at most 8 plain files, each at most
16 MB, at most two folders deep, plain names, no temporary file left behind; every JSON valid against
its schema (smoke.json: benchmarks/smoke.py; bench_*.json: ditfast.bench.report), the log archive
readable. The CPU rehearsal (gpu_run.sh --rehearse) runs it on its own output.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
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
TIER_NAMES = {1: "install", 2: "smoke", 3: "tests", 4: "ops", 5: "blocks", 6: "peers"}
TIER_FILES = {2: "smoke.json", 4: "bench_ops.json", 5: "bench_blocks.json", 6: "bench_peers.json"}
TIER_LOGS = {1: "logs/install.log", 2: "logs/smoke.log", 3: "logs/tests.log"}


# ------------------------------------------------------------------------------------------- provenance
TREE_DIRS = ("ditfast", "csrc", "benchmarks", "tests", "scripts")
TREE_FILES = ("setup.py", "pyproject.toml", "MANIFEST.in")
TREE_SKIP = re.compile(r"(^|/)(__pycache__|results)(/|$)|\.(pyc|so|o)$|(^|/)_build_info\.py$|(^|/)sm90_report\.json$")


def tree_files(root: str) -> List[str]:
    """The files a GPU run executes or builds from, relative to ``root``, sorted (git-ignored build
    outputs, caches and committed results left out)."""
    out = [f for f in TREE_FILES if os.path.isfile(os.path.join(root, f))]
    for top in TREE_DIRS:
        for d, dirs, names in os.walk(os.path.join(root, top)):
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            for n in names:
                rel = os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
                if not TREE_SKIP.search(rel) and not n.startswith("."):
                    out.append(rel)
    return sorted(out)


def tree_hash(root: str):
    """(hash, [(path, sha256)]): one hash of the files that run, the same here and on the GPU machine."""
    rows = []
    for rel in tree_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            rows.append((rel, hashlib.sha256(f.read()).hexdigest()))
    h = hashlib.sha256("".join(f"{sha}  {rel}\n" for rel, sha in rows).encode()).hexdigest()[:16]
    return h, rows


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200', 'NVIDIA A100-SXM4-80GB' -> 'a100'
    (the folder of a device's results); other names: their lower-case slug."""
    low = re.sub(r"^nvidia\s+", "", str(name).strip().lower())
    m = re.match(r"(?:geforce\s+|tesla\s+)?([a-z]{1,3}\d{2,4}[a-z]?)\b", low)
    return m.group(1) if m else (re.sub(r"[^a-z0-9]+", "-", low).strip("-") or "device")


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


# ------------------------------------------------------------------------------------------- digest
def _tiers_tsv(folder: str) -> dict:
    """{tier: {name, status, rc, start_s, end_s, note}} from gpu_run.sh's logs/tiers.tsv."""
    out = {}
    try:
        with open(os.path.join(folder, "logs", "tiers.tsv")) as f:
            head = f.readline().rstrip("\n").split("\t")
            for line in f:
                rec = dict(zip(head, line.rstrip("\n").split("\t")))
                if rec.get("tier", "").isdigit():
                    out[int(rec["tier"])] = rec
    except OSError:
        pass
    return out


def _junit_counts(path: str):
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    a = suite.attrib
    failed = [f"{c.get('classname', '').split('.')[-1]}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    skips = [c.find("skipped") for c in suite.iter("testcase")]
    capped = sum(1 for sk in skips if sk is not None and "time cap" in (sk.get("message") or "") + (sk.text or ""))
    return {k: int(a.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"failed": failed, "capped": capped,
                                                                                      "time": float(a.get("time", 0))}


def _bench_digest(res: dict) -> List[str]:
    cases = res.get("results", [])
    n_ok = sum(1 for c in cases if any(v["name"] == "ditfast" and v["status"] == "ok" for v in c["variants"]))
    cut = sum(1 for c in cases if not c["variants"] or all("time limit" in str(v.get("reason")) for v in c["variants"]))
    errs = [f"{c['case']}[{c['label']}]/{v['name']}: {str(v['reason'])[:90]}" for c in cases for v in c["variants"]
            if v["status"] == "error"]
    met = [t for t in res.get("targets", []) if t.get("met") is not None]
    lines = [f"{len(cases)} cases, ditfast measured in {n_ok}, {cut} cut by the time limit, {len(errs)} variant errors; "
             f"targets {sum(t['met'] for t in met)} met / {sum(not t['met'] for t in met)} not met"]
    lines += [f"  error {e}" for e in errs[:4]] + ([f"  ... {len(errs) - 4} more errors"] if len(errs) > 4 else [])
    lost = (res.get("meta") or {}).get("aborted")
    if lost:
        lines.append(f"  CUDA context lost at {lost.get('op')}/{lost.get('backend')}/{lost.get('shape')}")
    return lines


def digest(folder: str, tiers, *, budget=None, elapsed=None, slices=None, rehearse=False) -> str:
    """The run in a few lines per tier (printed last by gpu_run.sh, so it survives a truncated log): what
    ran, what failed, the culprits of lost CUDA contexts, and the command that reruns what failed."""
    tsv = _tiers_tsv(folder)
    sm = _load(os.path.join(folder, "smoke.json"))
    meta = (sm or {}).get("meta") or next((b["meta"] for b in (_load(os.path.join(folder, f)) for f in BENCH_FILES) if b), {})
    tree = ""
    try:
        with open(os.path.join(folder, "logs", "manifest.txt")) as f:
            tree = f.readline().split(":")[0].replace("tree ", "")
    except OSError:
        pass
    dev = (meta.get("device") or {}).get("name", "?")
    v = meta.get("versions") or {}
    out = [f"DIGEST {'(CPU rehearsal) ' if rehearse else ''}{dev} | torch {v.get('torch')} | triton {v.get('triton')} | "
           f"commit {str(meta.get('commit'))[:12]} | files {tree or '?'} | {meta.get('date')} | "
           f"{elapsed or 0:.0f} s of {budget or 0:.0f} s"]
    rerun = []
    for t in sorted(tiers):
        rec = tsv.get(t)
        name = TIER_NAMES[t]
        if rec is None:
            out.append(f"tier {t} {name}: NOT REACHED")
            rerun.append(t)
            continue
        took = float(rec.get("end_s") or 0) - float(rec.get("start_s") or 0)
        st = rec.get("status", "?")
        out.append(f"tier {t} {name}: {st.upper() if st != 'ok' else 'ok'} in {took:.0f} s" + (f" ({rec['note']})" if rec.get("note") else ""))
        if st in ("failed", "stopped"):
            rerun.append(t)
        if t == 2 and sm:
            c = sm["summary"].get("counts", {})
            out.append(f"  {c.get('ok', 0)} ok, {c.get('fail', 0)} fail, {c.get('error', 0)} error, {c.get('skipped', 0)} skipped "
                       f"in {sm['summary'].get('elapsed_s', 0):.0f} s")
            bad = [r for r in sm["rows"] if r["status"] in ("fail", "error")]
            out += [f"  {r['status']} {r['op']}/{r['backend']}/{r['shape']}: {str(r.get('reason'))[:100]}" for r in bad[:6]]
            if len(bad) > 6:
                out.append(f"  ... {len(bad) - 6} more (summary.txt)")
            for a in sm.get("aborted_runs", []) + ([sm["aborted"]] if sm.get("aborted") else []):
                out.append(f"  CUDA context lost at {a.get('op')}/{a.get('backend')}/{a.get('shape')}: {str(a.get('error'))[:100]}")
        if t == 3:
            for xml in ("tests.xml", "tests_rerun.xml"):
                j = _junit_counts(os.path.join(folder, "logs", xml))
                if j:
                    out.append(f"  {xml}: {j['tests']} tests, {j['failures']} failed, {j['errors']} errors, {j['skipped']} skipped "
                               f"({j['capped']} by the time cap) in {j['time']:.0f} s")
                    out += [f"  FAILED {n}" for n in j["failed"][:6]] + ([f"  ... {len(j['failed']) - 6} more"] if len(j["failed"]) > 6 else [])
        if t in (4, 5, 6):
            res = _load(os.path.join(folder, TIER_FILES[t]))
            out += ["  " + x.lstrip() if not x.startswith("  ") else x for x in _bench_digest(res)] if res else ["  no results file"]
    try:
        with open(os.path.join(folder, "logs", "excluded.txt")) as f:
            excl = sorted({ln.strip() for ln in f if ln.strip()})
    except OSError:
        excl = []
    if excl:
        out.append(f"excluded after a lost CUDA context: {', '.join(excl)}")
    if rerun:
        secs = sum(slices[t - 1] for t in rerun) + slices[6] if slices and len(slices) >= 7 else None
        env = f"DITFAST_GPU_RUN_EXCLUDE={','.join(excl)} " if excl else ""
        out.append(f"RERUN what failed: {env}bash benchmarks/gpu_run.sh {'--rehearse ' if rehearse else ''}--tiers "
                   f"{','.join(map(str, ([1] if 1 not in rerun and not rehearse else []) + rerun))}"
                   + (f" --seconds {secs + (0 if 1 in rerun or rehearse else slices[0])}" if secs else "") + " OUT2"
                   + ("   (tier 1 rebuilds the extension on a fresh machine; drop it on the same warm one)" if not rehearse else ""))
    else:
        out.append("every selected tier passed: nothing to rerun")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- filing
def file_run(folders: List[str], results_root: str, *, allow_unknown: bool = False) -> int:
    """Files a GPU run (and its reruns, later folders winning file by file) under results_root/<gpu>/, the
    gpu, date and commit read from the results themselves (never typed in)."""
    pick = {}
    for d in folders:
        for name in ("smoke.json", "backend_table.json", "summary.txt", "logs.tar.gz") + BENCH_FILES:
            if os.path.isfile(os.path.join(d, name)):
                pick[name] = os.path.join(d, name)
    metas = [(_load(pick[n]) or {}).get("meta") for n in ("smoke.json",) + BENCH_FILES if n in pick]
    metas = [m for m in metas if m]
    if not metas:
        print(f"no smoke.json or bench_*.json in {', '.join(folders)}", file=sys.stderr)
        return 2
    meta = metas[0]
    if any(m.get("mode") != "gpu" for m in metas):
        print("refused: these are CPU results (mode cpu-smoke), not a GPU run", file=sys.stderr)
        return 2
    commits = {str(m.get("commit")) for m in metas}
    commit = commits.pop() if len(commits) == 1 else None
    if commit is None:
        print(f"refused: the files come from different commits {sorted(commits | {commit})}", file=sys.stderr)
        return 2
    if (commit in ("unknown", "None") or commit.endswith("+modified") or any(m.get("dirty") for m in metas)) and not allow_unknown:
        print(f"refused: the run's commit is {commit!r} (dirty or unknown); --allow-unknown-commit files it anyway",
              file=sys.stderr)
        return 2
    slug = device_slug(meta["device"]["name"])
    stamp = re.sub(r"[-:]", "", str(meta["date"]))
    tag = f"{stamp}_{commit[:7]}"
    dest = os.path.join(results_root, slug)
    os.makedirs(dest, exist_ok=True)
    written = []
    benches = [n for n in BENCH_FILES if n in pick]
    if benches:
        sys.path.insert(0, ROOT)
        from ditfast.bench import report  # the merge recomputes speedups with the runner's code

        merged = report.merge([_load(pick[n]) for n in benches], benches)
        target = os.path.join(dest, f"bench_{tag}.json")
        report.write_json(merged, target)
        written.append(target)
    for name, stem in (("smoke.json", "smoke"), ("backend_table.json", "backend_table"), ("summary.txt", "summary")):
        if name in pick:
            target = os.path.join(dest, f"{stem}_{tag}{os.path.splitext(name)[1]}")
            shutil.copyfile(pick[name], target)
            written.append(target)
    print(f"filed the {meta['device']['name']} run of commit {commit[:12]} ({meta['date']}) under {dest}:")
    print("\n".join("  " + w for w in written))
    b = os.path.join(dest, f"bench_{tag}.json")
    print("next:\n  python -m ditfast.bench --summary " + dest + " --plot\n  python scripts/render_readme_table.py\n"
          + (f"  python scripts/backend_table.py {b}\n" if benches else "") + "  git add " + dest + " README.md")
    return 0


def check(folder: str, expect: List[str], tiers=None) -> List[str]:
    """Problems with what the machine would send back from ``folder`` (empty: fine); the log archive must
    hold the logs of the tiers 1-3 that ran (``tiers``; default all)."""
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
                for t, need in TIER_LOGS.items():
                    if (tiers is None or t in tiers) and need not in members:
                        problems.append(f"{name}: no {need}")
            except (tarfile.TarError, OSError) as exc:
                problems.append(f"{name}: unreadable ({exc})")
        elif name.endswith(".txt") and os.path.getsize(f) == 0:
            problems.append(f"{name}: empty")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("summary", "digest", "check", "merge", "file", "tree-hash"))
    p.add_argument("folder")
    p.add_argument("target", nargs="*", help="merge: the results file to write; file: later output folders (reruns)")
    p.add_argument("--expect", default="", help="comma list of files that must be there (check)")
    p.add_argument("--tiers", default="1,2,3,4,5,6", help="the tiers that ran (check, digest)")
    p.add_argument("--budget", type=float, default=None, help="digest: the run's budget in seconds")
    p.add_argument("--elapsed", type=float, default=None, help="digest: seconds the run took")
    p.add_argument("--slices", default=None, help="digest: the seconds of each tier's slice, space separated")
    p.add_argument("--rehearse", action="store_true", help="digest: the run was a CPU rehearsal")
    p.add_argument("--manifest", default=None, help="tree-hash: also write the per-file hashes here")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"), help="file: the results folder")
    p.add_argument("--allow-unknown-commit", action="store_true", help="file: accept a run without its commit")
    args = p.parse_args(argv)
    tiers = {int(t) for t in args.tiers.split(",") if t.strip()}
    if args.what == "summary":
        print(summary(args.folder))
        return 0
    if args.what == "digest":
        slices = [int(x) for x in args.slices.split()] if args.slices else None
        print(digest(args.folder, tiers, budget=args.budget, elapsed=args.elapsed, slices=slices, rehearse=args.rehearse))
        return 0
    if args.what == "tree-hash":
        h, rows = tree_hash(args.folder)
        if args.manifest:
            with open(args.manifest, "w") as f:
                f.write(f"tree {h}: sha256 of these {len(rows)} files (benchmarks/outcome.py tree-hash)\n")
                f.writelines(f"{sha}  {rel}\n" for rel, sha in rows)
        print(h)
        return 0
    if args.what == "file":
        return file_run([args.folder] + list(args.target), args.results, allow_unknown=args.allow_unknown_commit)
    if args.what == "merge":
        sys.path.insert(0, ROOT)
        from ditfast.bench import report  # merge recomputes speedups with the runner's code

        names = [f for f in BENCH_FILES if os.path.isfile(os.path.join(args.folder, f))]
        if not names or len(args.target) != 1:
            print(f"merge needs bench_*.json in {args.folder} and a target file", file=sys.stderr)
            return 2
        merged = report.merge([_load(os.path.join(args.folder, f)) for f in names], names)
        problems = report.validate(merged)
        if problems:
            print("merged results fail the schema:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
            return 1
        report.write_json(merged, args.target[0])
        print(f"{args.target[0]}: {len(merged['results'])} cases from {', '.join(names)}")
        return 0
    problems = check(args.folder, [e for e in args.expect.split(",") if e], tiers)
    files = sorted(os.listdir(args.folder))
    if problems:
        print("output check FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    size = max((os.path.getsize(os.path.join(args.folder, f)) for f in files), default=0)
    print(f"output check passed: {len(files)} files (<= {MAX_FILES}), largest {size / 1024:.0f} KB, schemas valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
