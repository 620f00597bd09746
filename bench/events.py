"""What ``GET /events`` costs the jobs: 100 subscribers (another process, each its own connection,
reading every event) while VMs change at 50 a second in the query server's own event loop, as the
operator's jobs do. Rounds with and without the subscribers take turns; each figure is the median.

* paced: lifecycle jobs (create, start, stop, destroy of in-memory VMs) at 50 changes/s; the latency of
  each job call and the operator process's CPU, with 100 subscribers vs none;
* flat out: as many jobs as the loop can run in ROUND_S, with 100 subscribers vs none (an event rate far
  above 50/s: the harsh case).

The chain side of the pipeline (anvil, the producer's and consumer's RPCs) is left out: it runs the same
with or without subscribers, and would only dilute the ratio.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from microvm_blueprint.blueprint.journal import JobJournal
from microvm_blueprint.blueprint.query import QueryApp
from microvm_blueprint.blueprint.server import QueryServer
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin
from microvm_blueprint.runtime.store import Store

from .common import cpu_seconds, emit, median, pct

SUBSCRIBERS = 100
RATE = 50.0  # VM changes a second
ROUND_S = 4.0
ROUNDS = 3

READERS = r"""
import asyncio, json, sys
# n SSE readers on their own connections; prints how many events each got when told to stop (stdin closes)
async def main(host, port, n):
    counts = [0] * n
    ready = 0
    async def reader(i):
        nonlocal ready
        r, w = await asyncio.open_connection(host, port)
        w.write(b"GET /events HTTP/1.1\r\nHost: bench\r\n\r\n")
        await r.readuntil(b"\r\n\r\n")
        ready += 1
        if ready == n:
            print("ready", flush=True)
        while line := await r.readline():
            if line.startswith(b"data: "):
                counts[i] += 1
    tasks = [asyncio.create_task(reader(i)) for i in range(n)]
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(json.dumps(counts), flush=True)
    for t in tasks: t.cancel()
asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


class Jobs:
    """Lifecycle jobs in cycles (create, start, stop, destroy), one VM after another."""

    def __init__(self, life: Lifecycle) -> None:
        self.life = life
        self.n = 0
        self.call = 0

    async def one(self) -> float:
        """Run the next job; its duration in seconds."""
        vm, step = f"vm-{self.n // 4:07d}", self.n % 4
        self.n += 1
        self.call += 1
        origin = Origin(call_id=self.call)
        t = time.perf_counter()
        if step == 0:
            await self.life.create_vm(vm, None, origin)
        elif step == 1:
            await self.life.start_vm(vm, origin)
        elif step == 2:
            await self.life.stop_vm(vm, origin)
        else:
            await self.life.destroy_vm(vm, origin)
        return time.perf_counter() - t


async def _paced(jobs: Jobs, seconds: float) -> dict[str, float]:
    lat: list[float] = []
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    due = t0
    while due < t0 + seconds:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        lat.append(await jobs.one())
        due += 1 / RATE
    wall = time.perf_counter() - t0
    await asyncio.sleep(0.2)  # the last events go out inside the round's CPU
    cpu = cpu_seconds() - cpu0
    return {"p50_ms": median(lat) * 1000, "p99_ms": pct(lat, 99) * 1000, "cpu_pct": 100 * cpu / (wall + 0.2),
            "changes_per_s": len(lat) / wall}


async def _flat_out(jobs: Jobs, seconds: float) -> float:
    t0 = time.perf_counter()
    done = 0
    while time.perf_counter() - t0 < seconds:
        await jobs.one()
        done += 1
        if done % 8 == 0:
            await asyncio.sleep(0)  # as the operator's loop does between jobs: the server gets its turns
    return done / (time.perf_counter() - t0)


async def run(subscribers: int = SUBSCRIBERS) -> None:
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        life = Lifecycle(InMemoryDriver(), Store(tmp / "s.db"), state_dir=tmp / "state")
        app = QueryApp(life, JobJournal(tmp / "j.db"))
        server = QueryServer(app, "127.0.0.1", 0)
        ready = asyncio.Event()
        task = asyncio.create_task(server.run(ready))
        await ready.wait()
        assert app.events is not None
        jobs = Jobs(life)
        alone: list[dict[str, float]] = []
        with_subs: list[dict[str, float]] = []
        flat_alone: list[float] = []
        flat_subs: list[float] = []
        delivered: list[float] = []
        for r in range(ROUNDS):
            for phase in ("alone", "subs") if r % 2 == 0 else ("subs", "alone"):
                if phase == "alone":
                    alone.append(await _paced(jobs, ROUND_S))
                    flat_alone.append(await _flat_out(jobs, ROUND_S / 2))
                    continue
                readers = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", READERS, server.host, str(server.bound_port), str(subscribers),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                )
                assert readers.stdout is not None and readers.stdin is not None
                line = await asyncio.wait_for(readers.stdout.readline(), 60)
                assert line.strip() == b"ready", line
                deadline = time.monotonic() + 60
                while app.events.subscribers < subscribers:  # every reader subscribed, or the round is void
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{app.events.subscribers} of {subscribers} readers subscribed in 60 s")
                    await asyncio.sleep(0.01)
                seq0 = life.store.last_event_seq()
                with_subs.append(await _paced(jobs, ROUND_S))
                flat_subs.append(await _flat_out(jobs, ROUND_S / 2))
                sent = life.store.last_event_seq() - seq0
                await asyncio.sleep(0.5)  # the last batch reaches the readers
                readers.stdin.close()
                counts: list[int] = json.loads(await asyncio.wait_for(readers.stdout.readline(), 60))
                await asyncio.wait_for(readers.wait(), 30)
                delivered.append(sum(counts) / (sent * subscribers) if sent else 0.0)
                while app.events.subscribers:
                    await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def med(rounds: list[dict[str, float]], key: str) -> float:
        return median([x[key] for x in rounds])

    figures: dict[str, Any] = {
        "subscribers": subscribers,
        "changes_per_s": round(med(with_subs, "changes_per_s"), 1),
        "job_p50_ms": round(med(with_subs, "p50_ms"), 3),
        "job_p99_ms": round(med(with_subs, "p99_ms"), 3),
        "operator_cpu_pct": round(med(with_subs, "cpu_pct"), 1),
        "flat_out_jobs_per_s": round(median(flat_subs)),
        "events_delivered_share": round(median(delivered), 4),
    }
    baseline = {
        "job_p50_ms": round(med(alone, "p50_ms"), 3),
        "job_p99_ms": round(med(alone, "p99_ms"), 3),
        "operator_cpu_pct": round(med(alone, "cpu_pct"), 1),
        "flat_out_jobs_per_s": round(median(flat_alone)),
    }
    ratio = {
        "job_p50_with_vs_without": round(med(with_subs, "p50_ms") / med(alone, "p50_ms"), 3),
        "flat_out_throughput_with_vs_without": round(median(flat_subs) / median(flat_alone), 3),
        "every_round_flat_out": [round(s / a, 3) for s, a in zip(flat_subs, flat_alone, strict=True)],
        "target": "job p50 and flat-out throughput within 10 % (p50 ratio <= 1.10, throughput ratio >= 0.90)",
    }
    emit("events", figures, baseline, ratio)
