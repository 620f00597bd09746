"""Query API throughput with 10,000 VMs in the store; load from a separate process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from microvm_blueprint.blueprint.journal import JobJournal
from microvm_blueprint.blueprint.query import QueryApp
from microvm_blueprint.blueprint.server import QueryServer
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin
from microvm_blueprint.runtime.store import Store

from .common import emit

LOAD = r"""
import asyncio, json, sys, time, httpx
async def main(url, seconds, conc):
    done = 0; lat = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=conc)) as c:
        end = time.perf_counter() + seconds
        async def worker():
            nonlocal done
            while time.perf_counter() < end:
                t = time.perf_counter(); r = await c.get(url); lat.append(time.perf_counter() - t)
                assert r.status_code == 200, r.status_code
                done += 1
        await asyncio.gather(*(worker() for _ in range(conc)))
    lat.sort()
    print(json.dumps({"rps": done / seconds, "p50_ms": lat[len(lat)//2]*1000, "p99_ms": lat[int(len(lat)*0.99)]*1000}))
asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
"""


def _load(url: str, seconds: float = 4.0, conc: int = 8) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", LOAD, url, str(seconds), str(conc)], capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


async def run(vms: int = 10_000) -> None:
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        life = Lifecycle(InMemoryDriver(), Store(tmp / "s.db"), state_dir=tmp / "state")
        t0 = time.perf_counter()
        for i in range(vms):
            await life.create_vm(f"vm-{i:05d}", None, Origin(call_id=i))
        seed_s = time.perf_counter() - t0
        server = QueryServer(QueryApp(life, JobJournal(tmp / "j.db")), "127.0.0.1", 0)
        ready = asyncio.Event()
        task = asyncio.create_task(server.run(ready))
        await ready.wait()
        base = server.url
        health = await asyncio.to_thread(_load, f"{base}/health")
        one = await asyncio.to_thread(_load, f"{base}/vms/vm-04242")
        paged = await asyncio.to_thread(_load, f"{base}/vms?limit=100&after=vm-05000", 4.0, 4)
        full = await asyncio.to_thread(_load, f"{base}/vms", 6.0, 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    emit(
        "query_api",
        {"vms": vms, "get_vm_rps": round(one["rps"]), "get_vm_p50_ms": round(one["p50_ms"], 2),
         "list_full_p50_ms": round(full["p50_ms"], 1), "list_page100_p50_ms": round(paged["p50_ms"], 2),
         "seed_seconds": round(seed_s, 1)},
        {"health_rps": round(health["rps"])},
        {"get_vm_vs_health": round(one["rps"] / health["rps"], 3)},
        targets={"get_vm_vs_health": ">= 0.7"},
    )
