"""Killable scoring workers: a per-call deadline that holds even when a checker hangs in C code.

math-verify's own timeout is `signal.alarm` (main thread only, cannot interrupt long C-level work) and sympy can
hang or eat memory on power towers and huge factorials. So each call runs in a worker process (spawned, never
forked from a threaded trainer), with an address-space limit set by the worker on itself; the parent waits with a
deadline and, past it, kills that worker and starts a fresh one. The caller gets an `Outcome` per call: a value,
an error, or a timeout, kept apart from each other.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any


@dataclass
class Outcome:
    value: Any = None
    error: str | None = None
    timed_out: bool = False


def _worker(conn: Connection, memory_mb: int) -> None:
    import resource

    if memory_mb:
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ["OMP_NUM_THREADS"] = "1"
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        fn, args, kwargs = job
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - includes math-verify's TimeoutException (a BaseException)
            try:
                conn.send(("err", f"{type(e).__name__}: {str(e)[:300]}"))
            except BaseException:  # noqa: BLE001 - an unpicklable or oversized result
                return


class WorkerPool:
    def __init__(self, workers: int = 2, memory_mb: int = 2048):
        self.n = max(1, workers)
        self.memory_mb = memory_mb
        self.ctx = mp.get_context("spawn")
        self.procs: list[tuple[Any, Connection] | None] = [None] * self.n

    def _start(self, i: int) -> tuple[Any, Connection]:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker, args=(child, self.memory_mb), daemon=True, name=f"grpo-scorer-{i}")
        p.start()
        child.close()
        self.procs[i] = (p, parent)
        return self.procs[i]

    def _kill(self, i: int) -> None:
        slot = self.procs[i]
        if slot is not None:
            p, conn = slot
            p.kill()
            p.join(timeout=5)
            conn.close()
            self.procs[i] = None

    def map(self, fn: Callable, calls: list[tuple[tuple, dict]], timeout: float) -> list[Outcome]:
        """Run fn(*args, **kwargs) for every call, at most `timeout` seconds each, `workers` at a time."""
        out: list[Outcome | None] = [None] * len(calls)
        todo = list(range(len(calls)))[::-1]
        busy: dict[int, tuple[int, float]] = {}  # worker -> (call index, deadline)
        while todo or busy:
            for w in range(self.n):
                if w not in busy and todo:
                    i = todo.pop()
                    p, conn = self.procs[w] if self.procs[w] is not None and self.procs[w][0].is_alive() \
                        else self._start(w)
                    try:
                        conn.send((fn, calls[i][0], calls[i][1]))
                        busy[w] = (i, time.monotonic() + timeout)
                    except (BrokenPipeError, OSError) as e:
                        out[i] = Outcome(error=f"worker unavailable: {e}")
                        self._kill(w)
            if not busy:
                continue
            now = time.monotonic()
            nearest = min(d for _, d in busy.values())
            conns = {self.procs[w][1]: w for w in busy}
            ready = wait(list(conns), timeout=max(0.0, nearest - now))
            for c in ready:
                w = conns[c]
                i, _ = busy.pop(w)
                try:
                    kind, val = c.recv()
                    out[i] = Outcome(value=val) if kind == "ok" else Outcome(error=val)
                except (EOFError, OSError):
                    out[i] = Outcome(error="scorer process died (memory limit or crash)")
                    self._kill(w)
            now = time.monotonic()
            for w, (i, deadline) in list(busy.items()):
                if now >= deadline:
                    busy.pop(w)
                    out[i] = Outcome(timed_out=True, error=f"timed out after {timeout:g}s")
                    self._kill(w)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        for i, slot in enumerate(self.procs):
            if slot is not None:
                p, conn = slot
                try:
                    conn.send(None)
                except OSError:
                    pass
                p.join(timeout=2)
                if p.is_alive():
                    p.kill()
                conn.close()
                self.procs[i] = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
