"""Firecracker driver: one ``firecracker --api-sock`` process per VM, REST over its Unix socket.

Split along its seams: :mod:`.settings` (``MICROVM_FIRECRACKER_*``), :mod:`.api` (the HTTP client
and the mapping of its failures into the runtime error tree) and :mod:`.driver` (the
:class:`~microvm_blueprint.runtime.driver.VmmDriver`; its docstring describes the lifecycle).
"""

from __future__ import annotations

from .api import FirecrackerApi, api_refusal, map_api_error
from .driver import FirecrackerDriver
from .settings import READY_LINE, FirecrackerSettings

__all__ = ["READY_LINE", "FirecrackerApi", "FirecrackerDriver", "FirecrackerSettings", "api_refusal", "map_api_error"]
