"""The lifecycle core: one implementation of :class:`VmProvider` over any :class:`VmmDriver`.

It owns what every VMM shares — id rules, ownership, the state x job table, quotas, per-VM ordering,
the durable store, intents, the audit trail and replay detection — and hands the driver only the
transitions the table allows.

Ownership (DESIGN.md §9): a VM belongs to the caller whose call created (or restored) it, and so do
its snapshots; a change from any other caller fails with ``vm '<id>' belongs to another caller`` and
is put on the VM's audit trail as ``refused:<job>``. The service owner (injected: the runtime never
asks the chain) and the service itself (an :class:`Origin` without a caller) may act on every VM.

Quotas are reservations: a create, restore or snapshot checks the host quota, and the quota of the
caller that will own the result (the service owner and the service itself are exempt from per-caller
quotas), and takes its share under one lock before any VMM work, and gives it back if it fails, so
concurrent calls on different VMs cannot all pass a check that only one of them fits. Adapters are therefore thin and cannot drift apart on semantics;
the contract suite in ``tests/contract`` runs against every driver.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from ..crashpoints import crash_point
from ..errors import TransientError
from . import netns
from .driver import OrphanRemover, VmmDriver
from .errors import (
    InvalidInput,
    OwnershipError,
    QuotaExceeded,
    RecordedFailure,
    SnapshotAlreadyExists,
    SnapshotNotFound,
    StoreError,
    VmAlreadyExists,
    VmError,
    VmmError,
    VmmTimeout,
    VmNotFound,
)
from .model import (
    Action,
    HostLimits,
    NetworkMode,
    NetworkSettings,
    Origin,
    SnapshotRecord,
    SnapshotView,
    VmNetwork,
    VmRecord,
    VmSpec,
    VmStatus,
    VmView,
    fs_name,
    guard,
    validate_id,
)
from .ports import tcp_port_free
from .store import Store, StoredVm

log = logging.getLogger(__name__)

LIVE = (VmStatus.CREATED, VmStatus.RUNNING, VmStatus.STOPPED)


class _VmLock:
    """One VM's lock and how many calls hold or wait on it (the entry goes when that is 0)."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class Lifecycle:
    """``VmProvider`` + ``VmQuery`` over an injected driver and store."""

    def __init__(
        self,
        driver: VmmDriver,
        store: Store,
        *,
        state_dir: str | Path,
        limits: HostLimits | None = None,
        default_spec: VmSpec | None = None,
        network: NetworkSettings | None = None,
        port_free: Callable[[str, int], bool] = tcp_port_free,
        service_owner: Callable[[], str | None] | str | None = None,
        min_free_mib: int = 0,
        vmm_uids: tuple[int, int] | None = None,
    ) -> None:
        """``service_owner``: the address that may act on every VM (the service's owner on the chain), or a
        callable answering it when asked (it may raise a ``TransientError`` while it is not known yet:
        the call is then retried, never refused for good). ``None``: only each VM's owner.

        ``vmm_uids``: the uids (``MICROVM_VMM_UID_RANGE``, checked by the caller) each new VM takes one of
        for its VMM, when the driver switches users (:meth:`VmmDriver.isolates_users`); ``None``: VMMs
        share the driver's user."""
        self.driver = driver
        self._service_owner = service_owner if callable(service_owner) else (lambda: service_owner)
        self.network = network or NetworkSettings()
        self._port_free = port_free  # injected so tests can make a host port look taken
        self.default_spec = default_spec or VmSpec()  # for create_vm without a spec
        self.store = store
        self.limits = limits or HostLimits()
        self.state_dir = Path(state_dir)
        self.vms_dir = self.state_dir / "vms"
        self.snaps_dir = self.state_dir / "snapshots"
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        self.snaps_dir.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, _VmLock] = {}  # only VMs a call holds or waits on (see _locked)
        self._quota_lock = asyncio.Lock()  # a quota is checked and taken under it (see _vm_quota)
        # creates/restores past their quota check, no row yet: the new owner (lower case) and its MiB
        self._vms_taken: dict[str, tuple[str | None, int]] = {}
        self._snaps_taken: dict[object, tuple[str | None, int]] = {}  # snapshots being taken: owner, bytes reserved
        self.min_free_mib = min_free_mib
        self.vmm_uids = vmm_uids if driver.isolates_users() else None
        self._unrecorded_errors: dict[str, str] = {}  # disk errors the (full) store could not take yet
        self._disk_errors_seen: dict[str, int] = {}  # disk errors reported per VM (a start clears only older ones)
        driver.set_exit_listener(self._on_vmm_exit)
        set_error_listener = getattr(driver, "set_error_listener", None)  # drivers that see guest disk errors
        if set_error_listener is not None:
            set_error_listener(self._on_vmm_error)

    # ---- plumbing ---------------------------------------------------------------------------

    @asynccontextmanager
    async def _locked(self, *vm_ids: str) -> AsyncIterator[None]:
        """Hold the lock of every named VM (taken in sorted order, so two calls never wait on each
        other crosswise). A VM's lock exists only while a call holds or waits on it: the table holds
        the VMs in use, not every VM ever touched."""
        ids = sorted(set(vm_ids))
        entries: list[_VmLock] = []
        for v in ids:
            entry = self._locks.get(v)
            if entry is None:
                entry = self._locks[v] = _VmLock()
            entry.users += 1
            entries.append(entry)
        held: list[_VmLock] = []
        try:
            for entry in entries:
                await entry.lock.acquire()
                held.append(entry)
            yield
        finally:
            for entry in reversed(held):
                entry.lock.release()
            for v, entry in zip(ids, entries, strict=True):
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[v]

    def _replayed(self, origin: Origin) -> bool:
        """True when ``origin``'s call was already applied and succeeded (answer it as a replay);
        :class:`RecordedFailure` with the same text when it was applied and failed."""
        if origin.call_id is None:
            return False
        done = self.store.get_call(origin.call_id)
        if done is None:
            return False
        log.info("call %s replayed; answering the recorded outcome", origin.call_id)
        if not done.ok:
            raise RecordedFailure(done.error or "failed")
        return True

    @asynccontextmanager
    async def _recorded(self, origin: Origin, job: str, vm_id: object) -> AsyncIterator[None]:
        """A ``VmError`` raised in the body is the call's final outcome: recorded, so a replay of the
        call answers the same error. A ``TransientError`` (a locked database) says nothing about the
        call: it is not recorded, and the same call id can run again and succeed."""
        try:
            yield
        except TransientError:
            raise
        except VmError as exc:
            self.store.record_failure(origin, job, _safe(vm_id), str(exc))
            raise

    @asynccontextmanager
    async def _transition(
        self, origin: Origin, job: str, vm_id: str, action: Action | None, **ids: str
    ) -> AsyncIterator[StoredVm]:
        """The skeleton of every change to an existing VM: check ``vm_id`` and then ``ids`` (keyword =
        the id's name in error texts), lock the VM, load it (:class:`VmNotFound`), guard ``action``
        against the state x job table, and record a ``VmError`` from any of it or from the body as
        the call's outcome (see :meth:`_recorded`). Yields the VM as stored when the lock was taken."""
        async with self._recorded(origin, job, vm_id):
            validate_id("vm_id", vm_id)
            for kind, value in ids.items():
                validate_id(kind, value)
            async with self._locked(vm_id):
                vm = self._require(vm_id)
                self._check_owner(vm, origin, job)
                if action is not None:
                    guard(vm_id, vm.status, action)
                yield vm

    def _require(self, vm_id: str) -> StoredVm:
        vm = self.store.get_vm(vm_id)
        if vm is None:
            raise VmNotFound(vm_id)
        return vm

    def _record(self, vm: StoredVm) -> VmRecord:
        return VmRecord(vm_id=vm.vm_id, status=vm.status, spec=vm.spec, workdir=vm.workdir, handle=vm.handle,
                        vmm_uid=self.store.vmm_uid(vm.vm_id))

    def _take_vmm_uid(self, vm_id: str) -> int | None:
        """A uid of its own for a new VM's VMM (recorded before it exists), or ``None`` (the shared user).
        Raises QuotaExceeded when the range is used up."""
        return self.store.take_vmm_uid(vm_id, self.vmm_uids) if self.vmm_uids is not None else None

    def _view(self, vm_id: str) -> VmView:
        """The VM as the query API shows it (the store's read model, one way to build a view)."""
        view = self.store.vm_view(vm_id)
        if view is None:
            raise VmNotFound(vm_id)
        return self._with_unrecorded(view)

    def _with_unrecorded(self, view: VmView) -> VmView:
        """``view`` with the disk error its VMM reported that the store could not record (its disk was
        full too): written now if the store takes it, shown from memory until then."""
        text = self._unrecorded_errors.get(view.vm_id)
        if text is None:
            return view
        if view.status not in LIVE:
            self._unrecorded_errors.pop(view.vm_id, None)
            return view
        if self._record_vmm_error(view.vm_id, view.status, text):
            return self.store.vm_view(view.vm_id) or view
        return view if view.error else dataclasses.replace(view, error=text)

    def _check_owner(self, vm: StoredVm, origin: Origin, job: str) -> None:
        """Refuse (:class:`OwnershipError`, recorded on the VM's audit trail) a change by a caller that
        owns neither the VM nor the service. The service owner is asked only when it matters."""
        caller = origin.caller
        if caller is None or _same(caller, vm.owner):
            return
        if _same(caller, self._service_owner()):
            return
        log.warning("refused %s of vm %r by %s: not its owner", job, vm.vm_id, caller, extra={"vm_id": vm.vm_id})
        self.store.record_refusal(vm.vm_id, vm.status, origin, job)
        raise OwnershipError(vm.vm_id)

    def _held(self, caller: str | None, *limits: int | None) -> str | None:
        """The caller (lower case) whose per-caller quotas ``limits`` hold this call, or ``None`` when none
        of them is set or the caller is exempt: the service itself, or the service owner, who may act on
        every VM (DESIGN.md §9) and is held by the host quotas only. The owner is asked only when it matters."""
        if caller is None or all(lim is None for lim in limits):
            return None
        if _same(caller, self._service_owner()):
            return None
        return caller.lower()

    @asynccontextmanager
    async def _vm_quota(self, vm_id: str, spec: VmSpec, origin: Origin) -> AsyncIterator[None]:
        """Check the VM count and memory quotas, the host's and those of the caller that will own the VM
        (its creator or restorer), and take ``vm_id``'s share, under one lock, before any VMM work; the
        share is held until the body ends (by then the VM's row counts, or it failed)."""
        lim = self.limits
        held = self._held(origin.caller, lim.caller_max_vms, lim.caller_max_total_mem_mib)
        if lim.max_vms is None and lim.max_total_mem_mib is None and held is None:
            yield  # no quota holds this call: skip the usage scan on the hot path
            return
        async with self._quota_lock:
            if lim.max_vms is not None or lim.max_total_mem_mib is not None:
                count, mem, _ = self.store.usage()
                taken = [mib for _, mib in self._vms_taken.values()]
                _check_vm_quota(count + len(taken), mem + sum(taken), spec.mem_mib, lim.max_vms,
                                lim.max_total_mem_mib, "")
            if held is not None:
                count, mem, _ = self.store.usage_of(held)
                mine = [mib for owner, mib in self._vms_taken.values() if owner == held]
                _check_vm_quota(count + len(mine), mem + sum(mine), spec.mem_mib, lim.caller_max_vms,
                                lim.caller_max_total_mem_mib, f" for caller {origin.caller}")
            # the share is the new owner's (insert_vm records origin.caller), exempt or not
            self._vms_taken[vm_id] = (origin.caller.lower() if origin.caller is not None else None, spec.mem_mib)
        try:
            yield
        finally:
            del self._vms_taken[vm_id]

    @asynccontextmanager
    async def _snapshot_quota(self, vm: StoredVm, origin: Origin) -> AsyncIterator[Callable[[int], None]]:
        """Check the snapshot disk quotas, the host's and the caller's (a snapshot is its VM owner's, and
        only the owner or an exempt caller may take one), and reserve what this snapshot may take (its
        guest memory when it has a memory image, at most what is left), under one lock, before any VMM
        work. Yields a check of the snapshot's real size against the stored ones, made before it is recorded."""
        host = self.limits.max_snapshot_bytes
        mine = self.limits.caller_max_snapshot_bytes
        held = self._held(origin.caller, mine)
        if host is None and held is None:
            yield _no_check
            return
        token = object()
        async with self._quota_lock:
            share = vm.spec.mem_mib << 20 if vm.status in (VmStatus.RUNNING, VmStatus.STOPPED) else 0
            if host is not None:
                used = self.store.usage()[2] + sum(b for _, b in self._snaps_taken.values())
                if used >= host:
                    raise QuotaExceeded(f"quota exceeded: snapshot disk limit of {host} bytes reached")
                share = min(share, host - used)
            if held is not None and mine is not None:
                used = self.store.usage_of(held)[2] + sum(b for o, b in self._snaps_taken.values() if o == held)
                if used >= mine:
                    raise QuotaExceeded(f"quota exceeded: snapshot disk limit of {mine} bytes for caller "
                                        f"{origin.caller} reached")
                share = min(share, mine - used)
            self._snaps_taken[token] = (vm.owner.lower() if vm.owner is not None else None, share)

        def check(size: int) -> None:
            if host is not None and self.store.usage()[2] + size > host:
                raise QuotaExceeded(f"quota exceeded: snapshot of {size} bytes would pass the limit of {host} bytes")
            if held is not None and mine is not None and self.store.usage_of(held)[2] + size > mine:
                raise QuotaExceeded(f"quota exceeded: snapshot of {size} bytes would pass the limit of {mine} "
                                    f"bytes for caller {origin.caller}")

        try:
            yield check
        finally:
            del self._snaps_taken[token]

    def _on_vmm_exit(self, vm_id: str, reason: str) -> None:
        vm = self.store.get_vm(vm_id)
        if vm is None or vm.status not in LIVE:
            return
        log.warning("vmm of vm %r exited unexpectedly: %s", vm_id, reason, extra={"vm_id": vm_id})
        self.store.update_vm(vm_id, VmStatus.FAILED, Origin(), "vmm_exit", error=reason)

    def _on_vmm_error(self, vm_id: str, text: str) -> None:
        """A guest's disk failed (its VMM reported it; the guest got an I/O error and runs on): the view
        shows it in ``error`` with the status unchanged."""
        vm = self.store.get_vm(vm_id)
        if vm is None or vm.status not in LIVE:
            return
        log.warning("vm %r: %s", vm_id, text, extra={"vm_id": vm_id})
        self._disk_errors_seen[vm_id] = self._disk_errors_seen.get(vm_id, 0) + 1
        self._unrecorded_errors[vm_id] = text[:2000]
        self._record_vmm_error(vm_id, vm.status, text[:2000])

    def _record_vmm_error(self, vm_id: str, status: VmStatus, text: str) -> bool:
        """Write a VMM-reported error to the store; False (kept in memory, shown by the views and
        retried by them) when the store cannot take it, as when the disk the guest filled is its disk."""
        try:
            self.store.update_vm(vm_id, status, Origin(), "disk_error", error=text)
        except StoreError as exc:
            log.warning("vm %r: cannot record its disk error yet (%s); shown from memory", vm_id, exc,
                        extra={"vm_id": vm_id})
            return False
        self._unrecorded_errors.pop(vm_id, None)
        return True

    def _error_after_start(self, vm_id: str, workdir: str, seen: int) -> str | None:
        """The ``error`` a VM keeps once a start succeeded (README, Security model: Disks). A disk error
        stays through stops and starts until a start finds the host with room again: at least
        ``min_free_mib`` (and 1 MiB) free where the VM's disk lives. An error reported during the start
        itself (``seen`` is the count before it) is news and always stays."""
        stored = self.store.get_vm(vm_id)
        current = self._unrecorded_errors.get(vm_id) or (stored.error if stored is not None else None)
        if current is None or self._disk_errors_seen.get(vm_id, 0) != seen:
            return current
        try:
            st = os.statvfs(workdir)
        except OSError:
            return current  # cannot tell: keep what the VMM said
        if st.f_bavail * st.f_frsize >> 20 < max(self.min_free_mib, 1):
            return current
        self._unrecorded_errors.pop(vm_id, None)
        return None

    def _check_free(self, job: str) -> None:
        """Refuse ``job`` (before any VMM work) while the state folder has less than ``min_free_mib`` free."""
        if self.min_free_mib <= 0:
            return
        try:
            st = os.statvfs(self.state_dir)
        except OSError:
            return  # cannot tell: let the VMM work say what is wrong
        free = st.f_bavail * st.f_frsize >> 20
        if free < self.min_free_mib:
            raise QuotaExceeded(f"refused {job}: the operator's disk is nearly full ({free} MiB free in its data "
                                f"directory, at least {self.min_free_mib} MiB needed: MICROVM_MIN_FREE_MIB)")

    async def _after_driver_error(self, vm: StoredVm, exc: VmmError) -> None:
        """A driver error leaves the VM in an unknown state: if its VMM is gone, it has failed."""
        try:
            alive = await self.driver.alive(self._record(vm))
        except VmError:
            alive = False
        if not alive:
            self.store.update_vm(vm.vm_id, VmStatus.FAILED, Origin(), "vmm_error", error=exc.detail()[:2000])

    # ---- VmProvider ---------------------------------------------------------------------------

    async def create_vm(self, vm_id: str, spec: VmSpec | None, origin: Origin) -> VmView:
        if self._replayed(origin):
            return await self.get_vm(vm_id)
        async with self._recorded(origin, "create_vm", vm_id):
            validate_id("vm_id", vm_id)
            checked = self.limits.check_spec(spec or self.default_spec)
            async with self._locked(vm_id):
                return await self._create_locked(vm_id, checked, origin)

    async def _create_locked(self, vm_id: str, spec: VmSpec, origin: Origin) -> VmView:
        if self.store.get_vm(vm_id) is not None:
            raise VmAlreadyExists(vm_id)
        self._check_network(spec)
        self._check_free("create_vm")
        async with self._vm_quota(vm_id, spec, origin):
            return await self._create_reserved(vm_id, spec, origin)

    async def _create_reserved(self, vm_id: str, spec: VmSpec, origin: Origin) -> VmView:
        workdir = self.vms_dir / fs_name(vm_id)
        shutil.rmtree(workdir, ignore_errors=True)  # leftovers of an undone create
        intent = self.store.add_intent(vm_id, "create", str(workdir), origin.call_id)
        workdir.mkdir(parents=True)
        try:
            uid = self._take_vmm_uid(vm_id)
            network = self._reserve_network(vm_id, spec)
            await self._plumb(vm_id, network, uid=uid)
        except BaseException:
            await asyncio.shield(self._undo_workdir(VmRecord(vm_id, VmStatus.CREATED, spec, str(workdir)), intent))
            raise
        record = VmRecord(vm_id=vm_id, status=VmStatus.CREATED, spec=spec, workdir=str(workdir), network=network,
                          vmm_uid=uid)
        crash_point("create.after_intent")
        try:
            handle = await self.driver.create(record)
        except BaseException:
            await asyncio.shield(self._undo_workdir(record, intent))
            raise
        crash_point("create.after_vmm")
        self.store.insert_vm(vm_id, VmStatus.CREATED, spec, str(workdir), handle, origin, "create", intent=intent)
        return self._view(vm_id)

    async def _undo_workdir(self, record: VmRecord, intent: int) -> None:
        try:
            await self.driver.destroy(record)
        except VmError as exc:
            log.warning("cleanup of a failed create for %r: %s", record.vm_id, exc)
        shutil.rmtree(record.workdir, ignore_errors=True)
        await self._unplumb(record.vm_id)
        self.store.release_network(record.vm_id, forget=True)
        self.store.release_vmm_uid(record.vm_id)  # after the VMM and its folder are gone
        self.store.drop_intent(intent)

    def _check_network(self, spec: VmSpec) -> None:
        """Ports can only be published where the guest has a network: say so before anything changes."""
        if spec.ports and self.network.mode is NetworkMode.NONE:
            raise InvalidInput("ports cannot be published: this operator runs with MICROVM_NETWORK=none")

    def _reserve_network(self, vm_id: str, spec: VmSpec) -> VmNetwork:
        """Record the VM's network and take its host ports (before the VMM, which binds them). The
        egress policy recorded is this operator's ``MICROVM_EGRESS``: the VM keeps it for life (its
        rules are re-made with it after a restart under another setting; DESIGN.md §10)."""
        mode = self.network.mode
        ports = set(spec.ports)
        if spec.ssh_keys:
            ports.add(22)  # keys given: SSH is what they are for, so guest port 22 is published too
        return self.store.reserve_network(
            vm_id,
            mode,
            sorted(ports) if mode is not NetworkMode.NONE else (),
            host=self.network.publish_addr,
            port_range=self.network.port_range,
            is_free=self._port_free,
            egress=self.network.egress,
        )

    async def _plumb(self, vm_id: str, network: VmNetwork, inside_pid: int | None = None, *,
                     uid: int | None = None) -> None:
        """``bridge``: take the VM's /30 (recorded first) and make its namespace, veth, TAP and rules
        (DESIGN.md §10), before the VMM, which runs inside. Idempotent: reconciliation re-runs it, with
        ``inside_pid`` the re-adopted VMM's (whose namespace its name is re-attached to if need be). The
        rules get the egress policy recorded with the VM (``network.egress``), never this operator's; the
        TAP belongs to the user the VM's VMM runs as (``uid``: its own, :meth:`VmmDriver.tap_owner`)."""
        if network.mode is not NetworkMode.BRIDGE:
            return
        pool = self.network.bridge_pool
        slot = self.store.take_bridge_slot(vm_id, pool, netns.slot_count(netns.parse_pool(pool)))
        owner = self.driver.tap_owner(VmRecord(vm_id, VmStatus.CREATED, VmSpec(), "", vmm_uid=uid))
        await netns.ensure(netns.Plumbing(vm_id, pool, slot, network.ports, network.egress, tap_owner=owner),
                           inside_pid=inside_pid)

    async def _unplumb(self, vm_id: str) -> None:
        """Remove what :meth:`_plumb` made (once the VMM is gone), then give the /30 back."""
        if vm_id in self.store.bridge_slots():
            await netns.teardown(vm_id)
            self.store.release_bridge_slot(vm_id)

    async def start_vm(self, vm_id: str, origin: Origin) -> VmView:
        if self._replayed(origin):
            return await self.get_vm(vm_id)
        async with self._transition(origin, "start_vm", vm_id, Action.START) as vm:
            seen = self._disk_errors_seen.get(vm_id, 0)
            try:
                if vm.status is VmStatus.CREATED:
                    handle = await self.driver.boot(self._record(vm))
                    crash_point("start.after_boot")
                    error = self._error_after_start(vm_id, vm.workdir, seen)
                    self.store.update_vm(vm_id, VmStatus.RUNNING, origin, "start", handle=handle, error=error)
                else:
                    await self.driver.resume(self._record(vm))
                    error = self._error_after_start(vm_id, vm.workdir, seen)
                    self.store.update_vm(vm_id, VmStatus.RUNNING, origin, "start", error=error)
            except VmmTimeout as exc:
                if vm.status is VmStatus.CREATED:  # a boot that misses its deadline is a failed start
                    self.store.update_vm(
                        vm_id, VmStatus.FAILED, origin, "start", error=exc.detail()[:2000], call_ok=False
                    )
                else:
                    await self._after_driver_error(vm, exc)
                raise
            except VmmError as exc:
                await self._after_driver_error(vm, exc)
                raise
            return self._view(vm_id)

    async def stop_vm(self, vm_id: str, origin: Origin) -> VmView:
        if self._replayed(origin):
            return await self.get_vm(vm_id)
        async with self._transition(origin, "stop_vm", vm_id, Action.STOP) as vm:
            try:
                await self.driver.pause(self._record(vm))
            except VmmError as exc:
                await self._after_driver_error(vm, exc)
                raise
            stored = self.store.get_vm(vm_id)  # a disk error stays through a stop (see _error_after_start)
            self.store.update_vm(vm_id, VmStatus.STOPPED, origin, "stop", error=stored.error if stored else None)
            return self._view(vm_id)

    async def snapshot_vm(self, vm_id: str, snapshot_id: str, origin: Origin) -> SnapshotView:
        if self._replayed(origin):
            try:
                return await self.get_snapshot(vm_id, snapshot_id)
            except SnapshotNotFound:
                # deleted since: the call still succeeded; answer what history kept of it (size is gone)
                taken = [h for h in self.store.history(vm_id) if h.call_id == origin.call_id]
                at, status = (taken[0].at, taken[0].status) if taken else (0.0, self._require(vm_id).status)
                return SnapshotView(snapshot_id=snapshot_id, created_at=at, size_bytes=0, vm_status=status)
        async with self._transition(origin, "snapshot_vm", vm_id, Action.SNAPSHOT, snapshot_id=snapshot_id) as vm:
            if self.store.get_snapshot(vm_id, snapshot_id) is not None:
                raise SnapshotAlreadyExists(vm_id, snapshot_id)
            self._check_free("snapshot_vm")
            async with self._snapshot_quota(vm, origin) as check_size:
                return await self._snapshot_reserved(vm, snapshot_id, origin, check_size)

    async def _snapshot_reserved(
        self, vm: StoredVm, snapshot_id: str, origin: Origin, check_size: Callable[[int], None]
    ) -> SnapshotView:
        vm_id = vm.vm_id
        snapdir = self.snaps_dir / fs_name(vm_id) / fs_name(snapshot_id)
        shutil.rmtree(snapdir, ignore_errors=True)
        intent = self.store.add_intent(vm_id, "snapshot", str(snapdir), origin.call_id)
        snapdir.mkdir(parents=True)
        try:
            crash_point("snapshot.after_intent")
            size = await self.driver.snapshot(self._record(vm), str(snapdir))
            crash_point("snapshot.after_save")
            check_size(size)
        except BaseException as exc:
            shutil.rmtree(snapdir, ignore_errors=True)
            self.store.drop_intent(intent)
            if isinstance(exc, VmmError):
                await self._after_driver_error(vm, exc)
            raise
        snap = SnapshotRecord(
            vm_id=vm_id,
            snapshot_id=snapshot_id,
            path=str(snapdir),
            vm_status=vm.status,
            spec=vm.spec,
            created_at=time.time(),
            size_bytes=size,
        )
        self.store.add_snapshot(snap, origin, intent=intent)
        return _snap_view(snap)

    async def destroy_vm(self, vm_id: str, origin: Origin) -> VmView:
        if self._replayed(origin):
            return await self.get_vm(vm_id)
        async with self._transition(origin, "destroy_vm", vm_id, Action.DESTROY) as vm:
            await self.driver.destroy(self._record(vm))
            crash_point("destroy.after_vmm")
            await asyncio.shield(self._unplumb(vm_id))
            shutil.rmtree(vm.workdir, ignore_errors=True)
            self.store.update_vm(vm_id, VmStatus.DESTROYED, origin, "destroy", handle=None, error=vm.error)
            self.store.release_vmm_uid(vm_id)  # its VMM and files are gone: the next VM may have the uid
            self._disk_errors_seen.pop(vm_id, None)
            return self._view(vm_id)

    async def restore_vm(self, source_vm_id: str, snapshot_id: str, new_vm_id: str, origin: Origin) -> VmView:
        if self._replayed(origin):
            return await self.get_vm(new_vm_id)
        # not a _transition: the call is about the new VM (recorded under it), loaded is the source
        async with self._recorded(origin, "restore_vm", new_vm_id):
            validate_id("source_vm_id", source_vm_id)
            validate_id("snapshot_id", snapshot_id)
            validate_id("new_vm_id", new_vm_id)
            async with self._locked(source_vm_id, new_vm_id):
                # the snapshots are the source owner's: only they (or the service owner) may clone them
                self._check_owner(self._require(source_vm_id), origin, "restore_vm")
                snap = self.store.get_snapshot(source_vm_id, snapshot_id)
                if snap is None:
                    raise SnapshotNotFound(source_vm_id, snapshot_id)
                if self.store.get_vm(new_vm_id) is not None:
                    raise VmAlreadyExists(new_vm_id)
                spec = self.limits.check_spec(snap.spec)
                self._check_network(spec)
                self._check_free("restore_vm")
                async with self._vm_quota(new_vm_id, spec, origin):
                    return await self._restore_reserved(new_vm_id, snap, spec, origin)

    async def _restore_reserved(self, new_vm_id: str, snap: SnapshotRecord, spec: VmSpec, origin: Origin) -> VmView:
        workdir = self.vms_dir / fs_name(new_vm_id)
        shutil.rmtree(workdir, ignore_errors=True)
        intent = self.store.add_intent(new_vm_id, "restore", str(workdir), origin.call_id)
        workdir.mkdir(parents=True)
        record = VmRecord(vm_id=new_vm_id, status=snap.vm_status, spec=spec, workdir=str(workdir))
        try:
            # the clone runs as a uid of its own and publishes the same guest ports on host ports of its own
            record = dataclasses.replace(record, vmm_uid=self._take_vmm_uid(new_vm_id))
            record = dataclasses.replace(record, network=self._reserve_network(new_vm_id, spec))
            # a namespace of its own, same inside addresses
            await self._plumb(new_vm_id, record.network, uid=record.vmm_uid)
            handle = await self.driver.restore(record, snap)
        except BaseException:
            await asyncio.shield(self._undo_workdir(record, intent))
            raise
        # the clone belongs to the caller that restored it (origin.caller: insert_vm records it)
        self.store.insert_vm(new_vm_id, snap.vm_status, spec, str(workdir), handle, origin, "restore", intent=intent)
        return self._view(new_vm_id)

    async def delete_snapshot(self, vm_id: str, snapshot_id: str, origin: Origin) -> None:
        if self._replayed(origin):
            return
        async with self._transition(origin, "delete_snapshot", vm_id, None, snapshot_id=snapshot_id):
            snap = self.store.get_snapshot(vm_id, snapshot_id)
            if snap is None:
                raise SnapshotNotFound(vm_id, snapshot_id)
            await self.driver.delete_snapshot(snap)
            shutil.rmtree(snap.path, ignore_errors=True)
            self.store.delete_snapshot(vm_id, snapshot_id, origin)

    async def reconcile(self) -> str:
        """Finish or undo intents, re-adopt live VMMs, mark vanished ones failed, remove orphans."""
        undone = adopted = failed = orphans = 0
        for intent in self.store.intents():
            path = Path(intent.path)
            if intent.action in ("create", "restore") and self.store.get_vm(intent.vm_id) is None:
                record = VmRecord(intent.vm_id, VmStatus.CREATED, VmSpec(), str(path))
                try:
                    await self.driver.destroy(record)
                except VmError as exc:
                    log.warning("undoing %s of %r: %s", intent.action, intent.vm_id, exc)
                shutil.rmtree(path, ignore_errors=True)
            elif intent.action == "snapshot" and str(path) not in self.store.all_snapshot_paths():
                shutil.rmtree(path, ignore_errors=True)
            self.store.drop_intent(intent.seq)
            undone += 1
        for vm_id in self.store.bridge_slots():  # network objects of VMs gone or never recorded
            gone = self.store.get_vm(vm_id)
            if gone is None or gone.status is VmStatus.DESTROYED:
                await self._unplumb(vm_id)
                orphans += 1
        self.store.drop_orphan_networks()  # ports a create took before the operator died
        self.store.drop_orphan_vmm_uids()  # uids of VMs destroyed or never recorded
        await self._record_unrecorded_egress()
        owned: set[str] = set()
        for vm in self.store.list_vms():
            if vm.status not in LIVE:
                continue
            owned.add(Path(vm.workdir).name)
            if await self.driver.adopt(self._record(vm)):
                adopted += 1
                if vm.vm_id in self.store.bridge_slots():  # re-made where an operator crash left it short
                    adopted_vm = self.store.get_vm(vm.vm_id)
                    handle = adopted_vm.handle if adopted_vm is not None else None
                    await self._plumb(vm.vm_id, self.store.network(vm.vm_id),
                                      handle.pid if handle is not None else None, uid=self.store.vmm_uid(vm.vm_id))
            else:
                failed += 1
                self.store.update_vm(
                    vm.vm_id, VmStatus.FAILED, Origin(), "reconcile",
                    error="vmm vanished while the operator was down",
                )
        for entry in self.vms_dir.iterdir():
            if entry.name not in owned:
                record = VmRecord(entry.name, VmStatus.CREATED, VmSpec(), str(entry))
                try:
                    await self.driver.destroy(record)
                except VmError as exc:
                    log.warning("removing orphan %s: %s", entry, exc)
                shutil.rmtree(entry, ignore_errors=True)
                orphans += 1
        if isinstance(self.driver, OrphanRemover):  # e.g. jailer chroots whose VM folder is gone
            orphans += await self.driver.remove_orphans(self.vms_dir, owned)
        summary = (
            f"reconciled: {adopted} vm(s) re-adopted, {failed} marked failed, "
            f"{undone} unfinished step(s) undone, {orphans} orphan folder(s) removed"
        )
        log.info(summary)
        return summary

    async def _record_unrecorded_egress(self) -> None:
        """VMs created before the store recorded egress (schema 3): record what the VM's live rules say
        it was created with (``bridge``: its namespace's table, before :meth:`_plumb` re-makes it),
        else deny (``user``/``none`` or no readable rules). A user-mode QEMU already running keeps the
        ``restrict=`` it was started with either way; only the record (and the view) may then say deny."""
        for vm_id in sorted(self.store.unrecorded_egress()):
            live = None
            if self.store.network(vm_id).mode is NetworkMode.BRIDGE:
                live = await netns.live_egress(vm_id)
            self.store.record_egress(vm_id, bool(live))
            log.info("vm %r: egress policy recorded as %s (%s)", vm_id, "allow" if live else "deny",
                     "read from its live rules" if live is not None else "not knowable: the default")

    async def close(self, *, stop_vms: bool = False) -> None:
        await self.driver.close(stop_vms=stop_vms)

    # ---- VmQuery ------------------------------------------------------------------------------

    async def get_vm(self, vm_id: str) -> VmView:
        validate_id("vm_id", vm_id)
        return self._view(vm_id)

    async def list_vms(self, *, limit: int | None = None, after: str | None = None) -> list[VmView]:
        return [self._with_unrecorded(v) for v in self.store.vm_views(limit=limit, after=after)]

    async def list_snapshots(self, vm_id: str) -> list[SnapshotView]:
        validate_id("vm_id", vm_id)
        self._require(vm_id)
        return [_snap_view(s) for s in self.store.list_snapshots(vm_id)]

    async def get_snapshot(self, vm_id: str, snapshot_id: str) -> SnapshotView:
        validate_id("vm_id", vm_id)
        validate_id("snapshot_id", snapshot_id)
        self._require(vm_id)
        snap = self.store.get_snapshot(vm_id, snapshot_id)
        if snap is None:
            raise SnapshotNotFound(vm_id, snapshot_id)
        return _snap_view(snap)

    async def console(self, vm_id: str, tail_bytes: int = 16384) -> str:
        validate_id("vm_id", vm_id)
        vm = self._require(vm_id)
        if vm.status is VmStatus.DESTROYED:
            return ""
        return await self.driver.console(self._record(vm), max(0, min(tail_bytes, 1 << 20)))


