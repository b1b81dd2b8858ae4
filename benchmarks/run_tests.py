"""pytest with a time cap that still ends in pytest's own summary (gpu_run.sh, tier 3).

    python benchmarks/run_tests.py SECONDS [pytest arguments]

After SECONDS no new test starts: the plugin below sets pytest's stop flag (or, under pytest-xdist, the
controller's), so the run ends like ``--maxfail`` does -- summary, failure list, JUnit XML. SIGINT is
restored to raise KeyboardInterrupt even where the shell started this process with it ignored, so the
hard cap of ``timeout -s INT`` (a single test running past the cap) still yields a summary.
"""
import signal
import sys
import time

import pytest


class TimeCap:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.session = None
        self.reason = f"time cap of {seconds:.0f} s reached: no further test started"

    def pytest_sessionstart(self, session):
        self.session = session

    def pytest_runtest_logreport(self, report):  # on the controller under xdist, in-process otherwise
        if report.when != "teardown" or time.monotonic() < self.deadline or self.session is None:
            return
        dsession = self.session.config.pluginmanager.getplugin("dsession")
        if dsession is not None:
            if not dsession.shouldstop:
                dsession.shouldstop = self.reason
        elif not self.session.shouldstop:
            self.session.shouldstop = self.reason


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(pytest.main(sys.argv[2:], plugins=[TimeCap(float(sys.argv[1]))]))
