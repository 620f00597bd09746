"""The in-memory driver: no VMM, every transition succeeds instantly.

It is the default provider (as in the original) and a real implementation: combined with
:class:`~microvm_blueprint.runtime.lifecycle.Lifecycle` it enforces the full lifecycle contract,
persists through the store, and writes snapshot manifests so restore and sizes behave as with a
real VMM. A simulated console records what happened to each VM.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..driver import ExitListener
from ..errors import VmmError
from ..model import SnapshotRecord, VmHandle, VmRecord

_CONSOLE_CAP = 64 * 1024


class InMemoryDriver:
    """A VMM that lives in this process's memory. ``alive`` is true for VMs it created or adopted."""

    name = "in-memory"

    def __init__(self) -> None:
        self._live: set[str] = set()
        self._console: dict[str, str] = {}
        self._listener: ExitListener | None = None

    def set_exit_listener(self, listener: ExitListener) -> None:
        self._listener = listener

    def isolates_users(self) -> bool:
        """No VMM process, so no user to run it as."""
        return False

    def tap_owner(self, vm: VmRecord) -> tuple[int, int] | None:
        """No VMM process, so no TAP to own."""
        return None

    def _say(self, vm: VmRecord, line: str) -> None:
        text = self._console.get(vm.vm_id, "") + f"[{time.time():.3f}] {line}\n"
        self._console[vm.vm_id] = text[-_CONSOLE_CAP:]

    async def create(self, vm: VmRecord) -> VmHandle | None:
        self._live.add(vm.vm_id)
        self._say(vm, f"created: {vm.spec.vcpus} vcpu(s), {vm.spec.mem_mib} MiB, image {vm.spec.image}")
        return VmHandle(extra={"driver": self.name})

    async def boot(self, vm: VmRecord) -> VmHandle | None:
        self._require(vm)
        self._say(vm, "booted: MICROVM-READY")
        return vm.handle

    async def pause(self, vm: VmRecord) -> None:
        self._require(vm)
        self._say(vm, "paused")

    async def resume(self, vm: VmRecord) -> None:
        self._require(vm)
        self._say(vm, "resumed")

    async def snapshot(self, vm: VmRecord, snapdir: str) -> int:
        self._require(vm)
        manifest = {"vm_id": vm.vm_id, "status": vm.status.value, "spec": vm.spec.to_json(), "driver": self.name}
        data = json.dumps(manifest, sort_keys=True).encode()
        Path(snapdir, "manifest.json").write_bytes(data)
        self._say(vm, "snapshot saved")
        return len(data)

    async def restore(self, vm: VmRecord, snapshot: SnapshotRecord) -> VmHandle | None:
        manifest = Path(snapshot.path, "manifest.json")
        if not manifest.is_file():
            raise VmmError(f"snapshot '{snapshot.snapshot_id}' of vm '{snapshot.vm_id}' has no manifest")
        self._live.add(vm.vm_id)
        self._say(vm, f"restored from snapshot '{snapshot.snapshot_id}' of vm '{snapshot.vm_id}'")
        return VmHandle(extra={"driver": self.name})

    async def destroy(self, vm: VmRecord) -> None:
        self._live.discard(vm.vm_id)
        self._console.pop(vm.vm_id, None)

    async def delete_snapshot(self, snapshot: SnapshotRecord) -> None:
        return None

    async def alive(self, vm: VmRecord) -> bool:
        return vm.vm_id in self._live

    async def adopt(self, vm: VmRecord) -> bool:
        # An in-memory VMM survives an operator restart only in the sense that nothing real died:
        # its state is the store's, so it is re-created on adoption.
        self._live.add(vm.vm_id)
        self._say(vm, "adopted after operator restart")
        return True

    async def console(self, vm: VmRecord, tail_bytes: int) -> str:
        text = self._console.get(vm.vm_id, "")
        return text[-tail_bytes:] if tail_bytes else ""

    async def close(self, *, stop_vms: bool) -> None:
        if stop_vms:
            self._live.clear()

    def kill(self, vm_id: str, reason: str = "killed") -> None:
        """Simulate a VMM dying behind the operator's back (for tests and demos)."""
        self._live.discard(vm_id)
        if self._listener is not None:
            self._listener(vm_id, reason)

    def _require(self, vm: VmRecord) -> None:
        if vm.vm_id not in self._live:
            raise VmmError(f"in-memory vmm for vm '{vm.vm_id}' is gone")
