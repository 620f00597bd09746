"""``GET /metrics`` after real jobs: anvil + the dev contract, the operator in-process (in-memory VMs)."""

from __future__ import annotations

import re

import httpx
import pytest

from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.tangle.devnet import Anvil, deploy_dev_tangle

from ..waiting import until
from .conftest import HarnessFactory

pytestmark = pytest.mark.chain

_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_]\w*="(?:[^"\\\n]|\\.)*",?)*)\})? (\S+)')
_LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\\n]|\\.)*)"')


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """The exposition text -> (family -> type, (name, labels) -> value); fails on a malformed line."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types, f"{name} typed twice"
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        m = _SAMPLE.fullmatch(line)
        assert m is not None, f"malformed line {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"{name} has no # TYPE before it"
        key = (name, frozenset(_LABEL.findall(labels)))
        assert key not in samples, f"{line!r} twice"
        samples[key] = float(value)
    return types, samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_real_jobs(anvil: Anvil, harness_for: HarnessFactory) -> None:
    h = await harness_for(await deploy_dev_tangle(anvil.rpc_url))
    op = await h.start_operator()
    dep = h.deployment
    assert (await h.job("create_vm", "vm-1")).result is True
    assert (await h.job("start_vm", "vm-1")).result is True
    assert (await h.job("create_vm", "vm-2")).result is True
    assert (await h.job("create_vm", "vm-1", timeout=30)).result is None  # already exists: fails
    assert (await h.job("stop_vm", "nope", timeout=30)).result is None  # not found: fails
    consumer = op.operator.runner.consumer
    await until(lambda: consumer.idle, timeout=20, what="the outbox to empty")

    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{op.api_url}/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        openapi = (await http.get(f"{op.api_url}/openapi.json")).json()
    assert "/metrics" in openapi["paths"]
    types, samples = parse(r.text)
    assert types["blueprint_job_executions"] == "counter"
    assert types["blueprint_job_execution_time"] == "histogram"
    assert types["blueprint_job_errors"] == "counter"
    assert types["blueprint_uptime"] == types["blueprint_last_heartbeat"] == "gauge"

    def job(name: str) -> dict[str, str]:
        return {"job_id": str(JOBS_BY_NAME[name].index), "job": name, "service_id": str(dep.service_id),
                "blueprint_id": str(dep.blueprint_id)}

    assert value(samples, "blueprint_job_executions", **job("create_vm")) == 2
    assert value(samples, "blueprint_job_executions", **job("start_vm")) == 1
    assert value(samples, "blueprint_job_executions", **job("stop_vm")) == 0
    assert value(samples, "blueprint_job_errors", **job("create_vm"), error_type="job_error") == 1
    assert value(samples, "blueprint_job_errors", **job("stop_vm"), error_type="job_error") == 1
    assert sum(v for (n, _), v in samples.items() if n == "blueprint_job_errors") == 2
    # every run is timed, done or failed
    assert value(samples, "blueprint_job_execution_time_count", **job("create_vm")) == 3
    assert value(samples, "blueprint_job_execution_time_bucket", **job("create_vm"), le="+Inf") == 3
    assert value(samples, "blueprint_job_execution_time_sum", **job("create_vm")) > 0
    assert value(samples, "microvm_boot_seconds_count", job="start_vm") == 1
    assert value(samples, "microvm_vms", status="running") == 1
    assert value(samples, "microvm_vms", status="created") == 1
    assert value(samples, "microvm_guest_memory_mib") == 512  # two VMs of the default 256 MiB
    # three results on-chain, in one to three transactions, none failed; nothing left to send
    sent = value(samples, "microvm_result_transactions", outcome="sent")
    assert 1 <= sent <= 3
    assert value(samples, "microvm_result_transactions", outcome="mined") == sent
    assert value(samples, "microvm_result_transactions", outcome="failed") == 0
    assert value(samples, "microvm_outbox_depth") == 0
    assert value(samples, "microvm_producer_lag_blocks") >= 0 and ("microvm_producer_lag_blocks", frozenset()) in samples
    assert value(samples, "microvm_rpc_errors") == 0
    assert value(samples, "blueprint_uptime") > 0
    # the dev chain has no status registry: no heartbeat, and the gauge says so
    assert value(samples, "blueprint_last_heartbeat") == 0
    assert op.operator.heartbeat is None and "microvm_heartbeats" not in types
    # what a heartbeat would report
    assert op.operator.metrics is not None
    assert op.operator.metrics.heartbeat_metrics() == [
        ("vms_running", 1), ("vms_total", 2), ("jobs_done", 3), ("jobs_failed", 2), ("guest_memory_mib", 512)]
