"""Quotas are clean errors that change nothing; settings name the bad variable."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Sequence
from pathlib import Path

import pytest

from microvm_blueprint.blueprint.settings import OperatorSettings, ProviderKind
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.errors import InvalidInput, QuotaExceeded, VmmError
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import HostLimits, Origin, VmHandle, VmRecord, VmSpec
from microvm_blueprint.runtime.store import Store
from microvm_blueprint.tangle.environment import BlueprintEnvironment, Secret
from microvm_blueprint.tangle.errors import ConfigError

from ..waiting import until


def life(tmp: Path, **limits: int) -> Lifecycle:
    return Lifecycle(InMemoryDriver(), Store(tmp / "s.db"), state_dir=tmp / "st", limits=HostLimits(**limits))


async def test_vm_count_and_memory_quotas(tmp_path: Path) -> None:
    lc = life(tmp_path, max_vms=2, max_total_mem_mib=640)
    await lc.create_vm("a", None, Origin())
    await lc.create_vm("b", VmSpec(mem_mib=256, image=""), Origin())
    with pytest.raises(QuotaExceeded, match="at most 2 vms"):
        await lc.create_vm("c", None, Origin())
    await lc.destroy_vm("b", Origin())  # destroyed VMs do not count
    with pytest.raises(QuotaExceeded, match="total guest memory would be 768 MiB"):
        await lc.create_vm("c", VmSpec(mem_mib=512, image=""), Origin())
    assert [v.vm_id for v in await lc.list_vms()] == ["a", "b"]
    await lc.create_vm("c", VmSpec(mem_mib=384, image=""), Origin())


async def test_snapshot_disk_quota(tmp_path: Path) -> None:
    lc = life(tmp_path, max_snapshot_bytes=150)
    await lc.create_vm("a", None, Origin())
    await lc.snapshot_vm("a", "s1", Origin())  # ~110 bytes of manifest
    with pytest.raises(QuotaExceeded, match="snapshot"):
        await lc.snapshot_vm("a", "s2", Origin())
    assert (await lc.get_vm("a")).snapshots == ("s1",)
    assert len(list((tmp_path / "st" / "snapshots").rglob("manifest.json"))) == 1


def test_operator_settings_errors(tmp_path: Path) -> None:
    # a bad setting is the operator's ConfigError, never the customer's InvalidInput
    for env, message in [
        ({"MICROVM_PROVIDER": "kvm-magic"}, "MICROVM_PROVIDER='kvm-magic' is not one of: in-memory, qemu, firecracker"),
        ({"MICROVM_MAX_VMS": "many"}, "MICROVM_MAX_VMS='many' is not an integer"),
        ({"MICROVM_API_ADDR": "localhost"}, "MICROVM_API_ADDR"),
        ({"MICROVM_MAX_VCPUS": "0"}, "MICROVM_MAX_VCPUS='0' must be at least 1"),
        ({"MICROVM_EPHEMERAL": "sometimes"}, "MICROVM_EPHEMERAL='sometimes' is not a boolean"),
        ({"MICROVM_QEMU_ACCEL": "hvf"}, "MICROVM_QEMU_ACCEL='hvf' is not one of: auto, kvm, tcg"),
        ({"MICROVM_BOOT_TIMEOUT_S": "soon"}, "MICROVM_BOOT_TIMEOUT_S='soon' is not a number of seconds"),
        ({"MICROVM_PROVIDER": "firecracker", "MICROVM_FIRECRACKER_VCPU_COUNT": "64"},
         "MICROVM_FIRECRACKER_VCPU_COUNT='64' must be between 1 and 32"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            OperatorSettings.from_env(env, tmp_path)
        assert not isinstance(err.value, InvalidInput) and "\n" not in str(err.value)
    s = OperatorSettings.from_env({"MICROVM_PROVIDER": "QEMU", "MICROVM_MAX_VMS": "3"}, tmp_path)
    assert (s.provider, s.limits.max_vms) == (ProviderKind.QEMU, 3)
    assert s.firecracker is None  # MICROVM_FIRECRACKER_* is parsed only for that provider
    fc = OperatorSettings.from_env({"MICROVM_PROVIDER": "firecracker", "MICROVM_FIRECRACKER_MEM_MIB": "512"}, tmp_path)
    assert fc.firecracker is not None and fc.firecracker.mem_mib == 512  # parsed once, here


def test_a_bad_microvm_setting_makes_the_cli_exit_1_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from microvm_blueprint.cli import main

    for name, value in {**BASE, "DATA_DIR": str(tmp_path), "KEYSTORE_URI": str(tmp_path / "none")}.items():
        monkeypatch.setenv(name, value)
    for bad, value in (("MICROVM_MAX_VMS", "many"), ("MICROVM_FIRECRACKER_ROOTFS_RO", "maybe")):
        monkeypatch.setenv("MICROVM_PROVIDER", "firecracker")
        monkeypatch.setenv(bad, value)
        assert main(["run", "--dry-run"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad}={value!r} ") and err.count("\n") == 1, err
        monkeypatch.delenv(bad)


BASE = {"DATA_DIR": "/tmp/x", "BLUEPRINT_ID": "1", "SERVICE_ID": "2",
        "TANGLE_CONTRACT": "0x0165878A594ca255338adfa4d48449f69242Eb8F"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"DATA_DIR": ""}, "DATA_DIR is required"),
        ({"BLUEPRINT_ID": ""}, "BLUEPRINT_ID is required"),
        ({"SERVICE_ID": ""}, "SERVICE_ID is required for run"),
        ({"SERVICE_ID": "-1"}, "SERVICE_ID='-1' is out of range for uint64"),
        ({"SERVICE_ID": "two"}, "SERVICE_ID='two' is not an unsigned integer"),
        ({"SERVICE_ID": str(2**64)}, "out of range for uint64"),
        ({"TANGLE_CONTRACT": "0x123"}, "TANGLE_CONTRACT='0x123' is not an EVM address"),
        ({"HTTP_RPC_URL": "ftp://x"}, "HTTP_RPC_URL='ftp://x' is not a http/https URL"),
        ({"PROTOCOL": "eigenlayer"}, "PROTOCOL='eigenlayer' is not supported"),
        ({"TEST_MODE": "perhaps"}, "TEST_MODE='perhaps' is not a boolean"),
    ],
)
def test_environment_names_the_bad_variable(change: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        BlueprintEnvironment.load({**BASE, **change})


def test_secret_never_shows() -> None:
    s = Secret("0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80")
    assert "ac09" not in repr(s) and "ac09" not in str(s) and "ac09" not in f"{s}"
    assert s.reveal().startswith("0xac09")


async def test_firecracker_default_spec_comes_from_its_settings(tmp_path: Path) -> None:
    from microvm_blueprint.blueprint.operator import build_provider

    env = {"MICROVM_PROVIDER": "firecracker", "MICROVM_FIRECRACKER_VCPU_COUNT": "3",
           "MICROVM_FIRECRACKER_MEM_MIB": "512"}
    life = build_provider(OperatorSettings.from_env(env, tmp_path), InMemoryDriver())
    view = await life.create_vm("fc-default", None, Origin(call_id=1))
    assert (view.spec.vcpus, view.spec.mem_mib) == (3, 512)
    explicit = await life.create_vm("fc-explicit", VmSpec(vcpus=1, mem_mib=128), Origin(call_id=2))
    assert (explicit.spec.vcpus, explicit.spec.mem_mib) == (1, 128)
    other = build_provider(OperatorSettings.from_env({}, tmp_path / "b"), InMemoryDriver())
    assert (await other.create_vm("plain", None, Origin(call_id=1))).spec == VmSpec()


def test_the_firecracker_state_dir_is_not_used_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from microvm_blueprint.blueprint.operator import make_driver

    env = {"MICROVM_PROVIDER": "firecracker", "MICROVM_FIRECRACKER_STATE_DIR": "/var/lib/firecracker"}
    settings = OperatorSettings.from_env(env, tmp_path)
    make_driver(settings)
    assert "MICROVM_FIRECRACKER_STATE_DIR=/var/lib/firecracker is accepted for compatibility and not used" in caplog.text
    assert settings.state_dir == tmp_path / "vms"
    caplog.clear()
    make_driver(OperatorSettings.from_env({"MICROVM_PROVIDER": "firecracker"}, tmp_path))
    assert "STATE_DIR" not in caplog.text


class GatedDriver(InMemoryDriver):
    """The in-memory driver with VMM work that takes as long as the test says: each create and snapshot
    waits at a gate (``fail`` makes the creates fail once through it), so concurrent calls overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered: list[str] = []
        self.fail = False

    async def create(self, vm: VmRecord) -> VmHandle | None:
        self.entered.append(vm.vm_id)
        await asyncio.wait_for(self.gate.wait(), 30)
        if self.fail:
            raise VmmError("the VMM did not start")
        return await super().create(vm)

    async def snapshot(self, vm: VmRecord, snapdir: str) -> int:
        self.entered.append(f"snapshot:{vm.vm_id}")
        await asyncio.wait_for(self.gate.wait(), 30)
        return await super().snapshot(vm, snapdir)


