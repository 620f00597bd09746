"""Idle cost: the HTTP requests a second an operator with no jobs sends its node, at 1 and 10 blocks/s,
with and without ``WS_RPC_URL`` (default ``POLL_INTERVAL``, as in production).

Each operator runs as its own process behind its own counting proxy (``rpc_counter.py``), all of them
on one anvil at the same time, so they see the same blocks. ``BENCH_IDLE_BEFORE=/path/to/other/src``
also runs that tree's code beside ours (the same chain, the same blocks): the before/after figures
in one run. Blocks come from ``evm_mine`` at the set rate (straight to anvil, not counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from microvm_blueprint.tangle.devnet import Anvil, deploy_dev_tangle
from microvm_blueprint.tangle.rpc import JsonRpc

from .common import emit
from .pipeline import _operator
from .rpc_counter import CountingProxy, Counts

RATES = (1.0, 10.0)
#: Seconds counted per rate, after a warm-up of :data:`WARM_UP` with the blocks already coming.
WINDOW = float(os.environ.get("BENCH_IDLE_SECONDS", "20"))
WARM_UP = 3.0


async def _mine(rpc_url: str, per_second: float) -> None:
    """``evm_mine`` on a fixed schedule (a late block is mined at once, not skipped) until cancelled."""
    rpc = JsonRpc(rpc_url)
    try:
        start = time.monotonic()
        for k in range(1, 10**9):
            await rpc.call("evm_mine", [])
            await asyncio.sleep(max(0.0, start + k / per_second - time.monotonic()))
    finally:
        await rpc.aclose()


async def _at_rate(rate: float, codes: dict[str, str | None]) -> dict[str, Any]:
    """Requests/s (and per method) of each (code, ws) operator while anvil mines ``rate`` blocks/s."""
    async with Anvil() as chain:
        d = await deploy_dev_tangle(chain.rpc_url)
        rpc = JsonRpc(chain.rpc_url)
        start_block = await rpc.block_number() + 1
        async with contextlib.AsyncExitStack() as stack:
            proxies: dict[tuple[str, bool], CountingProxy] = {}
            for code, src in codes.items():
                for ws in (False, True):
                    proxy = await stack.enter_async_context(CountingProxy(chain.rpc_url))
                    env = {"HTTP_RPC_URL": proxy.url, "POLL_INTERVAL": "1.0", **({"PYTHONPATH": src} if src else {})}
                    await stack.enter_async_context(_operator(chain, d.contract, start_block, ws=ws, extra_env=env))
                    proxies[(code, ws)] = proxy
            miner = asyncio.create_task(_mine(chain.rpc_url, rate))
            try:
                await asyncio.sleep(WARM_UP)  # first polls done, subscriptions open, blocks coming
                h0, t0 = await rpc.block_number(), time.monotonic()
                c0 = {k: p.counts() for k, p in proxies.items()}
                await asyncio.sleep(WINDOW)
                c1 = {k: p.counts() for k, p in proxies.items()}
                h1, t1 = await rpc.block_number(), time.monotonic()
            finally:
                miner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await miner
                await rpc.aclose()
        seconds = t1 - t0
        spent: dict[tuple[str, bool], Counts] = {k: c1[k] - c0[k] for k in proxies}
        return {
            "blocks_per_s": round((h1 - h0) / seconds, 2),
            "requests_per_s": {
                code: {("ws" if ws else "http"): round(spent[(code, ws)].requests / seconds, 2)
                       for ws in (False, True)}
                for code in codes
            },
            "calls_per_s": {
                code: {("ws" if ws else "http"): {m: round(n / seconds, 2) for m, n in spent[(code, ws)].methods.items()}
                       for ws in (False, True)}
                for code in codes
            },
        }


async def run() -> None:
    before = os.environ.get("BENCH_IDLE_BEFORE")
    codes: dict[str, str | None] = {"after": None, **({"before": before} if before else {})}
    by_rate = {f"{rate:g}": await _at_rate(rate, codes) for rate in RATES}

    def req(code: str, rate: str, kind: str) -> float:
        return float(by_rate[rate]["requests_per_s"][code][kind])

    figures = {
        "requests_per_s": {rate: r["requests_per_s"]["after"] for rate, r in by_rate.items()},
        "blocks_per_s": {rate: r["blocks_per_s"] for rate, r in by_rate.items()},
        "calls_per_s": {rate: r["calls_per_s"]["after"] for rate, r in by_rate.items()},
        "window_s": WINDOW,
    }
    baseline: dict[str, Any] = {}
    if before:
        baseline = {
            "code": before,
            "requests_per_s": {rate: r["requests_per_s"]["before"] for rate, r in by_rate.items()},
            "calls_per_s": {rate: r["calls_per_s"]["before"] for rate, r in by_rate.items()},
        }
    ratio = {
        # flat: the block rate x10 and the idle requests stay where they were
        "ws_10_vs_1_blocks_per_s": round(req("after", "10", "ws") / max(req("after", "1", "ws"), 1e-9), 2),
        "ws_vs_http_at_10_blocks_per_s": round(req("after", "10", "ws") / max(req("after", "10", "http"), 1e-9), 2),
    }
    if before:
        ratio["ws_at_10_blocks_per_s_before_vs_after"] = round(
            req("before", "10", "ws") / max(req("after", "10", "ws"), 1e-9), 2)
    emit("idle", figures, baseline, ratio,
         targets={"ws_10_vs_1_blocks_per_s": "about 1 (flat)", "ws_vs_http_at_10_blocks_per_s": "about 1"})
