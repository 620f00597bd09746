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
        return f"ws://127.0.0.1:{next(iter(self.server.sockets)).getsockname()[1]}"


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


# ---- with a job-log filter (as the operator runs it): logs wake, blocks only count ----

FILTER = {"address": "0x0165878A594ca255338adfa4d48449f69242Eb8F", "topics": [["0xaa", "0xbb"], "0x00"]}


def job_log(sub: str, block: int, *, removed: bool = False) -> str:
    return json.dumps({"jsonrpc": "2.0", "method": "eth_subscription", "params": {
        "subscription": sub, "result": {"blockNumber": hex(block), "logIndex": "0x0", "removed": removed}}})


class TwoSubscriptions:
    """A node that accepts newHeads ("0xh") and logs ("0xl"), answering the logs request first with a
    block announced in between (the order a node may choose), then sends what the test queues."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.frames: asyncio.Queue[str] = asyncio.Queue()

    async def __call__(self, ws: ServerConnection) -> None:
        first, second = json.loads(await ws.recv()), json.loads(await ws.recv())
        self.requests += [first, second]
        by_kind = {r["params"][0]: r["id"] for r in (first, second)}
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": by_kind["newHeads"], "result": "0xh"}))
        await ws.send(head("0xh", 10))  # before the logs subscription is confirmed
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": by_kind["logs"], "result": "0xl"}))
        closed = asyncio.ensure_future(ws.wait_closed())
        while True:  # until the client goes (a handler blocked on the queue would hold the server open)
            frame = asyncio.ensure_future(self.frames.get())
            await asyncio.wait({frame, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not frame.done():
                frame.cancel()
                return
            await ws.send(frame.result())


async def test_a_job_log_wakes_it_and_a_block_alone_does_not(node: Node, running: Any) -> None:
    server = TwoSubscriptions()
    node.handler = server
    heads = NewHeads(node.url, logs=FILTER)
    running(heads)
    await asyncio.wait_for(heads.subscribed.wait(), 10)
    assert [r["params"] for r in server.requests] == [["newHeads"], ["logs", FILTER]]
    await until(lambda: heads.heads == 1, 10, "the block announced during the handshake")
    for n in (11, 12, 13):
        await server.frames.put(head("0xh", n))
    await until(lambda: heads.heads == 4, 10, "three more blocks")
    assert not heads.wake.is_set() and heads.head == 13  # blocks are counted, they wake nothing
    await server.frames.put(job_log("0xl", 14))
    await asyncio.wait_for(heads.wake.wait(), 10)
    assert heads.logs == 1
    # the producer polled but its node was a block behind: the log is still unread, so the next block wakes it
    heads.wake.clear()
    heads.read_to(14)
    await server.frames.put(head("0xh", 14))
    await asyncio.wait_for(heads.wake.wait(), 10)
    # read now: later blocks wake nothing again
    heads.wake.clear()
    heads.read_to(15)
    await server.frames.put(head("0xh", 15))
    await until(lambda: heads.heads == 6, 10, "block 15")
    assert not heads.wake.is_set()
    # a log taken back by a reorg wakes the poll (its reorg check finds out what changed)
    await server.frames.put(job_log("0xl", 15, removed=True))
    await asyncio.wait_for(heads.wake.wait(), 10)


async def test_a_log_wakes_it_only_once_it_has_its_confirmations(node: Node, running: Any) -> None:
    server = TwoSubscriptions()
    node.handler = server
    heads = NewHeads(node.url, logs=FILTER, confirmations=2)
    running(heads)
    await asyncio.wait_for(heads.subscribed.wait(), 10)
    await until(lambda: heads.head == 10, 10, "block 10")
    await server.frames.put(job_log("0xl", 11))
    await server.frames.put(head("0xh", 11))
    await server.frames.put(head("0xh", 12))
    await until(lambda: heads.heads == 3 and heads.logs == 1, 10, "the log and blocks 11-12")
    assert not heads.wake.is_set()  # block 11 is one confirmation short at head 12
    await server.frames.put(head("0xh", 13))
    await asyncio.wait_for(heads.wake.wait(), 10)


async def test_a_refused_log_subscription_is_an_outage_not_a_head_waker(
    node: Node, running: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A node that refuses logs subscriptions: the operator polls every interval (as without a
    WebSocket) and retries, rather than falling back to a poll per block."""
    async def handler(ws: ServerConnection) -> None:
        first, second = json.loads(await ws.recv()), json.loads(await ws.recv())
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": first["id"], "result": "0xh"}))
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": second["id"],
                                  "error": {"code": -32601, "message": "logs subscriptions not supported"}}))
        await ws.wait_closed()

    node.handler = handler
    heads = NewHeads(node.url, logs=FILTER, backoff_cap=0.2)
    caplog.set_level(logging.INFO, logger="microvm_blueprint.tangle.heads")
    running(heads)
    await until(lambda: node.connections >= 3, 20, "three attempts")
    assert not heads.subscribed.is_set() and not heads.wake.is_set() and heads.outages == 1
    assert any("logs subscriptions not supported" in r.getMessage() for r in caplog.records)
