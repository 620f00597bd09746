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
    assert len(r.latencies) == jobs and all(lat >= 0 for lat in r.latencies)
    assert 1 <= r.result_txs <= jobs  # results went out, some of them batched or not
    assert r.blocks >= jobs and r.heights[0] < r.heights[1] < r.heights[2]
    assert r.jobs_per_s > 0 and r.bare_per_s > 0 and set(r.cpu) == {"anvil", "customer", "operator"}


async def test_the_steady_phase_reports_one_latency_per_job() -> None:
    latencies = await pipeline._steady(10.0, 0.5, ws=True)
    assert len(latencies) == 5 and all(lat >= 0 for lat in latencies)