async def _burst(calls: Sequence[Awaitable[object]], driver: GatedDriver, entering: int) -> list[object]:
    """Run ``calls`` at once; open the gate once each is either inside the driver or refused."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    await until(lambda: len(driver.entered) + sum(t.done() for t in tasks) >= len(tasks), what="the burst to settle")
    assert len(driver.entered) == entering, driver.entered  # before the fix: every call did VMM work
    driver.gate.set()
    return list(await asyncio.gather(*tasks, return_exceptions=True))


async def test_a_burst_of_creates_gets_exactly_the_quota(tmp_path: Path) -> None:
    driver = GatedDriver()
    lc = Lifecycle(driver, Store(tmp_path / "s.db"), state_dir=tmp_path / "st", limits=HostLimits(max_vms=2))
    outcomes = await _burst([lc.create_vm(f"vm-{i}", None, Origin(call_id=i)) for i in range(6)], driver, 2)
    refused = [o for o in outcomes if isinstance(o, QuotaExceeded)]
    assert len(refused) == 4 and all(str(o) == "quota exceeded: at most 2 vms" for o in refused), outcomes
    assert len([v for v in await lc.list_vms()]) == 2
    assert lc._vms_taken == {}  # every share given back or turned into a row


async def test_a_failed_create_gives_its_share_back(tmp_path: Path) -> None:
    driver = GatedDriver()
    lc = Lifecycle(driver, Store(tmp_path / "s.db"), state_dir=tmp_path / "st",
                   limits=HostLimits(max_vms=1, max_total_mem_mib=256))
    driver.fail = True
    outcomes = await _burst([lc.create_vm(f"vm-{i}", None, Origin(call_id=10 + i)) for i in range(3)], driver, 1)
    assert [type(o).__name__ for o in outcomes].count("VmmError") == 1
    assert [type(o).__name__ for o in outcomes].count("QuotaExceeded") == 2
    driver.fail = False
    await lc.create_vm("after", None, Origin(call_id=20))  # the failed create's share was released
    assert [v.vm_id for v in await lc.list_vms()] == ["after"]


async def test_a_burst_of_snapshots_reserves_before_the_vmm_works(tmp_path: Path) -> None:
    driver = GatedDriver()
    driver.gate.set()
    lc = Lifecycle(driver, Store(tmp_path / "s.db"), state_dir=tmp_path / "st",
                   limits=HostLimits(max_snapshot_bytes=4096))
    for vm in ("a", "b", "c"):
        await lc.create_vm(vm, None, Origin())
        await lc.start_vm(vm, Origin())
    driver.gate.clear()
    driver.entered.clear()
    # a running VM's snapshot may take its guest memory: the first one reserves what is left
    outcomes = await _burst([lc.snapshot_vm(vm, "s", Origin()) for vm in ("a", "b", "c")], driver, 1)
    assert [type(o).__name__ for o in outcomes].count("QuotaExceeded") == 2, outcomes
    assert lc._snaps_taken == {}
    assert sum(len(v.snapshots) for v in await lc.list_vms()) == 1
    await lc.snapshot_vm("b", "s", Origin())  # the reservation became a ~110-byte snapshot: room again
