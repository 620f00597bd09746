"""The Firecracker API client: HTTP/1.1 over one VM's Unix socket, every failure mapped into the runtime tree."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

import httpx

from ...errors import VmmApiError, VmmError, VmmTimeout


def map_api_error(exc: BaseException, what: str, timeout_ms: int | None = None) -> VmmError:
    """Translate a foreign failure of one API call (httpx, OS, JSON) into the runtime error tree.

    In the spirit of httpx's ``map_httpcore_exceptions``: timeouts become :class:`VmmTimeout`,
    a malformed answer :class:`VmmApiError`, everything else (socket gone, connection refused or
    reset, broken HTTP) :class:`VmmError`. The message names the call, never a secret."""
    detail = f"{type(exc).__name__}: {exc}"[:300]
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        within = f" within {timeout_ms} ms" if timeout_ms is not None else ""
        return VmmTimeout(f"firecracker API did not answer {what}{within}")
    if isinstance(exc, httpx.ConnectError | FileNotFoundError | ConnectionRefusedError):
        return VmmError(f"firecracker API socket unreachable for {what} ({detail})")
    if isinstance(exc, httpx.ProtocolError):
        return VmmError(f"firecracker API broke the HTTP protocol on {what} ({detail})")
    if isinstance(exc, httpx.HTTPError | httpx.InvalidURL | OSError):
        return VmmError(f"firecracker API call {what} failed ({detail})")
    if isinstance(exc, ValueError):  # json.JSONDecodeError, UnicodeDecodeError
        return VmmApiError(f"firecracker API answered {what} with malformed JSON ({detail})")
    return VmmError(f"firecracker API call {what} failed ({detail})")


def api_refusal(status: int, content: bytes, what: str) -> VmmApiError:
    """A non-2xx answer: :class:`VmmApiError` carrying the status and Firecracker's ``fault_message``."""
    fault = ""
    try:
        payload = json.loads(content) if content else None
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("fault_message"), str):
        fault = payload["fault_message"]
    elif content:
        fault = content.decode("utf-8", "replace")
    fault = fault.strip()[:1000]
    return VmmApiError(f"firecracker refused {what} (HTTP {status}): {fault or 'no detail'}", status=status, body=fault)


class FirecrackerApi:
    """HTTP/1.1 over one VM's Unix socket; each call bounded by the API timeout.

    ``transport`` is for tests (``httpx.MockTransport``); by default the client connects to ``socket``."""

    def __init__(self, socket: str, timeout_ms: int, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.socket = socket
        self.timeout_ms = timeout_ms
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            transport = self._transport or httpx.AsyncHTTPTransport(uds=self.socket)
            self._client = httpx.AsyncClient(
                transport=transport, base_url="http://localhost", timeout=self.timeout_ms / 1000
            )
        return self._client

    async def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """One request. Returns the decoded JSON body (``None`` for 204); raises only VmmError."""
        what = f"{method} {path}"
        try:
            response = await self._http().request(method, path, json=dict(body) if body is not None else None)
            content = response.content
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
            raise map_api_error(exc, what, self.timeout_ms) from exc
        if not 200 <= response.status_code < 300:
            raise api_refusal(response.status_code, content, what)
        if not content:
            return None
        try:
            return json.loads(content)
        except ValueError as exc:
            raise map_api_error(exc, what) from exc

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
