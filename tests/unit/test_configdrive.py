"""The NoCloud config drive (DESIGN.md §8): built with mkfs.vfat + mcopy, read back with mtools and by hand."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from microvm_blueprint.runtime import configdrive
from microvm_blueprint.runtime.configdrive import GuestConfig, GuestNetwork
from microvm_blueprint.runtime.errors import ImageError, InvalidInput

from ..waiting import until
from .test_access import key

yaml = pytest.importorskip("yaml")
needs_tools = pytest.mark.skipif(
    any(shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists() for t in ("mkfs.vfat", "mcopy", "mtype")),
    reason="dosfstools/mtools are not installed (scripts/bootstrap.sh installs them)",
)
ENV = {"PATH": os.environ["PATH"], "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"}

# printable ASCII that means something to YAML or a shell: must come back byte for byte
TRICKY_COMMENT = "a: b #c {d} [e] 'f' \"g\" \\h & *i !j |k >l %m @n `o` $(p) ---"


def _config(**kw: object) -> GuestConfig:
    args: dict[str, object] = {"instance_id": "i-0123abcd", "hostname": "web-1",
                               "ssh_authorized_keys": [key(), key("ssh-rsa", comment=TRICKY_COMMENT)],
                               "network": GuestNetwork.user()}
    args.update(kw)
    return GuestConfig.make(**args)  # type: ignore[arg-type]


def _mtype(image: Path, name: str) -> bytes:
    return subprocess.run(["mtype", "-i", str(image), f"::/{name}"], capture_output=True, check=True, env=ENV,
                          timeout=30).stdout


def _fat_label(image: Path) -> bytes:
    """The volume label as the boot sector records it (FAT12/16: 11 bytes at offset 43, after 0x29)."""
    boot = image.read_bytes()[:512]
    assert boot[510:512] == b"\x55\xaa"
    assert boot[38] == 0x29  # extended boot signature: label and fs type follow
    assert boot[54:62] in (b"FAT12   ", b"FAT16   ")
    return boot[43:54]


@needs_tools
def test_drive_has_the_label_and_the_three_files(tmp_path: Path) -> None:
    cfg = _config()
    dest = configdrive.build_config_drive(cfg, tmp_path / "cidata.img")
    assert dest == tmp_path / "cidata.img"
    assert _fat_label(dest) == b"CIDATA     "
    listing = subprocess.run(["mdir", "-b", "-i", str(dest), "::/"], capture_output=True, text=True, check=True,
                             env=ENV, timeout=30).stdout.split()
    assert sorted(p.rsplit("/", 1)[-1] for p in listing) == ["meta-data", "network-config", "user-data"]
    label = subprocess.run(["mlabel", "-s", "-i", str(dest), "::"], capture_output=True, text=True, check=True,
                           env=ENV, timeout=30).stdout
    assert "CIDATA" in label

    meta = yaml.safe_load(_mtype(dest, "meta-data"))
    assert meta == {"instance-id": "i-0123abcd", "local-hostname": "web-1"}

    user_raw = _mtype(dest, "user-data")
    assert user_raw.startswith(b"#cloud-config\n")
    user = yaml.safe_load(user_raw)
    assert user["ssh_authorized_keys"] == list(cfg.ssh_authorized_keys)  # byte for byte, tricky comment too
    assert user["ssh_authorized_keys"][1].endswith(TRICKY_COMMENT)
    assert user["hostname"] == "web-1" and user["disable_root"] is False and user["resize_rootfs"] is True
    assert user["growpart"] == {"mode": "auto", "devices": ["/"]}

    net = yaml.safe_load(_mtype(dest, "network-config"))
    assert net == {"version": 2, "ethernets": {"eth0": {
        "dhcp4": False, "addresses": ["10.0.2.15/24"], "routes": [{"to": "0.0.0.0/0", "via": "10.0.2.2"}],
        "nameservers": {"addresses": ["10.0.2.3"]}}}}
    assert oct(dest.stat().st_mode & 0o777) == "0o444"
    assert list(tmp_path.iterdir()) == [dest]  # no staging left behind


@needs_tools
def test_bridge_dhcp_and_no_network(tmp_path: Path) -> None:
    bridge = configdrive.build_config_drive(_config(network=GuestNetwork.bridge(), grow_root=False), tmp_path / "b")
    eth = yaml.safe_load(_mtype(bridge, "network-config"))["ethernets"]["eth0"]
    assert eth["addresses"] == ["172.16.0.2/30"] and eth["routes"] == [{"to": "0.0.0.0/0", "via": "172.16.0.1"}]
    user = yaml.safe_load(_mtype(bridge, "user-data"))
    assert user["resize_rootfs"] is False and "growpart" not in user
    dhcp = configdrive.build_config_drive(_config(network=GuestNetwork.user(dhcp=True)), tmp_path / "d")
    eth = yaml.safe_load(_mtype(dhcp, "network-config"))["ethernets"]["eth0"]
    assert eth["dhcp4"] is True and "addresses" not in eth
    none = configdrive.build_config_drive(_config(network=None, ssh_authorized_keys=[]), tmp_path / "n")
    assert yaml.safe_load(_mtype(none, "network-config")) == {"version": 2, "ethernets": {}}
    assert yaml.safe_load(_mtype(none, "user-data"))["ssh_authorized_keys"] == []


@needs_tools
def test_rebuilding_replaces_the_drive_and_a_new_instance_id_shows(tmp_path: Path) -> None:
    dest = tmp_path / "cidata.img"
    configdrive.build_config_drive(_config(), dest)
    clone_id = configdrive.new_instance_id()
    assert clone_id != configdrive.new_instance_id()
    configdrive.build_config_drive(_config(instance_id=clone_id), dest)
    assert yaml.safe_load(_mtype(dest, "meta-data"))["instance-id"] == clone_id


@needs_tools
async def test_async_build_matches(tmp_path: Path) -> None:
    dest = await configdrive.build_config_drive_async(_config(), tmp_path / "a.img")
    assert _fat_label(dest) == b"CIDATA     "
    assert yaml.safe_load(_mtype(dest, "meta-data"))["instance-id"] == "i-0123abcd"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cidata-")]


async def test_async_cancellation_propagates_and_leaves_nothing(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    slow = bin_dir / "mkfs.vfat"
    started = tmp_path / "started"
    slow.write_text(f"#!/bin/sh\necho $$ > {started}\nexec /bin/sleep 30\n")
    slow.chmod(0o755)
    (bin_dir / "mcopy").symlink_to(slow)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(configdrive, "_tool", lambda name: str(bin_dir / name))
    out = tmp_path / "out"
    out.mkdir()
    task = asyncio.create_task(configdrive.build_config_drive_async(_config(), out / "x.img"))
    await until(lambda: started.exists() and started.read_text().strip() != "", what="the tool to start")
    pid = int(started.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped, not left behind
    assert list(out.iterdir()) == []
    with pytest.raises(ImageError, match=r"mkfs\.vfat did not finish within 0s"):
        await configdrive.build_config_drive_async(_config(), out / "x.img", timeout=0.2)
    with pytest.raises(ImageError, match=r"mkfs\.vfat did not finish within 0s"):
        configdrive.build_config_drive(_config(), out / "x.img", timeout=0.2)
    assert list(out.iterdir()) == []


def test_a_missing_tool_is_named_and_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(configdrive, "SBIN_DIRS", ())
    with pytest.raises(ImageError, match=r"needs `mkfs\.vfat` \(apt-get install dosfstools mtools\)"):
        configdrive.build_config_drive(_config(), tmp_path / "x.img")
    assert list(tmp_path.iterdir()) == []


HOSTILE = [
    ("key with newline", {"ssh_authorized_keys": [key() + "\nssh-rsa AAAA"]}, r"ssh_authorized_keys\[0\] must be a"),
    ("key with YAML list", {"ssh_authorized_keys": [key(comment="x\n- evil")]}, "single line"),
    ("key with NUL", {"ssh_authorized_keys": [key() + "\0"]}, "NUL"),
    ("keys as a string", {"ssh_authorized_keys": key()}, "must be a list"),
    ("hostname newline", {"hostname": "web\nruncmd: [reboot]"}, "hostname must be"),
    ("hostname colon", {"hostname": "a: b"}, "hostname must be"),
    ("hostname leading hyphen", {"hostname": "-web"}, "hostname must be"),
    ("hostname too long", {"hostname": "a" * 254}, "hostname must be 1-253"),
    ("hostname empty", {"hostname": ""}, "hostname must be 1-253"),
    ("instance id newline", {"instance_id": "i-1\nlocal-hostname: x"}, "instance_id must be"),
    ("instance id slash", {"instance_id": "../x"}, "instance_id must be"),
    ("instance id long", {"instance_id": "i" * 129}, "instance_id must be"),
    ("bad address", {"network": GuestNetwork(address="10.0.2.300/24")}, "network:"),
    ("no prefix", {"network": GuestNetwork(address="10.0.2.15")}, "network: address needs a prefix"),
    ("gateway off subnet", {"network": GuestNetwork(gateway="10.9.9.9")}, "network: gateway 10.9.9.9 is not"),
    ("gateway is self", {"network": GuestNetwork(gateway="10.0.2.15")}, "network: gateway"),
    ("bad nameserver", {"network": GuestNetwork(nameservers=("x\ny",))}, "network:"),
    ("bad mac", {"network": GuestNetwork(mac="52:54:00:12:34:56\n")}, "network: mac"),
]


@pytest.mark.parametrize(("changes", "message"), [(c, m) for _, c, m in HOSTILE], ids=[n for n, _, _ in HOSTILE])
def test_hostile_inputs_are_rejected_before_any_file(tmp_path: Path, changes: dict[str, object],
                                                     message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        _config(**changes)
    # and a config built around make() is refused by the builder too
    raw = GuestConfig(instance_id="i-1", hostname="h", ssh_authorized_keys=(key(),))
    bad = GuestConfig(**{**raw.__dict__, **{k: (tuple(v) if isinstance(v, list) else v)
                                           for k, v in changes.items()}})
    with pytest.raises(InvalidInput):
        configdrive.build_config_drive(bad, tmp_path / "x.img")
    assert list(tmp_path.iterdir()) == []


def test_hostname_for_any_vm_id() -> None:
    assert configdrive.hostname_for("Web_1") == "web-1"
    assert configdrive.hostname_for("my.vm") == "my-vm"
    weird = configdrive.hostname_for("💥")
    assert weird.startswith("vm-") and configdrive.validate_hostname(weird) == weird
    assert configdrive.validate_hostname(configdrive.hostname_for("x" * 300))


def test_image_size_grows_with_the_keys() -> None:
    small = configdrive.image_kib(_config().files())
    big = configdrive.image_kib(_config(ssh_authorized_keys=[key(comment="c" * 8000)] * 16).files())
    assert small == 1024 and big >= small
