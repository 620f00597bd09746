"""The two faces of the runtime: :class:`VmProvider` changes state, :class:`VmQuery` only reads.

Jobs (``blueprint/jobs.py``) hold a ``VmProvider``; the query API (``blueprint/query.py``) holds
only a ``VmQuery``, so the HTTP side cannot change anything by construction.
"""

from __future__ import annotations

from typing import Protocol

from .model import Origin, SnapshotView, VmSpec, VmView


class VmQuery(Protocol):
    """Read-only questions about VMs. Called by the query API; never changes anything."""

    async def get_vm(self, vm_id: str) -> VmView:
        """One VM (tombstones included). Raises VmNotFound, InvalidInput for a malformed id."""

    async def list_vms(self, *, limit: int | None = None, after: str | None = None) -> list[VmView]:
        """VMs sorted by id; ``after`` = exclusive start, ``limit`` = page size."""

    async def list_snapshots(self, vm_id: str) -> list[SnapshotView]:
        """Snapshots of a VM in creation order. Raises VmNotFound."""

    async def get_snapshot(self, vm_id: str, snapshot_id: str) -> SnapshotView:
        """One snapshot. Raises VmNotFound, SnapshotNotFound."""

    async def console(self, vm_id: str, tail_bytes: int = 16384) -> str:
        """The end of the guest console. Raises VmNotFound."""


class VmProvider(VmQuery, Protocol):
    """State changes, one per lifecycle job (DESIGN.md §5). Called by the job handlers.

    Every method validates its ids first (InvalidInput), applies the state x job table
    (InvalidTransition), records the change with ``origin`` in one store transaction, and is
    idempotent per ``origin.call_id``: a replayed call returns (or raises) what it did the first time.
    """

    async def create_vm(self, vm_id: str, spec: VmSpec | None, origin: Origin) -> VmView:
        """New VM in ``created``. Raises VmAlreadyExists (tombstones too), QuotaExceeded, ImageError."""

    async def start_vm(self, vm_id: str, origin: Origin) -> VmView:
        """``created`` boots / ``stopped`` resumes -> ``running``."""

    async def stop_vm(self, vm_id: str, origin: Origin) -> VmView:
        """``running`` -> ``stopped`` (paused, memory kept)."""

    async def snapshot_vm(self, vm_id: str, snapshot_id: str, origin: Origin) -> SnapshotView:
        """Save state; status unchanged. Raises SnapshotAlreadyExists."""

    async def destroy_vm(self, vm_id: str, origin: Origin) -> VmView:
        """VMM gone, runtime files removed -> ``destroyed`` (tombstone kept, snapshots kept)."""

    async def restore_vm(self, source_vm_id: str, snapshot_id: str, new_vm_id: str, origin: Origin) -> VmView:
        """New VM from a snapshot, in the status the snapshot was taken in."""

    async def delete_snapshot(self, vm_id: str, snapshot_id: str, origin: Origin) -> None:
        """Remove a snapshot's files and name. Raises SnapshotNotFound."""

    async def reconcile(self) -> str:
        """At start: re-adopt live VMMs, mark vanished ones failed, clean orphans. Returns a summary."""

    async def close(self, *, stop_vms: bool = False) -> None:
        """Release resources; by default customer VMs are left running (re-adopted next start)."""
