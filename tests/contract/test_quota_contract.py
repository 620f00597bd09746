"""DESIGN.md §9, quotas are reservations: a burst of concurrent creates gets exactly the quota, on every
provider (with QEMU each create spawns a real VMM, the work that used to overlap the quota check)."""

from __future__ import annotations

import asyncio

from microvm_blueprint.runtime.errors import QuotaExceeded
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import HostLimits, Origin, VmStatus


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
