"""The pipeline benchmark's machinery, run small so it cannot rot unnoticed between benchmark runs.
Nothing here asserts a time (benchmarks are not tests): only that every job was seen submitted and
answered, and that the figures the benchmark reports are there."""

from __future__ import annotations

import pytest
from bench import pipeline

pytestmark = pytest.mark.chain


async def test_a_small_pipeline_round_sees_every_job_answered() -> None:
    jobs = 12
    r = await pipeline._round(jobs, ws=True)
    for burst in (r.flood, r.loop):
        assert len(burst.latencies) == jobs and all(lat >= 0 for lat in burst.latencies)
        assert 1 <= burst.result_txs <= jobs  # results went out, some of them batched or not
        assert burst.blocks >= 1 and burst.jobs_per_s > 0 and burst.bare_per_s > 0
        assert set(burst.cpu) == {"anvil", "customer", "operator"}
    assert r.loop.blocks >= jobs  # one call a request: anvil mines each on its own (a flood shares blocks)
    assert r.heights[0] < r.flood.height < r.loop.height < r.heights[1]


async def test_the_steady_phase_reports_one_latency_per_job() -> None:
    latencies = await pipeline._steady(10.0, 0.5, ws=True)
    assert len(latencies) == 5 and all(lat >= 0 for lat in latencies)


async def test_the_idle_benchmark_counts_each_operators_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The idle benchmark's machinery (an operator with and without WS_RPC_URL, each behind its own
    counting proxy, on one chain mining ~10 blocks/s), run short; no rate is asserted."""
    from bench import idle

    monkeypatch.setattr(idle, "WINDOW", 2.0)
    monkeypatch.setattr(idle, "WARM_UP", 1.0)
    r = await idle._at_rate(10.0, {"after": None})
    assert r["blocks_per_s"] > 0
    for kind in ("http", "ws"):
        assert r["requests_per_s"]["after"][kind] > 0  # the interval polls went through the counter
        assert r["calls_per_s"]["after"][kind]["eth_getBlockByNumber"] > 0
