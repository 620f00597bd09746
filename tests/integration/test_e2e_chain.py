"""End to end on a real anvil: customer submitJob -> operator -> submitResult -> JobResultSubmitted."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import pytest
from eth_abi import encode
from eth_utils import function_signature_to_4byte_selector as sel

from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.consumer import submit_result_data
from microvm_blueprint.tangle.devnet import ANVIL_ADDRESSES, Anvil, deploy_dev_tangle, send_unlocked

from .conftest import HarnessFactory, api_get, result_counts

pytestmark = pytest.mark.chain


async def test_every_job_end_to_end(anvil: Anvil, harness_for: HarnessFactory) -> None:
    h = await harness_for(await deploy_dev_tangle(anvil.rpc_url))
    op = await h.start_operator()
    steps: list[tuple[str, *tuple[str | int, ...]]] = [
        ("create_vm", "vm-1"),
        ("start_vm", "vm-1"),
        ("stop_vm", "vm-1"),
        ("snapshot_vm", "vm-1", "snap-1"),
        ("start_vm", "vm-1"),
        ("restore_vm", "vm-1", "snap-1", "vm-2"),
        ("create_vm_with_spec", "vm-3", 2, 512, ""),
        ("destroy_vm", "vm-1"),
        ("delete_snapshot", "vm-1", "snap-1"),
    ]
    for step in steps:
        outcome = await h.job(*step)
        assert outcome.result is True, (step, outcome)
        assert outcome.result_tx is not None
    status, vms = await api_get(f"{op.api_url}/vms")
    assert status == 200
    assert {v["vm_id"]: v["status"] for v in vms} == {"vm-1": "destroyed", "vm-2": "stopped", "vm-3": "created"}
    _, vm3 = await api_get(f"{op.api_url}/vms/vm-3")
    assert vm3["spec"] == {"vcpus": 2, "mem_mib": 512, "image": "default"}
    _, vm1 = await api_get(f"{op.api_url}/vms/vm-1")
    assert vm1["snapshots"] == []
    assert [e["call_id"] for e in vm1["history"]] == [0, 1, 2, 3, 4, 7, 8]
    assert all(e["caller"] == ANVIL_ADDRESSES[0] for e in vm1["history"])
    _, job0 = await api_get(f"{op.api_url}/jobs/0")
    assert job0["status"] == "done" and job0["job"] == "create_vm" and job0["result_tx"].startswith("0x")


async def test_failed_jobs_are_journaled_not_sent(anvil: Anvil, harness_for: HarnessFactory) -> None:
    h = await harness_for(await deploy_dev_tangle(anvil.rpc_url))
    op = await h.start_operator()
    ok = await h.job("create_vm", "vm-1")
    assert ok.result is True
    cases: list[tuple[tuple[str, *tuple[str | int, ...]], str]] = [
        (("create_vm", "vm-1"), "vm 'vm-1' already exists"),
        (("stop_vm", "vm-1"), "invalid vm transition for 'vm-1': created -> stopped"),
        (("start_vm", "nope"), "vm 'nope' not found"),
        (("create_vm", ""), "vm_id must not be empty"),
        (("create_vm", "x" * 257), "vm_id exceeds maximum length of 256 bytes"),
        (("create_vm", "a\x07b"), "vm_id contains control characters"),
        (("snapshot_vm", "vm-1", "s\n"), "snapshot_id contains control characters"),
        (("create_vm_with_spec", "vm-9", 1, 64, ""), "mem_mib must be at least 128"),
    ]
    for args, error in cases:
        outcome = await h.job(*args, timeout=30)
        assert outcome.result is None, args
        assert outcome.job_status is not None and outcome.job_status["status"] == "failed", args
        assert outcome.job_status["error"] == error
    # nothing changed, and the service still serves
    _, vms = await api_get(f"{op.api_url}/vms")
    assert [(v["vm_id"], v["status"], v["snapshots"]) for v in vms] == [("vm-1", "created", [])]
    assert (await h.job("start_vm", "vm-1")).result is True
    # failed calls have no on-chain result
    results = await h.customer.results(0)
    failed_ids = set(range(1, 1 + len(cases)))
    assert failed_ids.isdisjoint(results)


async def test_malformed_calldata_and_unknown_job(anvil: Anvil, harness_for: HarnessFactory) -> None:
    h = await harness_for(await deploy_dev_tangle(anvil.rpc_url, job_count=12))
    op = await h.start_operator()
    bad_inputs = [b"", b"\x00" * 7, b"\xff" * 64, encode(["uint256"], [2**200]), b"\x00" * 31 + b"\x20" + b"\xff" * 40]
    call_ids = []
    for data in bad_inputs:
        sub = await h.customer.submit(JOBS_BY_NAME["create_vm"], data)
        call_ids.append(sub.call_id)
    unknown = JOBS_BY_NAME["create_vm"].__class__(11, "x", ("string",), ("vm_id",), "")
    sub_unknown = await h.customer.submit(unknown, encode_args(["string"], ["vm-x"]))
    ok = await h.job("create_vm", "after")
    assert ok.result is True
    for call_id in call_ids:
        status, body = await api_get(f"{op.api_url}/jobs/{call_id}")
        assert status == 200 and body["status"] == "failed", (call_id, body)
        assert body["error"].startswith("malformed inputs: expected (string)"), body
    status, body = await api_get(f"{op.api_url}/jobs/{sub_unknown.call_id}")
    assert body["status"] == "failed" and body["error"] == "unknown job index 11"
    _, vms = await api_get(f"{op.api_url}/vms")
    assert [v["vm_id"] for v in vms] == ["after"]


async def test_wrapped_form_and_event_layouts(anvil: Anvil, harness_for: HarnessFactory) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    h = await harness_for(d)
    op = await h.start_operator()
    from microvm_blueprint.tangle.rpc import JsonRpc

    rpc = JsonRpc(anvil.rpc_url)
    try:
        wrapped = encode(["(string)"], [("vm-wrapped",)])
        r4 = await send_unlocked(
            rpc, d.customer, d.contract,
            sel("submitJobIndexedLayout(uint64,uint8,bytes)") + encode(["uint64", "uint8", "bytes"], [0, 0, wrapped]),
        )
        assert len(r4["logs"][0]["topics"]) == 4
        rq = await send_unlocked(
            rpc, d.customer, d.contract,
            sel("submitJobFromQuote(uint64,uint8,bytes,address[],uint256)")
            + encode(["uint64", "uint8", "bytes", "address[]", "uint256"],
                     [0, 0, encode(["string"], ["vm-quote"]), [d.operator], 5]),
        )
        assert len(rq["logs"][0]["topics"]) == 3
    finally:
        await rpc.aclose()
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        _, vms = await api_get(f"{op.api_url}/vms")
        results = await h.customer.results(0)
        if len(vms) == 2 and len(results) == 2:
            break
        assert asyncio.get_running_loop().time() < deadline, (vms, results)
        await asyncio.sleep(0.1)
    assert sorted(v["vm_id"] for v in vms) == ["vm-quote", "vm-wrapped"]


async def test_result_already_on_chain_is_success_without_a_transaction(
    anvil: Anvil, harness_for: HarnessFactory
) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    h = await harness_for(d)
    job = JOBS_BY_NAME["create_vm"]
    sub = await h.customer.submit(job, encode_args(job.arg_types, ["raced"]))
    from microvm_blueprint.tangle.rpc import JsonRpc

    rpc = JsonRpc(anvil.rpc_url)
    try:  # another instance of this operator got there first
        await send_unlocked(rpc, d.operator, d.contract, submit_result_data(0, sub.call_id, encode(["bool"], [True])))
        nonce_before = await rpc.nonce(d.operator)
        op = await h.start_operator()
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            status, body = await api_get(f"{op.api_url}/jobs/{sub.call_id}")
            if status == 200 and body["status"] == "done" and op.operator.runner.consumer.idle:
                break
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
        assert await rpc.nonce(d.operator) == nonce_before  # no paid, failing duplicate
    finally:
        await rpc.aclose()


async def test_restart_resumes_without_missing_or_repeating(anvil: Anvil, harness_for: HarnessFactory) -> None:
    h = await harness_for(await deploy_dev_tangle(anvil.rpc_url))
    op = await h.start_operator()
    assert (await h.job("create_vm", "a")).result is True
    await op.stop()
    # calls made while the operator is down
    job = JOBS_BY_NAME["create_vm"]
    subs = [await h.customer.submit(job, encode_args(job.arg_types, [f"down-{i}"])) for i in range(5)]
    op2 = await h.start_operator()
    for sub in subs:
        outcome = await h.customer.wait_result(sub, timeout=60, api_url=op2.api_url)
        assert outcome.result is True
    await op2.stop()
    op3 = await h.start_operator()
    assert (await h.job("start_vm", "a")).result is True
    assert await result_counts(anvil.rpc_url, h.deployment.contract) == {i: 1 for i in range(7)}
    _, vms = await api_get(f"{op3.api_url}/vms")
    assert sorted(v["vm_id"] for v in vms) == ["a"] + [f"down-{i}" for i in range(5)]


@pytest.mark.parametrize("vm_id", ["../../etc", "a/b", "é" * 128])
async def test_tricky_ids_over_the_chain(anvil: Anvil, harness_for: HarnessFactory, vm_id: str) -> None:
    h = await harness_for(await deploy_dev_tangle(anvil.rpc_url))
    op = await h.start_operator()
    assert (await h.job("create_vm", vm_id)).result is True
    status, body = await api_get(f"{op.api_url}/vms/{quote(vm_id, safe='')}")
    assert status == 200 and body["vm_id"] == vm_id


async def test_result_linger_lets_spread_out_results_share_a_transaction(
    anvil: Anvil, harness_for: HarnessFactory
) -> None:
    h = await harness_for(await deploy_dev_tangle(anvil.rpc_url))
    running = await h.start_operator(env={"RESULT_LINGER": "3"})
    assert running.operator.runner.consumer.linger == 3.0
    job = JOBS_BY_NAME["create_vm"]
    subs = []
    for i in range(3):  # 0.3 s apart: with the default 50 ms wait each would go on its own
        subs.append(await h.customer.submit(job, encode_args(job.arg_types, [f"vm-linger-{i}"])))
        if i < 2:
            await asyncio.sleep(0.3)
    outs = [await h.customer.wait_result(s, timeout=30, api_url=running.api_url) for s in subs]
    assert all(o.result is True for o in outs)
    assert len({o.result_tx for o in outs}) == 1  # one transaction for the three
