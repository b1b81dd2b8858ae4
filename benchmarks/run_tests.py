"""pytest with a time cap that still ends in pytest's own summary (gpu_run.sh, tier 3).

    python benchmarks/run_tests.py SECONDS [--hard SECONDS] [--only FILE] [pytest arguments]

After SECONDS no new test starts. The cap is enforced in the process that runs the tests -- every
pytest-xdist worker included -- by tests/conftest.py, which reads the deadline this script exports
(DITFAST_TEST_DEADLINE, epoch seconds): each test not started by then is skipped at once, so the
workers' queues drain in milliseconds and pytest ends normally, with its summary, failure list and
JUnit XML. (A stop flag on the xdist controller does not do that: it waits while every worker finishes
its queue.) ``--hard`` (default SECONDS + 15) is when a test still running is failed by the conftest's
alarm. SIGINT is restored to raise KeyboardInterrupt even where the shell started this process with it
ignored, so an outer ``timeout -s INT`` still yields a summary.

``--only FILE`` runs just the test ids listed in FILE (one per line): the tests a dead CUDA context
skipped (tests/conftest.py lists them in $DITFAST_TEST_CULPRITS, and ``lost FILE OUT`` extracts them),
rerun in a fresh process.
"""
import json
import os
import signal
import sys
import time

import pytest


class TimeCap:
    """In-process runs (no xdist) also set pytest's stop flag after the deadline: nothing is left to skip."""

    def __init__(self, deadline: float, seconds: float, only=None):
        self.deadline = deadline
        self.session = None
        self.only = only
        self.reason = f"time cap of {seconds:.0f} s reached: no further test started"

    def pytest_sessionstart(self, session):
        self.session = session

    def pytest_collection_modifyitems(self, config, items):
        if self.only is None:
            return
        keep = [it for it in items if it.nodeid in self.only]
        config.hook.pytest_deselected(items=[it for it in items if it.nodeid not in self.only])
        items[:] = keep

    def pytest_runtest_logreport(self, report):
        if report.when != "teardown" or time.time() < self.deadline or self.session is None:
            return
        if self.session.config.pluginmanager.getplugin("dsession") is None and not self.session.shouldstop:
            self.session.shouldstop = self.reason


def lost_tests(culprits_file: str):
    """(culprits [(nodeid, error)], lost test ids) recorded by tests/conftest.py in ``culprits_file``."""
    culprits, lost = [], []
    try:
        with open(culprits_file) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "culprit" in rec:
                    culprits.append((rec["culprit"], rec.get("error")))
                elif "lost" in rec:
                    lost.append(rec["lost"])
    except OSError:
        pass
    return culprits, list(dict.fromkeys(lost))


def main(argv) -> int:
    if argv and argv[0] == "lost":  # run_tests.py lost CULPRITS_FILE OUT_FILE: the lost ids, one a line
        culprits, lost = lost_tests(argv[1])
        with open(argv[2], "w") as f:
            f.write("".join(t + "\n" for t in lost))
        for c, err in culprits:
            print(f"CUDA context lost after {c}: {err}")
        print(f"{len(lost)} tests skipped for a lost CUDA context")
        return 0
    seconds, argv = float(argv[0]), list(argv[1:])
    hard, only = seconds + 15, None
    while argv and argv[0] in ("--hard", "--only"):
        if argv[0] == "--hard":
            hard = float(argv[1])
        else:
            with open(argv[1]) as f:
                only = {ln.strip() for ln in f if ln.strip()}
        argv = argv[2:]
    now = time.time()
    os.environ["DITFAST_TEST_DEADLINE"] = str(now + seconds)  # inherited by the xdist workers
    os.environ["DITFAST_TEST_HARD_DEADLINE"] = str(now + hard)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return pytest.main(argv, plugins=[TimeCap(now + seconds, seconds, only)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
