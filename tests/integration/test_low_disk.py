"""Low disk (DESIGN.md §9, issue #13 item 6): below ``MICROVM_MIN_FREE_MIB`` creates, snapshots and restores
are refused with a clear error before any VMM work; reads keep answering; once space returns the same
kinds of call succeed and no call went unanswered. On a real 64 MiB tmpfs DATA_DIR."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm_blueprint.blueprint.settings import OperatorSettings
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.errors import QuotaExceeded
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmStatus
from microvm_blueprint.runtime.store import Store

from ..conftest import tmpfs_dir


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_dir(tmp_path, "64m") as mnt:
        yield mnt


def _fill(path: Path, leave_mib: int) -> None:
    st = os.statvfs(path.parent)
    free = st.f_bavail * st.f_frsize
    with open(path, "wb") as fh:
        fh.write(b"\0" * max(0, free - (leave_mib << 20)))


async def test_refused_below_min_free_and_served_again_once_space_returns(small_disk: Path) -> None:
    life = Lifecycle(InMemoryDriver(), Store(small_disk / "s.sqlite3"), state_dir=small_disk / "vms",
                     min_free_mib=16)
    call = iter(range(1, 100))
    await life.create_vm("a", None, Origin(call_id=next(call)))
    await life.start_vm("a", Origin(call_id=next(call)))
    await life.snapshot_vm("a", "s0", Origin(call_id=next(call)))
    filler = small_disk / "filler"
    _fill(filler, leave_mib=8)
    refused = []
    for attempt in (
        lambda c: life.create_vm("b", None, Origin(call_id=c)),
        lambda c: life.snapshot_vm("a", "s1", Origin(call_id=c)),
        lambda c: life.restore_vm("a", "s0", "c", Origin(call_id=c)),
    ):
        c = next(call)
        with pytest.raises(QuotaExceeded, match=r"disk is nearly full .*MICROVM_MIN_FREE_MIB"):
            await attempt(c)
        refused.append(c)
    # the operator keeps answering: reads, and changes that need no space
    assert (await life.get_vm("a")).status is VmStatus.RUNNING
    assert [v.vm_id for v in await life.list_vms()] == ["a"]
    await life.stop_vm("a", Origin(call_id=next(call)))
    # every refused call has its recorded answer (a replay says the same)
    for c in refused:
        outcome = life.store.get_call(c)
        assert outcome is not None and not outcome.ok and "MICROVM_MIN_FREE_MIB" in (outcome.error or "")
    filler.unlink()
    await life.create_vm("b", None, Origin(call_id=next(call)))
    await life.snapshot_vm("a", "s1", Origin(call_id=next(call)))
    assert (await life.restore_vm("a", "s0", "c", Origin(call_id=next(call)))).vm_id == "c"
    assert {v.vm_id for v in await life.list_vms()} == {"a", "b", "c"}


def test_min_free_setting() -> None:
    assert OperatorSettings.from_env({}, Path("/d")).min_free_mib == 512
    s = OperatorSettings.from_env({"MICROVM_MIN_FREE_MIB": "64", "MICROVM_VMM_USER": "vmm"}, Path("/d"))
    assert (s.min_free_mib, s.vmm_user) == (64, "vmm")
