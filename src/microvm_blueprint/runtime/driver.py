"""The VMM driver contract: the mechanics of one kind of VMM, below the lifecycle core.

:class:`~microvm_blueprint.runtime.lifecycle.Lifecycle` owns ids, the state x job table, the store,
quotas, per-VM ordering and the audit trail; it calls a driver only for a transition the table
allows, with the VM's lock held. A driver owns processes, sockets and files inside the folders it
is handed, and nothing else. Drivers never import each other.

Every method raises only :class:`~microvm_blueprint.runtime.errors.VmError` subclasses
(translating OSError, HTTP, QMP errors with ``raise ... from exc``), and on failure leaves the VM
as it found it where it can (a failed ``create`` leaves no process and no folder behind).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from .model import SnapshotRecord, VmHandle, VmRecord

ExitListener = Callable[[str, str], None]
"""Called by a driver as ``listener(vm_id, reason)`` when a VMM dies without being asked to."""


class VmmDriver(Protocol):
    """One kind of VMM (in-memory, QEMU, Firecracker)."""

    name: str

    def set_exit_listener(self, listener: ExitListener) -> None:
        """Register the lifecycle core's callback for VMMs that die unasked. Called once, before use."""

    def isolates_users(self) -> bool:
        """True if this driver spawns each VMM as the uid it is handed (:attr:`VmRecord.vmm_uid
        <microvm_blueprint.runtime.model.VmRecord.vmm_uid>`): a confined QEMU, a jailed Firecracker. The
        lifecycle core then gives every new VM a uid of its own from ``MICROVM_VMM_UID_RANGE``. Reads
        settings only: no I/O, raises nothing."""

    def tap_owner(self, vm: VmRecord) -> tuple[int, int] | None:
        """``(uid, gid)`` that must own ``vm``'s TAP device for its VMM to open it without privileges
        (``vm.vmm_uid`` where it has one, else the shared VMM user of ``runtime/confine.py`` or the
        jailer's user), or ``None`` when the VMM runs as the operator and a TAP needs no owner.

        Called by the lifecycle core each time it makes (or re-makes) ``vm``'s network, which hands it to
        ``ip tuntap add ... user U group G``. Reads settings only: no I/O, raises nothing."""

    async def create(self, vm: VmRecord) -> VmHandle | None:
        """Make ``vm`` exist configured but not running, in ``vm.workdir`` (created by the core).

        Called for create_vm. Raises ImageError (missing kernel/image) before spawning anything,
        VmmError/VmmTimeout if the VMM fails; cleans up its process on failure."""

    async def boot(self, vm: VmRecord) -> VmHandle | None:
        """``created`` -> ``running``: start the guest and wait (with a deadline) until it is ready.

        Raises VmmTimeout (with the console tail) if the guest never says it is ready."""

    async def pause(self, vm: VmRecord) -> None:
        """``running`` -> ``stopped``: pause vCPUs, memory kept."""

    async def resume(self, vm: VmRecord) -> None:
        """``stopped`` -> ``running``: resume a paused VM; ready when the VMM reports running."""

    async def snapshot(self, vm: VmRecord, snapdir: str) -> int:
        """Save ``vm`` into the empty folder ``snapdir`` and return its size in bytes.

        ``created``: config + disk. ``running``/``stopped``: memory + devices + disk; a running VM is
        paused for the save and resumed after. The VM's status is unchanged afterwards."""

    async def restore(self, vm: VmRecord, snapshot: SnapshotRecord) -> VmHandle | None:
        """Make the new VM ``vm`` (empty ``workdir``) from ``snapshot``, with its own disk copy,
        ending in ``snapshot.vm_status`` (``created``, ``running`` or ``stopped``)."""

    async def destroy(self, vm: VmRecord) -> None:
        """Stop the VMM (politely, then terminate, then kill), reap it and remove ``vm.workdir``.

        Idempotent: a VMM that is already gone is not an error. Snapshots are never touched."""

    async def delete_snapshot(self, snapshot: SnapshotRecord) -> None:
        """Remove the snapshot's folder. Idempotent."""

    async def alive(self, vm: VmRecord) -> bool:
        """True if the VMM of ``vm`` is present and answering (used by reconciliation)."""

    async def adopt(self, vm: VmRecord) -> bool:
        """Re-attach to a VMM left running by an earlier operator process; False if it is gone."""

    async def console(self, vm: VmRecord, tail_bytes: int) -> str:
        """The last ``tail_bytes`` of the guest console (empty if there is none)."""

    async def close(self, *, stop_vms: bool) -> None:
        """Release driver resources. ``stop_vms``: also stop every VMM this process started."""


@runtime_checkable
class OrphanRemover(Protocol):
    """A driver that keeps something outside the VM folders (the Firecracker jailer's chroots), which
    reconciliation asks to remove what no VM folder accounts for any more."""

    async def remove_orphans(self, vms_dir: Path, keep: set[str]) -> int:
        """Remove what belongs to VM folders in ``vms_dir`` other than those named in ``keep``; returns
        how many were removed. Never touches what belongs to folders elsewhere."""
