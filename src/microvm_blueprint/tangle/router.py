"""Router: job index -> handler, with an optional ordering key per job (blueprint-sdk's Router)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .producer import JobCall

Handler = Callable[[JobCall], Awaitable[bytes]]
KeyFn = Callable[[JobCall], "str | None"]


@dataclass(frozen=True)
class Route:
    index: int
    name: str
    handler: Handler
    key: KeyFn | None


class Router:
    def __init__(self) -> None:
        self._routes: dict[int, Route] = {}

    def route(self, job_index: int, handler: Handler, *, name: str, key: KeyFn | None = None) -> Router:
        """Register ``handler`` for ``job_index``. ``key(call)`` orders calls: same key = one at a time,
        in call order; different keys run concurrently."""
        if not 0 <= job_index < 256:
            raise ValueError(f"job index {job_index} is not a uint8")
        if job_index in self._routes:
            raise ValueError(f"job index {job_index} is already routed to {self._routes[job_index].name}")
        self._routes[job_index] = Route(job_index, name, handler, key)
        return self

    def lookup(self, job_index: int) -> Route | None:
        return self._routes.get(job_index)

    def name_of(self, job_index: int) -> str:
        route = self._routes.get(job_index)
        return route.name if route else f"unknown({job_index})"

    def ordering_key(self, call: JobCall) -> str:
        route = self._routes.get(call.job_index)
        if route is None or route.key is None:
            return f"call:{call.call_id}"
        try:
            key = route.key(call)
        except Exception:
            key = None
        return f"key:{key}" if key is not None else f"call:{call.call_id}"
