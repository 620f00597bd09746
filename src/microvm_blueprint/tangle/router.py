"""Router: job index -> handler, with the job's argument types and an optional ordering key per job
(blueprint-sdk's Router). A call's inputs are decoded once, here: the ordering key and the handler both
get the decoded arguments."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .abi import decode_args
from .calls import JobCall
from .errors import AbiDecodeError

Args = tuple[Any, ...]
Handler = Callable[[JobCall, Args], Awaitable[bytes]]
KeyFn = Callable[[JobCall, Args], "str | None"]


@dataclass(frozen=True)
class Route:
    index: int
    name: str
    handler: Handler
    key: KeyFn | None
    #: The job's argument tuple (ABI types); ``None``: the handler gets ``()`` and reads ``call.inputs``.
    arg_types: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Routed:
    """One call, looked up and decoded once: all the runner needs to order and run it."""

    call: JobCall
    name: str
    route: Route | None
    #: The decoded arguments (``()`` when the route declares none, or when ``refused``).
    args: Args
    #: Why the call cannot run (unknown job index, inputs that do not decode): the job's failure text.
    refused: str | None
    #: Same key = one at a time, in call order; a call without a key gets its own (``call:<id>``).
    key: str


class Router:
    def __init__(self) -> None:
        self._routes: dict[int, Route] = {}

    def route(self, job_index: int, handler: Handler, *, name: str, key: KeyFn | None = None,
              args: Sequence[str] | None = None) -> Router:
        """Register ``handler`` for ``job_index``; ``args`` are the ABI types its inputs decode as.
        ``key(call, args)`` orders calls: same key = one at a time, in call order; different keys run
        concurrently."""
        if not 0 <= job_index < 256:
            raise ValueError(f"job index {job_index} is not a uint8")
        if job_index in self._routes:
            raise ValueError(f"job index {job_index} is already routed to {self._routes[job_index].name}")
        self._routes[job_index] = Route(job_index, name, handler, key, tuple(args) if args is not None else None)
        return self

    def lookup(self, job_index: int) -> Route | None:
        return self._routes.get(job_index)

    def name_of(self, job_index: int) -> str:
        route = self._routes.get(job_index)
        return route.name if route else f"unknown({job_index})"

    def prepare(self, call: JobCall) -> Routed:
        """Look ``call`` up, decode its inputs (once) and find its ordering key. Never raises: a key
        function that fails gives the call its own key."""
        own = f"call:{call.call_id}"
        route = self._routes.get(call.job_index)
        if route is None:
            return Routed(call, self.name_of(call.job_index), None, (), f"unknown job index {call.job_index}", own)
        args: Args = ()
        if route.arg_types is not None:
            try:
                args = decode_args(route.arg_types, call.inputs)
            except AbiDecodeError as exc:
                return Routed(call, route.name, route, (), str(exc) or type(exc).__name__, own)
        key: str | None = None
        if route.key is not None:
            try:
                key = route.key(call, args)
            except Exception:
                key = None
        return Routed(call, route.name, route, args, None, f"key:{key}" if key is not None else own)
