"""Stateful property test: the lifecycle core against a tiny reference model of DESIGN.md §5.

Hypothesis drives random sequences of jobs (valid and invalid, replays included); after every step
the store must agree with the model, and every refusal must leave the store unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.errors import VmError
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import ALLOWED, Action, Origin
from microvm_blueprint.runtime.store import Store

IDS = st.sampled_from(["a", "b", "c", "../a", "é"])
SNAPS = st.sampled_from(["s1", "s2"])
NEXT = {Action.START: "running", Action.STOP: "stopped", Action.DESTROY: "destroyed"}


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        root = Path(self.tmp.name)
        self.loop = asyncio.new_event_loop()
        self.life = Lifecycle(InMemoryDriver(), Store(root / "s.sqlite3"), state_dir=root / "state")
        self.status: dict[str, str] = {}
        self.snaps: dict[str, list[str]] = {}
        self.calls = itertools.count(1)
        self.done: list[tuple[Origin, str, tuple[str, ...], bool]] = []

    def teardown(self) -> None:
        self.loop.close()
        self.life.store.close()
        self.tmp.cleanup()

    def _run(self, name: str, *args: str) -> bool:
        origin = Origin(call_id=next(self.calls), caller="0xc")
        coro = getattr(self.life, name)(*args, origin) if name != "create_vm" else self.life.create_vm(
            args[0], None, origin
        )
        try:
            self.loop.run_until_complete(coro)
            ok = True
        except VmError:
            ok = False
        self.done.append((origin, name, args, ok))
        return ok

    @rule(vm=IDS)
    def create(self, vm: str) -> None:
        ok = self._run("create_vm", vm)
        assert ok == (vm not in self.status)
        if ok:
            self.status[vm] = "created"
            self.snaps[vm] = []

    @rule(vm=IDS, action=st.sampled_from([Action.START, Action.STOP, Action.DESTROY]))
    def transition(self, vm: str, action: Action) -> None:
        name = {Action.START: "start_vm", Action.STOP: "stop_vm", Action.DESTROY: "destroy_vm"}[action]
        ok = self._run(name, vm)
        allowed = vm in self.status and action in ALLOWED[_status(self.status[vm])]
        assert ok == allowed
        if ok:
            self.status[vm] = NEXT[action]

    @rule(vm=IDS, snap=SNAPS)
    def snapshot(self, vm: str, snap: str) -> None:
        ok = self._run("snapshot_vm", vm, snap)
        allowed = (
            vm in self.status
            and Action.SNAPSHOT in ALLOWED[_status(self.status[vm])]
            and snap not in self.snaps[vm]
        )
        assert ok == allowed
        if ok:
            self.snaps[vm].append(snap)

    @rule(vm=IDS, snap=SNAPS)
    def delete_snapshot(self, vm: str, snap: str) -> None:
        ok = self._run("delete_snapshot", vm, snap)
        assert ok == (vm in self.status and snap in self.snaps[vm])
        if ok:
            self.snaps[vm].remove(snap)

    @rule(src=IDS, snap=SNAPS, new=IDS)
    def restore(self, src: str, snap: str, new: str) -> None:
        ok = self._run("restore_vm", src, snap, new)
        assert ok == (src in self.snaps and snap in self.snaps[src] and new not in self.status)
        if ok:
            self.status[new] = self.loop.run_until_complete(self.life.get_snapshot(src, snap)).vm_status.value
            self.snaps[new] = []

    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        if not self.done:
            return
        origin, name, args, ok = data.draw(st.sampled_from(self.done))
        before = self._snapshot_of_store()
        coro = (
            self.life.create_vm(args[0], None, origin)
            if name == "create_vm"
            else getattr(self.life, name)(*args, origin)
        )
        try:
            self.loop.run_until_complete(coro)
            again = True
        except VmError:
            again = False
        assert again == ok
        assert self._snapshot_of_store() == before

    def _snapshot_of_store(self) -> list[tuple[str, str, tuple[str, ...], int]]:
        views = self.loop.run_until_complete(self.life.list_vms())
        return [
            (v.vm_id, v.status.value, v.snapshots, len(self.life.store.history(v.vm_id))) for v in views
        ]

    @invariant()
    def store_matches_model(self) -> None:
        views = self.loop.run_until_complete(self.life.list_vms())
        assert {v.vm_id: v.status.value for v in views} == self.status
        assert {v.vm_id: list(v.snapshots) for v in views} == self.snaps


def _status(word: str):  # type: ignore[no-untyped-def]
    from microvm_blueprint.runtime.model import VmStatus

    return VmStatus(word)


TestLifecycleModel = LifecycleMachine.TestCase
TestLifecycleModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
