"""The chain RPC unreachable for a while (a TCP proxy closed, then reopened on the same port): the
producer and the consumer back off and retry; once it is back nothing is missed or duplicated."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import pytest
from eth_abi import encode

from microvm_blueprint.tangle.abi import encode_result
from microvm_blueprint.tangle.rpc import JsonRpc

from .conftest import RealTangleChain
from .tangle_chain import Pipeline, TcpProxy, operator_key, results_on_chain, submit_job, transactions_from, wait_for

pytestmark = pytest.mark.chain

TRUE = encode_result("bool", True)


def retries(caplog: pytest.LogCaptureFixture, logger: str) -> int:
    return sum(1 for r in caplog.records if r.name == logger and r.levelno == logging.WARNING and "retrying" in
               r.getMessage())


class Rig(NamedTuple):
    """A pipeline whose every chain request goes through ``proxy`` (which the test closes and reopens),
    a ``direct`` client that always reaches the chain, and the block ``start`` the pipeline reads from."""

    direct: JsonRpc
    proxy: TcpProxy
    start: int
    pipe: Pipeline


@contextlib.asynccontextmanager
async def behind_a_proxy(chain: RealTangleChain, tmp_path: Path, caplog: pytest.LogCaptureFixture, *,
                         consumer: bool = True) -> AsyncIterator[Rig]:
    """A :class:`Rig` on ``chain`` (``consumer=False``: the result sender is not started); closed after."""
    caplog.set_level(logging.INFO, logger="microvm_blueprint.tangle")
    direct = JsonRpc(chain.rpc_url)
    proxy = TcpProxy(urlparse(chain.rpc_url).port or 0)
    await proxy.open()
    start = await direct.block_number()
    pipe = await Pipeline(chain, proxy.url, tmp_path / "t.sqlite3", operator_key(tmp_path, chain.operator_key),
                          from_block=start, answer=lambda c: TRUE).start(consumer=consumer)
    try:
        yield Rig(direct, proxy, start, pipe)
    finally:
        await pipe.close()
        await proxy.close()
        await direct.aclose()


async def test_rpc_outage_loses_and_repeats_nothing(
    real_tangle: RealTangleChain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chain = real_tangle
    async with behind_a_proxy(chain, tmp_path, caplog) as (direct, proxy, start, pipe):
        j0 = (await submit_job(direct, chain, 0, encode(["string"], ["before"])))[0]
        await wait_for(lambda: j0 in pipe.recorder.submitted, 20, "the first result")

        # the chain goes away while jobs keep coming
        await proxy.close()
        before = retries(caplog, "microvm_blueprint.tangle.producer")
        during = [(await submit_job(direct, chain, 0, encode(["string"], [f"during-{i}"])))[0] for i in range(3)]
        await wait_for(lambda: retries(caplog, "microvm_blueprint.tangle.producer") >= before + 2, 60,
                       "the producer retrying")
        await proxy.open()
        await wait_for(lambda: all(c in pipe.recorder.submitted for c in during), 30, "every result after the outage")

        # a second outage: both sides retry, and still nothing is lost
        await proxy.close()
        after = [(await submit_job(direct, chain, 1, encode(["string"], [f"after-{i}"])))[0] for i in range(2)]
        retried = retries(caplog, "microvm_blueprint.tangle.consumer") + retries(
            caplog, "microvm_blueprint.tangle.producer")
        await wait_for(lambda: retries(caplog, "microvm_blueprint.tangle.consumer") + retries(
            caplog, "microvm_blueprint.tangle.producer") >= retried + 2, 20, "retries")
        await proxy.open()
        await wait_for(lambda: all(c in pipe.recorder.submitted for c in after), 30, "the last results")

        everything = [j0, *during, *after]
        assert pipe.ids() == everything  # each call handed over exactly once, in order
        assert await results_on_chain(direct, chain, start) == {c: [TRUE] for c in everything}
        assert all(r["status"] == "0x1" for _, r in await transactions_from(direct, chain.operator, start))
        assert proxy.connections > 1


async def test_results_queued_while_the_chain_is_away_are_sent_once(
    real_tangle: RealTangleChain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chain = real_tangle
    async with behind_a_proxy(chain, tmp_path, caplog, consumer=False) as (direct, proxy, start, pipe):
        ids = [(await submit_job(direct, chain, 0, encode(["string"], [f"vm-{i}"])))[0] for i in range(3)]
        await wait_for(lambda: pipe.ids() == ids, 20, "the calls")
        assert len(pipe.state.pending(10)) == 3  # acknowledged: their results wait in the outbox
        await proxy.close()
        pipe.tasks.append(asyncio.create_task(pipe.consumer.run(pipe.stop_event)))
        await wait_for(lambda: retries(caplog, "microvm_blueprint.tangle.consumer") >= 2, 60, "the sender retrying")
        await proxy.open()
        await wait_for(lambda: len(pipe.recorder.submitted) == 3, 30, "the results")
        assert await results_on_chain(direct, chain, start) == {c: [TRUE] for c in ids}
        assert all(r["status"] == "0x1" for _, r in await transactions_from(direct, chain.operator, start))
