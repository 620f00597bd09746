"""The chain RPC unreachable for a while mid-run: nothing missed or duplicated once it is back."""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

import pytest

from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.devnet import Anvil, deploy_dev_tangle

from .conftest import HarnessFactory, api_get, result_counts
from .tangle_chain import splice

pytestmark = pytest.mark.chain


class FlakyProxy:
    """TCP proxy on loopback; while ``down`` it accepts and drops every connection (counted)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.down = False
        self.dropped = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)

    def cut(self) -> None:
        self.down = True
        for w in list(self.writers):
            w.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            self.dropped += 1
            writer.close()
            return
        await splice(reader, writer, self.target_port, self.writers)

    async def close(self) -> None:
        if self.server:
            self.server.close()
        for w in list(self.writers):
            w.close()


async def test_rpc_outage_loses_and_repeats_nothing(anvil: Anvil, harness_for: HarnessFactory) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    proxy = FlakyProxy(urlparse(anvil.rpc_url).port or 0)
    await proxy.start()
    h = await harness_for(d)
    h.rpc_url = proxy.url  # the operator talks to the chain only through the proxy
    op = await h.start_operator()
    try:
        assert (await h.job("create_vm", "before")).result is True
        proxy.cut()
        job = JOBS_BY_NAME["create_vm"]
        subs = [await h.customer.submit(job, encode_args(job.arg_types, [f"during-{i}"])) for i in range(5)]
        deadline = asyncio.get_running_loop().time() + 30
        while proxy.dropped < 3:  # the operator kept trying (with backoff) while the chain was away
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        proxy.down = False
        for sub in subs:
            outcome = await h.customer.wait_result(sub, timeout=90, api_url=op.api_url)
            assert outcome.result is True
        assert await result_counts(anvil.rpc_url, d.contract) == {i: 1 for i in range(6)}
        _, vms = await api_get(f"{op.api_url}/vms")
        assert sorted(v["vm_id"] for v in vms) == ["before"] + [f"during-{i}" for i in range(5)]
    finally:
        await op.stop()
        await proxy.close()
