"""New-block wake-ups over the node's WebSocket (``WS_RPC_URL``).

Without a WebSocket the producer polls over HTTP every ``POLL_INTERVAL`` (1 s by default), so a job
waits half an interval on average before it is seen. With one, :class:`NewHeads` keeps an
``eth_subscribe("newHeads")`` open and sets :attr:`NewHeads.wake` on every block the node announces;
the producer polls at once instead of sleeping out its interval.

The subscription is only a hint. Logs are still read over HTTP from the persisted cursor and the
interval poll goes on, so a dropped, refused or silent socket costs latency, never a job: it is
reopened with capped backoff, with one warning per outage and one line when it is back. Whatever the
socket sends is hostile until parsed: oversized frames close it (``max_size``), anything that is not a
notification of our subscription is ignored, and the URL is redacted in every message (providers put
API keys in it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from .producer import Backoff
from .rpc import redact_url

log = logging.getLogger(__name__)

#: A block header is about 600 bytes of JSON; anything near this is not a newHeads notification.
MAX_FRAME = 64 * 1024


class SubscriptionRefused(Exception):
    """The node answered ``eth_subscribe`` with an error or an unexpected shape."""


class NewHeads:
    """A background service (see ``runner.BackgroundService``): ``run(ready)`` until cancelled.

    ``wake`` is set on each announced block; the producer clears it before it polls. ``subscribed``
    is set while a subscription is open (tests and status wait on it); ``heads`` counts
    announcements.
    """

    name = "new-heads"

    def __init__(self, url: str, *, open_timeout: float = 10.0, backoff_cap: float = 30.0,
                 stable_after: float = 10.0) -> None:
        self.url = url
        self.open_timeout = open_timeout
        self.backoff_cap = backoff_cap
        self.stable_after = stable_after  # a session this long ends an outage (a flapping one does not)
        self.wake = asyncio.Event()
        self.subscribed = asyncio.Event()
        self.heads = 0
        self.outages = 0
        self._opened_at: float | None = None
        self._in_outage = False
        self._said_back = False

    async def run(self, ready: asyncio.Event) -> None:
        """Keep the subscription open until cancelled. Never raises otherwise: the producer's own
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
                log.exception("new-block subscription at %s: unexpected error", redact_url(self.url))
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
                log.warning("new-block subscription at %s unavailable (%s); polling every interval meanwhile, "
                            "retrying in %.1fs", redact_url(self.url), _short(reason), delay)
            await asyncio.sleep(delay)

    def _opened(self) -> None:
        self._opened_at = asyncio.get_running_loop().time()
        self.subscribed.set()
        if not self._in_outage:
            log.info("new-block subscription open at %s: jobs are seen as their block arrives",
                     redact_url(self.url))
        elif not self._said_back:
            self._said_back = True
            log.info("new-block subscription at %s is back", redact_url(self.url))

    async def _session(self) -> None:
        async with connect(self.url, open_timeout=self.open_timeout, max_size=MAX_FRAME,
                           close_timeout=2) as ws:
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe",
                                      "params": ["newHeads"]}))
            answer = _parse(await asyncio.wait_for(ws.recv(), self.open_timeout))
            sub = answer.get("result") if answer.get("id") == 1 else None
            if not isinstance(sub, str) or not sub or len(sub) > 200:
                error = answer.get("error")
                detail = error.get("message") if isinstance(error, dict) else None
                raise SubscriptionRefused(f"eth_subscribe refused: {_short(str(detail or 'unexpected answer'))}")
            self._opened()
            async for frame in ws:
                message = _parse(frame)
                params = message.get("params")
                if (message.get("method") == "eth_subscription" and isinstance(params, dict)
                        and params.get("subscription") == sub):
                    self.heads += 1
                    self.wake.set()


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
