"""The lifecycle jobs (DESIGN.md §5): decode the call, apply it through a ``VmProvider``, encode ``true``.

The job table :data:`JOBS` is the single source of job ids, names and argument types: the router,
the ``jobs submit`` client and the docs all read it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MicrovmBlueprintError, TransientError
from ..runtime.model import Origin, VmSpec
from ..runtime.provider import VmProvider
from ..tangle.abi import encode_result
from ..tangle.calls import JobCall
from ..tangle.errors import JobError
from ..tangle.router import Args, Handler, Router

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobDef:
    """One lifecycle job: its on-chain index, name, and argument tuple."""

    index: int
    name: str
    arg_types: tuple[str, ...]
    arg_names: tuple[str, ...]
    summary: str

    @property
    def signature(self) -> str:
        args = ", ".join(f"{t} {n}" for t, n in zip(self.arg_types, self.arg_names, strict=True))
        return f"{self.name}({args}) -> bool"


JOBS: tuple[JobDef, ...] = (
    JobDef(0, "create_vm", ("string",), ("vm_id",), "new VM with the default spec, status created"),
    JobDef(1, "start_vm", ("string",), ("vm_id",), "created boots / stopped resumes -> running"),
    JobDef(2, "stop_vm", ("string",), ("vm_id",), "running -> stopped (paused, memory kept)"),
    JobDef(3, "snapshot_vm", ("string", "string"), ("vm_id", "snapshot_id"), "save state; status unchanged"),
    JobDef(4, "destroy_vm", ("string",), ("vm_id",), "VMM gone, files removed -> destroyed"),
    JobDef(
        5,
        "restore_vm",
        ("string", "string", "string"),
        ("source_vm_id", "snapshot_id", "new_vm_id"),
        "new VM from a snapshot, in the status it was taken in",
    ),
    JobDef(
        6,
        "create_vm_with_spec",
        ("string", "uint32", "uint32", "string"),
        ("vm_id", "vcpus", "mem_mib", "image"),
        "as create_vm with a spec; empty image = default",
    ),
    JobDef(7, "delete_snapshot", ("string", "string"), ("vm_id", "snapshot_id"), "remove a snapshot"),
    JobDef(
        8,
        "create_vm_with_config",
        ("string", "uint32", "uint32", "uint32", "string", "string[]", "uint16[]"),
        ("vm_id", "vcpus", "mem_mib", "disk_mib", "image", "ssh_authorized_keys", "ports"),
        "as create_vm_with_spec, plus a disk size, root's SSH keys and published guest ports",
    ),
)
JOBS_BY_NAME = {j.name: j for j in JOBS}
JOBS_BY_INDEX = {j.index: j for j in JOBS}

TRUE = encode_result("bool", True)


def _origin(call: JobCall) -> Origin:
    return Origin(call_id=call.call_id, caller=call.caller)


def _key_for(job: JobDef) -> Callable[[JobCall, Args], str | None]:
    """Per-VM ordering key: the VM the job changes (restore: the new VM), from the decoded arguments."""
    position = job.arg_names.index("new_vm_id") if "new_vm_id" in job.arg_names else 0

    def key(call: JobCall, args: Args) -> str | None:
        value = args[position] if len(args) > position else None
        return value if isinstance(value, str) else None

    return key


Apply = Callable[[VmProvider, Sequence[Any], Origin], Awaitable[object]]

_APPLY: dict[str, Apply] = {
    "create_vm": lambda p, a, o: p.create_vm(a[0], None, o),
    "start_vm": lambda p, a, o: p.start_vm(a[0], o),
    "stop_vm": lambda p, a, o: p.stop_vm(a[0], o),
    "snapshot_vm": lambda p, a, o: p.snapshot_vm(a[0], a[1], o),
    "destroy_vm": lambda p, a, o: p.destroy_vm(a[0], o),
    "restore_vm": lambda p, a, o: p.restore_vm(a[0], a[1], a[2], o),
    "create_vm_with_spec": lambda p, a, o: p.create_vm(a[0], VmSpec(vcpus=a[1], mem_mib=a[2], image=a[3]), o),
    "delete_snapshot": lambda p, a, o: p.delete_snapshot(a[0], a[1], o),
    "create_vm_with_config": lambda p, a, o: p.create_vm(
        a[0], VmSpec(vcpus=a[1], mem_mib=a[2], disk_mib=a[3], image=a[4], ssh_keys=tuple(a[5]), ports=tuple(a[6])), o
    ),
}


def make_handler(job: JobDef, provider: VmProvider) -> Handler:
    """The job's handler: ``args`` are its inputs, decoded once by the router (``job.arg_types``). A
    :class:`TransientError` passes through (the runner retries it); any other error of ours is the job's
    failure text."""
    apply = _APPLY[job.name]

    async def handler(call: JobCall, args: Args) -> bytes:
        try:
            await apply(provider, args, _origin(call))
        except (JobError, TransientError):
            raise
        except MicrovmBlueprintError as exc:
            raise JobError(str(exc)) from exc
        return TRUE

    handler.__name__ = job.name
    return handler


def build_router(provider: VmProvider, *, jobs: Sequence[JobDef] = JOBS) -> Router:
    """A router with every lifecycle job wired to ``provider``."""
    router = Router()
    for job in jobs:
        router.route(job.index, make_handler(job, provider), name=job.name, key=_key_for(job), args=job.arg_types)
    return router
