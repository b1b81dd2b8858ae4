"""Command line of ``python -m ditfast.bench``.

Examples:
  python -m ditfast.bench                      # everything; real shapes on a GPU, the CPU smoke otherwise
  python -m ditfast.bench --quick              # a short smoke (under a minute on CPU)
  python -m ditfast.bench --levels ops,attention --time-limit 300 --out results/
  python -m ditfast.bench --summary benchmarks/results/h100-80gb-hbm3/   # re-print a run's summary
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import List, Optional

from . import cases as C

EPILOG = """how to read the table:
  ms         median time of one call (CUDA events on a GPU; wall clock in the CPU smoke)
  GB/s       bytes that must move / time (memory-bound ops); TFLOP/s for attention, blocks, models
  %pk        that rate as a % of the peak measured in the same run (copy bandwidth / matmul)
  f+b        forward + backward; fwd alone runs under no_grad (inference)
  graph ms   forward replayed from a CUDA graph (launch-bound shapes only)
  MiB        peak CUDA memory of one call above its inputs
  compile    seconds of the first call of a torch.compile variant (compilation), fwd/fwd+bwd
  ditfast x  this variant's time / ditfast's time, fwd/fwd+bwd (above 1: ditfast is faster)
  ditfast    the default, automatic backend; ditfast:<name> forces one backend
"""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ditfast.bench", description="ditfast benchmark suite",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="all", help=f"comma list of {','.join(C.LEVELS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke mode: fewer cases and repetitions")
    p.add_argument("--full", action="store_true", help="more shapes, and full-depth models on a GPU")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--dtype", default=None, choices=sorted({"bf16", "fp16", "fp32"}),
                   help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--tiny", action="store_true", help="tiny smoke shapes even on a GPU")
    p.add_argument("--out", default=None, help="folder for the JSON and PNGs (default: benchmarks/results/<device>/ "
                                               "in a checkout, else ./ditfast-bench-results/<device>/)")
    p.add_argument("--json", default=None, help="exact path of the results JSON (overrides the name in --out)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop starting new measurements after this long; the rest is recorded as skipped")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    p.add_argument("--compile", action="store_true", help="run the torch.compile peers even in a CPU --quick smoke")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph column")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--backends", default="all",
                   help="forced ditfast backends to measure as extra columns: all, none, or a comma list")
    p.add_argument("--filter", default=None, help="only cases whose level/name/label contains this text")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--max-reps", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="time per measurement that sets the number of repetitions")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 in the CPU smoke)")
    p.add_argument("--summary", default=None, metavar="JSON_OR_DIR",
                   help="print the summary of an existing results file (newest in a folder) and exit")
    p.add_argument("--table", action="store_true", help="with --summary: print the full table too")
    args = p.parse_args(argv)
    if args.levels == "all":
        args.levels = C.LEVELS
    else:
        levels = tuple(x.strip() for x in args.levels.split(",") if x.strip())
        bad = [lv for lv in levels if lv not in C.LEVELS]
        if bad:
            p.error(f"unknown level(s) {bad}; choose from {C.LEVELS}")
        args.levels = levels
    if args.compile and args.no_compile:
        p.error("--compile and --no-compile exclude each other")
    return args


def newest_json(path: str) -> str:
    if os.path.isdir(path):
        files = glob.glob(os.path.join(path, "**", "*.json"), recursive=True)
        files = [f for f in files if os.path.basename(f).startswith("bench_")]
        if not files:
            raise SystemExit(f"no bench_*.json under {path}")
        return max(files, key=os.path.getmtime)
    return path


def default_out_dir(device_name: str, smoke: bool) -> str:
    from .env import slug

    sub = "cpu-smoke" if smoke else slug(device_name)
    if os.path.isdir(os.path.join("benchmarks", "results")):
        return os.path.join("benchmarks", "results", sub)
    return os.path.join("ditfast-bench-results", sub)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from . import report

    if args.summary:
        results = report.load_json(newest_json(args.summary))
        print(report.render_table(results) if args.table else report.banner(results) + "\n\n" +
              report.summary_table(results))
        return 0

    from . import runner
    from .env import git_commit, utc_now

    backends = None if args.backends == "all" else [b for b in args.backends.split(",") if b and b != "none"]
    opts = runner.Options(
        levels=args.levels, device=args.device, dtype=args.dtype, quick=args.quick, full=args.full,
        tiny=True if args.tiny else None, compile=False if args.no_compile else (True if args.compile else None),
        graph=not args.no_graph, backends=backends, filter=args.filter, time_limit=args.time_limit,
        warmup=args.warmup, max_reps=args.max_reps, budget_s=args.budget, threads=args.threads,
        argv=list(sys.argv[1:] if argv is None else argv),
    )
    import torch

    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.json:
        out_json = args.json
        out_dir = os.path.dirname(os.path.abspath(out_json))
    else:
        name = torch.cuda.get_device_name() if on_cuda else "cpu"
        out_dir = args.out or default_out_dir(name, smoke=not on_cuda)
        stamp = utc_now().replace(":", "").replace("-", "")
        commit = git_commit()[0]
        out_json = os.path.join(out_dir, f"bench_{stamp}_{commit[:7]}.json")
    if not on_cuda:
        print(report.SMOKE_NOTE, file=sys.stderr)
    results = runner.run(opts, out_json=out_json)
    print(report.render_table(results))
    print()
    if not args.no_plots:
        stem = os.path.splitext(os.path.basename(out_json))[0]
        from .plots import make_plots

        _, message = make_plots(results, out_dir, stem)
        print(message)
    print(f"results: {out_json}")
    problems = report.validate(report.load_json(out_json))
    if problems:
        print("results JSON failed its schema check:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
        return 1
    return 0
