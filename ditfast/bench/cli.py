"""Command line of ``python -m ditfast.bench``.

  python -m ditfast.bench                      # every level; real shapes on a GPU, the CPU smoke otherwise
  python -m ditfast.bench --quick              # a short smoke (the target shapes only)
  python -m ditfast.bench --levels ops,attention --no-compile --time-limit 60 --json out/bench_ops.json
  python -m ditfast.bench --summary benchmarks/results/h200/   # re-print the newest run's summary
  python -m ditfast.bench ledger               # bytes / FLOPs / calls per op of full-size model steps,
                                               # counted under FakeTensorMode (no GPU needed); see ledger.py
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import List, Optional

from . import cases as C

DEADLINE_ENV = "DITFAST_BENCH_DEADLINE"  # epoch seconds after which no new measurement starts

EPILOG = """how to read the table:
  ms         median time of one call (triton.testing.do_bench on a GPU; wall clock in the CPU smoke)
  GB/s       bytes that must move / time (memory-bound ops); TFLOP/s for attention, blocks, models
  %pk        that rate as a % of the peak measured in the same run (copy bandwidth / matmul)
  f+b        forward + backward; fwd alone runs under no_grad (inference)
  graph ms   forward replayed from a CUDA graph (launch-bound shapes only)
  MiB f+b    peak CUDA memory of a forward + backward above its inputs
  compile    seconds of the first call of a torch.compile variant (compilation), fwd/fwd+bwd
  ditfast x  this variant's time / ditfast's time, fwd/fwd+bwd (above 1: ditfast is faster)
  ditfast    the automatic backend; ditfast:<name> forces one backend
"""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ditfast.bench", description="ditfast benchmark suite", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="all", help=f"comma list of {','.join(C.LEVELS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="the target shapes only, shorter timings")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--out", default=None, help="folder for the JSON and the PNG (default: benchmarks/results/<device>/ "
                                               "in a checkout, else ./ditfast-bench-results/<device>/)")
    p.add_argument("--json", default=None, help="exact path of the results JSON (the PNG goes beside it)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no measurement after this long; what is left is recorded as skipped "
                        f"(${DEADLINE_ENV}, epoch seconds, is an absolute form)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    p.add_argument("--compile", action="store_true", help="run the torch.compile peers even in a CPU --quick smoke")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph column")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--backends", default="all", help="forced ditfast backends to measure: all, none, or a comma list")
    p.add_argument("--filter", default=None, help="only cases whose level/name/label contains this text")
    p.add_argument("--sm90-report", default=None, metavar="JSON",
                   help="offline sm_90 compile report (default: $DITFAST_SM90_REPORT or benchmarks/sm90_report.json)")
    p.add_argument("--summary", default=None, metavar="JSON_OR_DIR",
                   help="print the summary of an existing results file (the newest in a folder) and exit")
    p.add_argument("--plot", action="store_true", help="with --summary: (re)draw that file's PNG beside it")
    p.add_argument("--resume", action="store_true",
                   help="continue the results file --json names (after a lost CUDA context: its complete cases are "
                        "kept); $DITFAST_GPU_RUN_EXCLUDE names backends to leave out")
    args = p.parse_args(argv)
    if args.levels == "all":
        args.levels = C.LEVELS
    else:
        args.levels = tuple(x.strip() for x in args.levels.split(",") if x.strip())
        bad = [lv for lv in args.levels if lv not in C.LEVELS]
        if bad:
            p.error(f"unknown level(s) {bad}; choose from {C.LEVELS}")
    if args.compile and args.no_compile:
        p.error("--compile and --no-compile exclude each other")
    return args


def newest_json(path: str) -> str:
    if not os.path.isdir(path):
        return path
    files = glob.glob(os.path.join(path, "**", "bench_*.json"), recursive=True)
    if not files:
        raise SystemExit(f"no bench_*.json under {path}")
    return max(files, key=os.path.getmtime)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ledger"]:  # a subcommand of its own: it counts, it does not time
        from . import ledger

        return ledger.main(argv[1:])
    args = parse_args(argv)
    from . import report

    if args.summary:
        path = newest_json(args.summary)
        results = report.load_json(path)
        print(report.banner(results) + "\n\n" + report.summary_table(results))
        if args.plot:
            print(report.make_plot(results, os.path.splitext(path)[0] + ".png"))
        return 0
    import torch

    from . import runner, timing

    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.json:
        out_json = args.json
    else:
        sub = timing.slug(torch.cuda.get_device_name()) if on_cuda else "cpu-smoke"
        base = os.path.join("benchmarks", "results")
        out_dir = args.out or os.path.join(base if os.path.isdir(base) else "ditfast-bench-results", sub)
        stamp = timing.utc_now().replace(":", "").replace("-", "")
        out_json = os.path.join(out_dir, f"bench_{stamp}_{timing.git_commit()[0][:7]}.json")
    if not on_cuda:
        print(report.SMOKE_NOTE, file=sys.stderr)
    time_limit = args.time_limit
    if os.environ.get(DEADLINE_ENV):  # an absolute deadline (gpu_run.sh): counts this process's start-up too
        left = max(0.0, float(os.environ[DEADLINE_ENV]) - time.time())
        time_limit = left if time_limit is None else min(time_limit, left)
    resume = None
    if args.resume and os.path.isfile(out_json):
        try:
            resume = report.load_json(out_json)
        except (OSError, ValueError):
            resume = None
    backends = None if args.backends == "all" else [b for b in args.backends.split(",") if b and b != "none"]
    opts = runner.Options(levels=args.levels, device=args.device, dtype=args.dtype, quick=args.quick,
                          compile=False if args.no_compile else (True if args.compile else None), graph=not args.no_graph,
                          backends=backends, filter=args.filter, time_limit=time_limit,
                          argv=list(sys.argv[1:] if argv is None else argv), resume=resume)
    results = runner.run(opts, out_json=out_json)
    print(report.render_table(results, report.load_sm90(args.sm90_report)) + "\n")
    if not args.no_plots:
        print(report.make_plot(results, os.path.splitext(out_json)[0] + ".png"))
    print(f"results: {out_json}")
    problems = report.validate(report.load_json(out_json))
    if problems:
        print("results JSON failed its schema check:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
        return 1
    lost = results["meta"].get("aborted")
    if lost:
        print(f"CUDA context lost at {lost['case']} / {lost['variant']} ({lost['error']}); rerun in a fresh process: "
              f"--resume with DITFAST_GPU_RUN_EXCLUDE={lost['op']}:{lost['backend']}", file=sys.stderr)
        return runner.EXIT_CONTEXT_LOST
    return 0
