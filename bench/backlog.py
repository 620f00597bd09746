"""Backlog: how many live handler tasks a large backlog becomes (issue 11, item 1).

A :class:`~microvm_blueprint.tangle.runner.BlueprintRunner` with its default ``max_concurrency`` and
``queue_size`` is fed :data:`CALLS` calls at once (all recorded in the inbox, then handed over as fast as
the runner takes them), each to a handler that sleeps :data:`JOB_SECONDS`; every call has its own
ordering key (no key function), as independent jobs do. Two passes per tree, each in a process of its
own:

* ``sampled``: every handler, on entry, counts the tasks named ``job:*`` in ``asyncio.all_tasks()``; the
  figure is the peak. Counting is O(live tasks) per job, so it slows a runner with thousands of tasks;
  hence the second pass.
* ``plain``: no counting: wall time from ``run()`` to the last call handled, jobs/s, and peak RSS.

``BENCH_BACKLOG_BEFORE=/path/to/other/src`` runs that tree's code too (e.g. the runner before the fix:
``git -C /work/main archive c4f5a54 src | tar -x -C /tmp/old`` and ``/tmp/old/src``), taking turns with
ours. Its handlers take ``(call)`` and its ``JobCall`` lives in ``tangle/producer.py``: the worker adapts
to either (``handler(call, *args)``), the source trees are not changed. ``BENCH_BACKLOG_CALLS`` and
``BENCH_BACKLOG_JOB_MS`` change the load.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .common import emit

CALLS = int(os.environ.get("BENCH_BACKLOG_CALLS", "6000"))
JOB_SECONDS = float(os.environ.get("BENCH_BACKLOG_JOB_MS", "50")) / 1000
DEADLINE = 900.0  # seconds a pass may take before it counts as stuck
ROOT = Path(__file__).resolve().parents[1]


async def _pass(sample: bool, calls: int, job_seconds: float) -> dict[str, Any]:
    """One pass in this process, over whichever ``microvm_blueprint`` is first on ``sys.path``."""
    from microvm_blueprint.tangle.consumer import TangleConsumer
    from microvm_blueprint.tangle.router import Router
    from microvm_blueprint.tangle.runner import BlueprintRunner
    from microvm_blueprint.tangle.state import Cursor, TangleState

    try:
        calls_module = importlib.import_module("microvm_blueprint.tangle.calls")
    except ImportError:  # before issue 11 item 9: the call type lived with the producer
        calls_module = importlib.import_module("microvm_blueprint.tangle.producer")
    job_call: Any = calls_module.JobCall

    peak = 0
    started: list[float] = []

    async def handler(call: Any, *args: Any) -> bytes:  # (call) before issue 11 item 9, (call, args) after
        nonlocal peak
        if not started:
            started.append(time.monotonic())
        if sample:
            peak = max(peak, sum(1 for t in asyncio.all_tasks() if t.get_name().startswith("job:")))
        await asyncio.sleep(job_seconds)
        return b"\x01"

    class BacklogProducer:
        """Records the whole backlog in the inbox, as the real producer does after a catch-up, then
        hands the calls over one by one (``deliver`` waits while the runner's queue is full)."""

        def __init__(self, state: Any, backlog: list[Any]) -> None:
            self.state, self.backlog = state, backlog

        async def run(self, deliver: Callable[[Any], Awaitable[None]], stop: asyncio.Event) -> None:
            self.state.advance("bench", Cursor(len(self.backlog) + 1, None), self.backlog)
            for c in self.backlog:
                await deliver(c)
            await stop.wait()

    backlog = [job_call(service_id=0, call_id=i, job_index=0, caller="0x" + "c" * 40, inputs=b"", block_number=i + 1)
               for i in range(calls)]
    defaults = {name: p.default for name, p in inspect.signature(BlueprintRunner.__init__).parameters.items()
                if name in ("max_concurrency", "queue_size")}
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as tmp:
        state = TangleState(Path(tmp) / "t.sqlite3")
        consumer = TangleConsumer(None, state, None, contract="0x" + "1" * 40, dry_run=True)  # type: ignore[arg-type]
        router = Router().route(0, handler, name="wait")
        runner = BlueprintRunner(router, BacklogProducer(state, backlog), consumer, state)  # type: ignore[arg-type]
        t0 = time.monotonic()
        task = asyncio.create_task(runner.run())
        try:
            while runner.handled < calls:
                if task.done():
                    await task
                    raise RuntimeError(f"the runner ended after {runner.handled} of {calls} calls")
                if time.monotonic() - t0 > DEADLINE:
                    raise RuntimeError(f"{runner.handled} of {calls} calls handled after {DEADLINE:.0f} s")
                await asyncio.sleep(0.01)
            wall = time.monotonic() - t0
        finally:
            runner.stop()
            await asyncio.wait_for(task, 60)
    out: dict[str, Any] = {
        "calls": calls, "job_ms": job_seconds * 1000, **defaults,
        "wall_s": round(wall, 3), "jobs_per_s": round(calls / wall, 1),
        "first_job_after_s": round(started[0] - t0, 3) if started else None,
        "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    if sample:
        out["peak_live_job_tasks"] = peak
    return out


def _run_pass(src: str | None, sample: bool) -> dict[str, Any]:
    """A pass in a fresh interpreter with ``src`` first on its path (when None: the tree this process
    imports ``microvm_blueprint`` from)."""
    if src is None:
        import microvm_blueprint

        src = str(Path(microvm_blueprint.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src}
    argv = [sys.executable, "-m", "bench.backlog", "--pass", "sampled" if sample else "plain"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE + 120,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"backlog pass ({src}, {'sampled' if sample else 'plain'}) failed: "
                           f"{proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


async def run() -> None:
    before = os.environ.get("BENCH_BACKLOG_BEFORE")
    codes: dict[str, str | None] = {"after": None, **({"before": before} if before else {})}
    results: dict[str, dict[str, Any]] = {code: {} for code in codes}
    for sample in (True, False):  # the trees take turns, each pass in its own process
        for code, src in (codes.items() if sample else reversed(codes.items())):
            results[code].update(await asyncio.to_thread(_run_pass, src, sample))

    figures = results["after"]
    baseline: dict[str, Any] = {"code": before, **results["before"]} if before else {}
    ratio: dict[str, Any] = {}
    if before:
        ratio = {
            "peak_live_job_tasks_after_over_before":
                round(figures["peak_live_job_tasks"] / max(1, baseline["peak_live_job_tasks"]), 4),
            "jobs_per_s_after_over_before": round(figures["jobs_per_s"] / baseline["jobs_per_s"], 3),
        }
    emit("backlog", figures, baseline, ratio,
         targets={"peak_live_job_tasks": f"<= max_concurrency ({figures['max_concurrency']})"})


def main() -> int:
    if sys.argv[1:2] == ["--pass"]:
        result = asyncio.run(_pass(sys.argv[2] == "sampled", CALLS, JOB_SECONDS))
        print(json.dumps(result), flush=True)
        return 0
    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
