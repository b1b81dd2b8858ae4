"""Run a function on N local processes joined in a torch.distributed process group (gloo on CPU).

For tests of ditfast under DTensor / tensor parallel / DDP / FSDP2 without GPUs or a launcher:

    with Ranks(2) as ranks:
        results = ranks.run(my_module.check_something, arg)   # one result per rank, rank order

The processes are started once (``spawn``), join a gloo group on a free local port, and then run
each submitted function in turn, so a test file pays the start-up (python + torch import) once,
not per test. ``fn`` must be importable by name from the child processes (a module-level function);
arguments and results are pickled. A failure on any rank raises :class:`RankError` with that
rank's traceback, and the processes are torn down (the next ``run`` starts fresh ones), because
a rank that raised mid-collective leaves the others waiting in it.
"""
from __future__ import annotations

import os
import queue
import socket
import traceback
from typing import Any, Callable, List, Optional

import torch.multiprocessing as mp

__all__ = ["Ranks", "RankError", "free_port"]

_TIMEOUT_S = float(os.environ.get("DITFAST_RANKS_TIMEOUT", "300"))  # per submitted function


class RankError(RuntimeError):
    """A function submitted to :class:`Ranks` raised (or timed out) on some rank."""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks, results, threads: int) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=_TIMEOUT_S),
        )
        results.put((rank, "ready", None))
    except Exception:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            torch.manual_seed(0)
            out = fn(*args, **kwargs)
            results.put((rank, "ok", out))
        except Exception:  # noqa: BLE001 - reported to the parent
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class Ranks:
    """``world`` CPU processes in one gloo process group that run submitted functions (see module doc)."""

    def __init__(self, world: int = 2, *, threads: int = 1):
        self.world = world
        self.threads = threads
        self._procs: List[Any] = []
        self._tasks: List[Any] = []
        self._results: Optional[Any] = None

    # -- lifetime ----------------------------------------------------------------------------------
    def start(self) -> "Ranks":
        if self._procs:
            return self
        ctx = mp.get_context("spawn")
        port = free_port()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world)]
        self._procs = [
            ctx.Process(target=_worker, args=(r, self.world, port, self._tasks[r], self._results, self.threads),
                        daemon=True)
            for r in range(self.world)
        ]
        for p in self._procs:
            p.start()
        self._collect("ready")
        return self

    def close(self, *, kill: bool = False) -> None:
        for q, p in zip(self._tasks, self._procs):
            if not kill and p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=None if not kill else 1)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs, self._tasks, self._results = [], [], None

    def __enter__(self) -> "Ranks":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- work --------------------------------------------------------------------------------------
    def _collect(self, expect: str) -> list:
        out: list = [None] * self.world
        errors = []
        for _ in range(self.world):
            try:
                rank, status, value = self._results.get(timeout=_TIMEOUT_S)
            except queue.Empty:
                errors.append(f"no answer within {_TIMEOUT_S:.0f} s (a rank hung, or died: "
                              f"exit codes {[p.exitcode for p in self._procs]})")
                break
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                break  # the other ranks may be stuck in a collective: do not wait for them
            out[rank] = value
        if errors:
            self.close(kill=True)
            raise RankError("\n".join(errors))
        return out

    def run(self, fn: Callable, *args, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank (inside the process group); the results in rank order."""
        self.start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect("ok")
