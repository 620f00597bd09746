"""Job-log and new-block wake-ups over the node's WebSocket (``WS_RPC_URL``).

Without a WebSocket the producer polls over HTTP every ``POLL_INTERVAL`` (1 s by default), so a job
waits half an interval on average before it is seen. With one, :class:`NewHeads` keeps two
subscriptions open on one socket: ``eth_subscribe("logs", {address, topics})`` for our contract's
``JobSubmitted`` / ``JobSubmittedFromQuote`` logs of our service, and ``eth_subscribe("newHeads")``.
A job log sets :attr:`NewHeads.wake` and the producer polls at once instead of sleeping out its
interval. A new block alone wakes nothing: it only counts (the result sender looks for receipts at a
new block) and tells when a log announced earlier is due (``CONFIRMATIONS`` blocks deep) or not read
yet (the HTTP node was a block behind the WebSocket one). So an idle operator sends the same requests
on a chain mining ten blocks a second as on one mining one a minute: its interval polls.

The subscriptions are only hints. Logs are still read over HTTP from the persisted cursor and the
interval poll goes on (it also covers what a socket missed: notifications lost while it was down or
before it opened), so a dropped, refused or silent socket costs latency, never a job: it is reopened
with capped backoff, with one warning per outage and one line when it is back. Whatever the socket
sends is hostile until parsed: oversized frames close it (``max_size``), anything that is not a
notification of our subscriptions is ignored, and the URL is redacted in every message (providers
put API keys in it).

Without a log filter (``logs=None``) every announced block is a wake-up, as before the log
subscription existed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from .producer import Backoff
from .rpc import redact_url

log = logging.getLogger(__name__)

#: A block header is about 600 bytes of JSON, a job log its inputs in hex plus ~1 KiB; inputs above
#: ``abi.MAX_INPUT_BYTES`` (64 KiB) are refused anyway. A larger frame closes the socket (the interval
#: poll reads that log) rather than letting a node or a customer make us buffer without bound.
MAX_FRAME = 512 * 1024

_HEADS_ID, _LOGS_ID = 1, 2


class SubscriptionRefused(Exception):
    """The node answered ``eth_subscribe`` with an error or an unexpected shape."""


class NewHeads:
    """A background service (see ``runner.BackgroundService``): ``run(ready)`` until cancelled.

    ``wake`` is set when a poll is due before the interval: a job log was announced (and is
    ``confirmations`` blocks deep), or, without a log filter, any block was. The producer clears it
    before it polls and reports how far it read with :meth:`read_to`. ``subscribed`` is set while
    the subscriptions are open (tests and status wait on it); ``heads`` counts announced blocks and
    ``logs`` announced job logs.
    """

    name = "new-heads"

    def __init__(self, url: str, *, logs: dict[str, Any] | None = None, confirmations: int = 0,
                 open_timeout: float = 10.0, backoff_cap: float = 30.0, stable_after: float = 10.0) -> None:
        self.url = url
        self.log_filter = logs  # eth_subscribe("logs", ...)'s filter: {"address": ..., "topics": [...]}
        self.confirmations = max(0, confirmations)
        self.open_timeout = open_timeout
        self.backoff_cap = backoff_cap
        self.stable_after = stable_after  # a session this long ends an outage (a flapping one does not)
        self.wake = asyncio.Event()
        self.subscribed = asyncio.Event()
        self.heads = 0
        self.logs = 0
        self.head = -1  # the newest block announced
        self.outages = 0
        self._unread = -1  # the newest block holding an announced job log
        self._read = 0  # the producer has read every log below this block (read_to)
        self._opened_at: float | None = None
        self._in_outage = False
        self._said_back = False

    def read_to(self, next_block: int) -> None:
        """The producer read every log before ``next_block`` (its cursor; lower after a reorg). A log
        announced at or above it keeps waking the poll at each new block until it is read."""
        self._read = next_block

    def _log_due(self) -> bool:
        return self._unread >= self._read and self._unread + self.confirmations <= self.head

    def _on_head(self, header: Any) -> None:
        self.heads += 1
        number = _block_number(header)
        if number is not None:
            self.head = max(self.head, number)
        if self.log_filter is None or self._log_due():
            self.wake.set()

    def _on_log(self, entry: Any) -> None:
        self.logs += 1
        block = _block_number(entry)
        if block is None or (isinstance(entry, dict) and entry.get("removed")):
            self.wake.set()  # unreadable or reorged out: the poll finds out what changed
            return
        self._unread = max(self._unread, block)
        self.head = max(self.head, block)  # its block exists, whether or not its header came first
        if self._log_due():
            self.wake.set()

    async def run(self, ready: asyncio.Event) -> None:
        """Keep the subscriptions open until cancelled. Never raises otherwise: the producer's own
        polling covers every gap, so a bad socket is not a reason to stop the operator."""
        ready.set()  # nothing waits for a hint
        loop = asyncio.get_running_loop()
        backoff = Backoff(base=0.5, cap=self.backoff_cap)
        while True:
            self._opened_at = None
            try:
                await self._session()
                reason = "the node closed it"
            except (OSError, TimeoutError, WebSocketException, ValueError, SubscriptionRefused) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                reason = reason.replace(self.url, redact_url(self.url))  # InvalidURI quotes it whole
            except Exception:  # a bug here must not stop the operator: polling covers for the hint
                log.exception("chain subscription at %s: unexpected error", redact_url(self.url))
                reason = "unexpected error (logged above)"
            _reraise_if_cancelling()  # however the session ended, a pending cancellation wins
            self.subscribed.clear()
            if self._opened_at is not None and loop.time() - self._opened_at >= self.stable_after:
                backoff.reset()  # it had been up a while: this is a fresh outage
                self._in_outage = False
            delay = backoff.next()
            if not self._in_outage:
                self._in_outage, self._said_back = True, False
                self.outages += 1
                log.warning("chain subscription at %s unavailable (%s); polling every interval meanwhile, "
                            "retrying in %.1fs", redact_url(self.url), _short(reason), delay)
            await asyncio.sleep(delay)

    def _opened(self) -> None:
        self._opened_at = asyncio.get_running_loop().time()
        self.subscribed.set()
        if not self._in_outage:
            log.info("chain subscription open at %s: jobs are seen as their block arrives", redact_url(self.url))
        elif not self._said_back:
            self._said_back = True
            log.info("chain subscription at %s is back", redact_url(self.url))

    async def _session(self) -> None:
        async with connect(self.url, open_timeout=self.open_timeout, max_size=MAX_FRAME,
                           close_timeout=2) as ws:
            requests: dict[int, list[Any]] = {_HEADS_ID: ["newHeads"]}
            if self.log_filter is not None:
                requests[_LOGS_ID] = ["logs", self.log_filter]
            for request_id, params in requests.items():
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "eth_subscribe",
                                          "params": params}))
            subs = await self._subscriptions(ws, set(requests))
            self._opened()
            async for frame in ws:
                self._dispatch(_parse(frame), subs)

    async def _subscriptions(self, ws: ClientConnection, pending: set[int]) -> dict[str, int]:
        """Subscription id -> request id, once the node has answered every request (notifications of
        a subscription already answered are handled meanwhile; the node sends its answer first)."""
        subs: dict[str, int] = {}
        async with asyncio.timeout(self.open_timeout):
            while pending:
                message = _parse(await ws.recv())
                request_id = message.get("id")
                if request_id not in pending:
                    self._dispatch(message, subs)
                    continue
                sub = message.get("result")
                if not isinstance(sub, str) or not sub or len(sub) > 200:
                    error = message.get("error")
                    detail = error.get("message") if isinstance(error, dict) else None
                    raise SubscriptionRefused(f"eth_subscribe refused: {_short(str(detail or 'unexpected answer'))}")
                subs[sub] = request_id
                pending.discard(request_id)
        return subs

    def _dispatch(self, message: dict[str, Any], subs: dict[str, int]) -> None:
        params = message.get("params")
        if message.get("method") != "eth_subscription" or not isinstance(params, dict):
            return
        kind = subs.get(str(params.get("subscription")))
        if kind == _HEADS_ID:
            self._on_head(params.get("result"))
        elif kind == _LOGS_ID:
            self._on_log(params.get("result"))


def _block_number(value: Any) -> int | None:
    """``blockNumber`` of a log, ``number`` of a header; ``None`` when absent or malformed."""
    if not isinstance(value, dict):
        return None
    raw = value.get("blockNumber", value.get("number"))
    if not isinstance(raw, str) or raw[:2] not in ("0x", "0X") or len(raw) > 18:
        return None
    try:
        return int(raw, 16)
    except ValueError:
        return None


def _reraise_if_cancelling() -> None:
    """A cancellation that arrived while a timeout fired comes out of Python 3.11's ``asyncio.timeout``
    (used inside the WebSocket handshake) as ``TimeoutError``, and a library may swallow one outright;
    retrying then would keep the service alive forever. Give the cancellation back."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _parse(frame: str | bytes) -> dict[str, Any]:
    message = json.loads(frame)  # ValueError (JSONDecodeError, UnicodeDecodeError) on garbage
    if not isinstance(message, dict):
        raise ValueError("a JSON-RPC message that is not an object")
    return message


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
