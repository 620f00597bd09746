"""DESIGN.md §9, quotas are reservations: a burst of concurrent creates gets exactly the quota, on every
provider (with QEMU each create spawns a real VMM, the work that used to overlap the quota check); the
per-caller quotas too, each caller getting exactly its own while the host quota still holds."""

from __future__ import annotations

import asyncio

import pytest

from microvm_blueprint.runtime.errors import QuotaExceeded
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import HostLimits, Origin, VmStatus

from .conftest import SERVICE_OWNER


async def test_a_burst_of_concurrent_creates_gets_exactly_the_quota(provider: Lifecycle) -> None:
    provider.limits = HostLimits(max_vms=2)  # MICROVM_MAX_VMS=2
    outcomes = await asyncio.gather(
        *(provider.create_vm(f"burst-{i}", None, Origin(call_id=9000 + i, caller="0xc")) for i in range(6)),
        return_exceptions=True,
    )
    created = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, QuotaExceeded)]
    assert (len(created), len(refused)) == (2, 4), outcomes  # before: 6 created
    assert [v.status for v in await provider.list_vms()] == [VmStatus.CREATED] * 2


async def test_per_caller_quotas_hold_each_caller_and_count_restores_for_the_restorer(provider: Lifecycle) -> None:
    a, b = "0x00000000000000000000000000000000000000A1", "0x00000000000000000000000000000000000000b2"
    provider.limits = HostLimits(max_vms=5, caller_max_vms=2)  # MICROVM_CALLER_MAX_VMS=2
    outcomes = await asyncio.gather(
        *(provider.create_vm(f"c-{who}-{i}", None, Origin(call_id=9100 + 10 * n + i, caller=caller))
          for i in range(3) for n, (who, caller) in enumerate((("a", a), ("b", b)))),
        return_exceptions=True,
    )
    refused = sorted(str(o) for o in outcomes if isinstance(o, BaseException))
    assert refused == [f"quota exceeded: at most 2 vms for caller {c}" for c in (a, b)], outcomes
    owners = sorted(v.owner or "" for v in await provider.list_vms())
    assert owners == [a, a, b, b]
    # a restore makes a VM of the restorer's: A is at its quota, so A's clone is refused and changes nothing
    await provider.snapshot_vm("c-a-0", "s", Origin(call_id=9200, caller=a))
    with pytest.raises(QuotaExceeded) as err:
        await provider.restore_vm("c-a-0", "s", "c-a-clone", Origin(call_id=9201, caller=a))
    assert str(err.value) == f"quota exceeded: at most 2 vms for caller {a}"
    assert provider.store.get_vm("c-a-clone") is None
    # the service owner is held by the host quota only: its clone of A's snapshot is its own, and the last
    clone = await provider.restore_vm("c-a-0", "s", "c-owner-clone", Origin(call_id=9202, caller=SERVICE_OWNER))
    assert clone.owner == SERVICE_OWNER
    with pytest.raises(QuotaExceeded) as err:
        await provider.create_vm("c-owner-2", None, Origin(call_id=9203, caller=SERVICE_OWNER))
    assert str(err.value) == "quota exceeded: at most 5 vms"
    await provider.destroy_vm("c-a-1", Origin(call_id=9204, caller=a))  # destroy gives A's share back
    assert (await provider.restore_vm("c-a-0", "s", "c-a-clone", Origin(call_id=9205, caller=a))).owner == a
