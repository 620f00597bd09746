"""Hostile input (hypothesis): calldata and ids thrown at every job handler.

Each case either succeeds or fails with the exact error the rules give, and a failure changes nothing.
CI runs >= 10k cases (HYPOTHESIS_PROFILE=ci); locally the default profile is smaller.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from pathlib import Path

import pytest
from eth_abi import encode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvm_blueprint.blueprint.jobs import JOBS, JOBS_BY_NAME, build_router, make_handler
from microvm_blueprint.errors import TransientError
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.errors import InvalidInput
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import validate_id
from microvm_blueprint.runtime.store import Store
from microvm_blueprint.tangle.abi import decode_args
from microvm_blueprint.tangle.calls import JobCall
from microvm_blueprint.tangle.errors import AbiDecodeError, JobError

settings.register_profile("ci", max_examples=3500, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("dev", max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

_loop = asyncio.new_event_loop()
_tmp = tempfile.TemporaryDirectory()
_life = Lifecycle(InMemoryDriver(), Store(Path(_tmp.name) / "s.sqlite3"), state_dir=Path(_tmp.name) / "state")
_router = build_router(_life)
_calls = iter(range(10**9))
LIFECYCLE_REFUSAL = re.compile(
    r"vm '.*' (not found|already exists)"
    r"|snapshot '.*' (not found|already exists) for vm '.*'"
    r"|invalid vm transition for '.*': \w+ -> \w+",
    re.S,
)


def _fingerprint() -> tuple[object, ...]:
    """Cheap and complete: every change the lifecycle makes adds a history row or a VM/snapshot row."""
    db = _life.store
    return tuple(
        db._read(sql)[0]  # noqa: SLF001 - the test inspects the store directly
        for sql in (
            "SELECT count(*), coalesce(max(seq), 0) FROM history",
            "SELECT count(*), group_concat(status) FROM (SELECT status FROM vms ORDER BY vm_id)",
            "SELECT count(*), coalesce(max(seq), 0) FROM snapshots",
        )
    )


def _run(job_index: int, inputs: bytes) -> str | None:
    """As the runner does: the router decodes the inputs once (inputs that do not decode are the job's
    failure), then the handler runs with the decoded arguments."""
    call = JobCall(service_id=0, call_id=next(_calls), job_index=job_index, caller="0x" + "c" * 40, inputs=inputs)
    routed = _router.prepare(call)
    assert routed.route is not None
    if routed.refused is not None:
        return routed.refused
    try:
        _loop.run_until_complete(routed.route.handler(call, routed.args))
    except JobError as exc:
        return str(exc)
    return None


ids = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=80),
    st.sampled_from(["", "..", "../etc/passwd", "a/b", "\x00", "x" * 257, "é" * 129, "vm-1"]),
)


def _expected_id_error(kind: str, value: str) -> str | None:
    try:
        validate_id(kind, value)
    except InvalidInput as exc:
        return str(exc)
    return None


@given(data=st.binary(max_size=600), job=st.sampled_from(JOBS))
def test_random_calldata_never_escapes_and_changes_nothing_on_error(data: bytes, job: object) -> None:
    before = _fingerprint()
    error = _run(job.index, data)  # type: ignore[attr-defined]
    if error is not None:
        assert _fingerprint() == before
        try:
            decode_args(job.arg_types, data)  # type: ignore[attr-defined]
        except AbiDecodeError as exc:
            assert error == str(exc)


@given(vm_id=ids, snapshot_id=ids)
def test_hostile_ids_get_the_exact_error(vm_id: str, snapshot_id: str) -> None:
    for job in JOBS:
        args: list[object] = []
        for name, typ in zip(job.arg_names, job.arg_types, strict=True):
            if typ == "string":
                args.append(snapshot_id if name == "snapshot_id" else ("" if name == "image" else vm_id))
            elif typ.endswith("[]"):
                args.append([])  # job 8's keys and ports: none
            else:
                args.append({"mem_mib": 256, "disk_mib": 0}.get(name, 1))
        before = _fingerprint()
        error = _run(job.index, encode(list(job.arg_types), args))
        if error is None:
            continue
        assert _fingerprint() == before, (job.name, error)
        first_bad = None
        for name, typ, value in zip(job.arg_names, job.arg_types, args, strict=True):
            if typ == "string" and name != "image":
                first_bad = first_bad or _expected_id_error(name, str(value))
        if first_bad is not None:
            assert error == first_bad, (job.name, error)
        else:  # valid ids: only lifecycle refusals remain
            assert LIFECYCLE_REFUSAL.fullmatch(error), (job.name, error)


def test_decode_args_only_raises_abidecodeerror() -> None:
    @given(st.binary(max_size=400), st.lists(st.sampled_from(["string", "uint32", "uint8", "bytes"]), max_size=4))
    def inner(data: bytes, types: list[str]) -> None:
        try:
            decode_args(types, data)
        except AbiDecodeError:
            pass

    inner()


@pytest.mark.parametrize("size", [64 * 1024 + 1, 1 << 20])
def test_huge_inputs_refused(size: int) -> None:
    before = _fingerprint()
    error = _run(0, b"\x00" * size)
    assert error == f"inputs of {size} bytes exceed the limit of {64 * 1024} bytes"
    assert _fingerprint() == before


def test_a_transient_error_passes_through_the_handler_for_the_runner_to_retry() -> None:
    """A locked database says nothing about the call: the handler lets it through (the runner retries
    it or leaves the call for the next start) instead of turning it into the job's failure."""

    class LockedProvider:
        async def create_vm(self, vm_id: str, spec: object, origin: object) -> None:
            raise TransientError("database is locked")

    handler = make_handler(JOBS_BY_NAME["create_vm"], LockedProvider())  # type: ignore[arg-type]
    call = JobCall(service_id=0, call_id=next(_calls), job_index=0, caller="0x" + "c" * 40, inputs=b"")
    with pytest.raises(TransientError, match="database is locked"):
        _loop.run_until_complete(handler(call, ("vm-1",)))
