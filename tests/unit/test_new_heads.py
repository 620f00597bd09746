"""NewHeads against WebSocket servers that misbehave (real sockets on loopback): it never raises, it
wakes only for its own subscription, it retries with one warning per outage, and no URL secret is
logged. The happy path against anvil is in tests/integration/test_new_heads_chain.py."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve

from microvm_blueprint.tangle.heads import MAX_FRAME, NewHeads
from microvm_blueprint.tangle.rpc import redact_url

from ..waiting import until

Handler = Callable[[ServerConnection], Awaitable[None]]


class Node:
    """A WebSocket server whose behaviour per connection is the test's ``handler``."""

    def __init__(self) -> None:
        self.connections = 0
        self.handler: Handler | None = None
        self.server: Server | None = None

    async def _serve(self, ws: ServerConnection) -> None:
        self.connections += 1
        assert self.handler is not None
        await self.handler(ws)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    n = Node()
    async with serve(n._serve, "127.0.0.1", 0, max_size=None) as server:
        n.server = server
        yield n


@pytest.fixture
async def running() -> AsyncIterator[Callable[[NewHeads], asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []

    def start(heads: NewHeads) -> asyncio.Task[None]:
        tasks.append(asyncio.create_task(heads.run(asyncio.Event())))
        return tasks[-1]

    yield start
    for t in tasks:
        assert not t.done(), f"NewHeads ended on its own: {t}"  # it must never stop by itself
        t.cancel()
        await asyncio.wait({t}, timeout=10)  # a swallowed cancellation fails here instead of hanging
        assert t.done() and t.cancelled(), "NewHeads did not stop when cancelled"


async def subscribe_then(ws: ServerConnection, sub: str = "0xabc") -> dict[str, Any]:
    request = json.loads(await ws.recv())
    assert request["method"] == "eth_subscribe" and request["params"] == ["newHeads"]
    await ws.send(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": sub}))
    return dict(request)


def head(sub: str, n: int) -> str:
    return json.dumps({"jsonrpc": "2.0", "method": "eth_subscription",
                       "params": {"subscription": sub, "result": {"number": hex(n)}}})


async def announce_one_block(node: Node, ws: ServerConnection) -> None:
    """Accept the subscription (a fresh id per connection), announce one block, stay open."""
    sub = "0x" + str(node.connections)
    await subscribe_then(ws, sub)
    await ws.send(head(sub, 1))
    await ws.wait_closed()


async def test_only_its_own_subscription_wakes_it(node: Node, running: Any) -> None:
    go = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        await subscribe_then(ws, "0xmine")
        await go.wait()
        await ws.send(head("0xother", 1))  # another subscription's notification
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 7, "result": "0x1"}))  # a stray answer
        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "eth_subscription", "params": "0xmine"}))
        await ws.send(head("0xmine", 2))
        await ws.wait_closed()

    node.handler = handler
    heads = NewHeads(node.url)
    running(heads)
    await asyncio.wait_for(heads.subscribed.wait(), 10)
    assert not heads.wake.is_set()
    go.set()
    await asyncio.wait_for(heads.wake.wait(), 10)
    assert heads.heads == 1 and node.connections == 1


@pytest.mark.parametrize("behaviour", ["refuses", "garbage", "not-an-object", "oversized", "closes", "silent-answer"])
async def test_a_misbehaving_node_is_retried_and_never_stops_it(
    node: Node, running: Any, behaviour: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(ws: ServerConnection) -> None:
        if behaviour == "refuses":
            request = json.loads(await ws.recv())
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": request["id"],
                                      "error": {"code": -32601, "message": "subscriptions not supported"}}))
        elif behaviour == "garbage":
            await subscribe_then(ws)
            await ws.send(b"\xff\xfe not json")
        elif behaviour == "not-an-object":
            await ws.recv()
            await ws.send(json.dumps(["0x1"]))
        elif behaviour == "oversized":
            await subscribe_then(ws)
            await ws.send(json.dumps({"pad": "x" * (MAX_FRAME + 1)}))
        elif behaviour == "closes":
            await subscribe_then(ws)
            return  # the server closes at once
        elif behaviour == "silent-answer":
            await ws.recv()  # and never answers: the client gives up after open_timeout
        await ws.wait_closed()

    node.handler = handler
    heads = NewHeads(node.url, open_timeout=0.5, backoff_cap=0.2)
    caplog.set_level(logging.INFO, logger="microvm_blueprint.tangle.heads")
    running(heads)
    await until(lambda: node.connections >= 3, 20, "three attempts")  # it keeps retrying
    assert not heads.wake.is_set() and heads.heads == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one per outage, not one per attempt
    assert heads.outages == 1