def _snap_view(snap: SnapshotRecord) -> SnapshotView:
    return SnapshotView(
        snapshot_id=snap.snapshot_id, created_at=snap.created_at, size_bytes=snap.size_bytes, vm_status=snap.vm_status
    )


def _same(caller: str, owner: str | None) -> bool:
    """One address, whatever the letter case (a checksummed and a lower-case spelling are the same)."""
    return owner is not None and caller.lower() == owner.lower()


def _check_vm_quota(count: int, mem: int, new_mem: int, max_vms: int | None, max_mem: int | None,
                    whose: str) -> None:
    """Raise :class:`QuotaExceeded` when one more VM of ``new_mem`` MiB would pass ``max_vms`` or
    ``max_mem`` (``None``: no limit), given ``count`` VMs of ``mem`` MiB held (``whose``: "" for the
    host's quotas, " for caller 0x..." for a caller's)."""
    if max_vms is not None and count + 1 > max_vms:
        raise QuotaExceeded(f"quota exceeded: at most {max_vms} vms{whose}")
    if max_mem is not None and mem + new_mem > max_mem:
        raise QuotaExceeded(f"quota exceeded: total guest memory{whose} would be {mem + new_mem} MiB "
                            f"(limit {max_mem} MiB)")


def _no_check(size: int) -> None:
    """The snapshot size check when no snapshot quota holds the call."""


def _safe(vm_id: object) -> str | None:
    return vm_id if isinstance(vm_id, str) else None