async def test_an_outage_ends_when_the_node_is_back(node: Node, running: Any, caplog: pytest.LogCaptureFixture) -> None:
    healthy = False

    async def handler(ws: ServerConnection) -> None:
        if not healthy:
            await ws.close()
            return
        await announce_one_block(node, ws)

    node.handler = handler
    heads = NewHeads(node.url, backoff_cap=0.2)
    caplog.set_level(logging.INFO, logger="microvm_blueprint.tangle.heads")
    running(heads)
    await until(lambda: node.connections >= 2, 10, "retries")
    healthy = True
    await asyncio.wait_for(heads.wake.wait(), 10)
    assert heads.subscribed.is_set()
    messages = [r.getMessage() for r in caplog.records]
    assert any("unavailable" in m for m in messages) and any("is back" in m for m in messages), messages


async def test_no_url_secret_reaches_the_log(running: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="microvm_blueprint.tangle.heads")
    heads = NewHeads("ws://user:pw@127.0.0.1:9/v3/SECRETKEY?token=T0K3N", open_timeout=0.5, backoff_cap=0.2)
    running(heads)
    await until(lambda: heads.outages == 1, 10, "the first failure")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "ws://127.0.0.1:9/***" in text
    for secret in ("SECRETKEY", "T0K3N", "pw", "user"):
        assert secret not in text


@pytest.mark.parametrize(("url", "shown"), [
    ("https://eth.example/v2/KEY", "https://eth.example/***"),
    ("http://127.0.0.1:8545", "http://127.0.0.1:8545"),
    ("http://127.0.0.1:8545/", "http://127.0.0.1:8545"),
    ("wss://a:b@node.example:443/ws?key=K", "wss://node.example:443/***"),
    ("http://[::1]:8545/x", "http://[::1]:8545/***"),
    ("http://h:99999999", "(malformed URL)"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


async def test_a_bug_in_the_hint_is_logged_and_retried_not_fatal(
    node: Node, running: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong inside the subscription, the operator keeps running on its polls: an
    unexpected exception is logged with its traceback and the socket reopened."""
    from microvm_blueprint.tangle import heads as heads_module

    real_parse = heads_module._parse
    calls = 0

    def parse_once_broken(frame: str | bytes) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return real_parse(frame)

    monkeypatch.setattr(heads_module, "_parse", parse_once_broken)

    async def handler(ws: ServerConnection) -> None:
        await announce_one_block(node, ws)

    node.handler = handler
    heads = NewHeads(node.url, backoff_cap=0.2)
    caplog.set_level(logging.INFO, logger="microvm_blueprint.tangle.heads")
    running(heads)
    await asyncio.wait_for(heads.wake.wait(), 10)
    assert node.connections >= 2 and heads.subscribed.is_set()
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


@pytest.mark.parametrize("becomes", ["timeout", "nothing"])
async def test_a_swallowed_cancellation_still_stops_it(monkeypatch: pytest.MonkeyPatch, becomes: str) -> None:
    """Python 3.11's asyncio.timeout can turn a cancellation that meets the deadline into a
    TimeoutError, and a library may swallow one outright (a CI run hung in a teardown here); the
    service must stop anyway."""
    heads = NewHeads("ws://127.0.0.1:9", backoff_cap=0.05)
    entered = asyncio.Event()

    async def session_whose_cancel_becomes_a_timeout() -> None:
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            if becomes == "timeout":
                raise TimeoutError from None

    monkeypatch.setattr(heads, "_session", session_whose_cancel_becomes_a_timeout)
    task = asyncio.create_task(heads.run(asyncio.Event()))
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    await asyncio.wait({task}, timeout=10)  # waits without cancelling again: a swallow fails, not hangs
    assert task.done() and task.cancelled()
