"""The debian guest's config reader (runs under python3-minimal, which has no json): checked here on the
exact files the config drive carries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from microvm_blueprint.runtime import guestinit
from microvm_blueprint.runtime.configdrive import GuestConfig, GuestNetwork

from .test_access import key
from .test_configdrive import TRICKY_COMMENT


def test_the_small_json_reader_reads_every_config_drive_file() -> None:
    cfg = GuestConfig.make("i-1", "web-1", [key(), key("ssh-rsa", comment=TRICKY_COMMENT)], GuestNetwork.user())
    for name, data in cfg.files().items():
        text = data.decode()
        body = text.split("\n", 1)[1] if text.startswith("#cloud-config") else text
        assert guestinit.parse_json(body) == json.loads(body), name


@pytest.mark.parametrize("doc", [
    {"a": [1, -2.5, 3e2, True, False, None, "x\"y\\z\n\u00e9\u2028"], "b": {}, "c": [], "d": {"e": [{}]}},
    [], "plain", 0,
])
def test_the_small_json_reader_agrees_with_json(doc: object) -> None:
    for text in (json.dumps(doc), json.dumps(doc, indent=2), json.dumps(doc, ensure_ascii=False)):
        assert guestinit.parse_json(text) == doc


@pytest.mark.parametrize("bad", ["{", "[1,]", "{\"a\" 1}", "{1: 2}", "[1] x", "tru", "'a'"])
def test_the_small_json_reader_refuses_what_json_refuses(bad: str) -> None:
    with pytest.raises((ValueError, IndexError)):
        json.loads(bad)
    with pytest.raises((ValueError, IndexError)):
        guestinit.parse_json(bad)


def test_hand_made_yaml_falls_back_to_simple_lines() -> None:
    doc = guestinit.parse_simple_yaml("instance-id: iid-local01\nlocal-hostname: 'box'\n"
                                      "ssh_authorized_keys:\n  - ssh-ed25519 AAAA a\n  - \"ssh-rsa BBBB b\"\n")
    assert doc == {"instance-id": "iid-local01", "local-hostname": "box",
                   "ssh_authorized_keys": ["ssh-ed25519 AAAA a", "ssh-rsa BBBB b"]}


def test_the_guest_rechecks_keys() -> None:
    assert guestinit._KEY.fullmatch(key())
    assert guestinit._KEY.fullmatch(key("sk-ecdsa-sha2-nistp256@openssh.com", comment=TRICKY_COMMENT))
    assert not guestinit._KEY.fullmatch('command="sh" ' + key())
    assert not guestinit._KEY.fullmatch(key() + "\n" + key())


def _drive(tmp_path: Path, iid: str, hostname: str) -> Path:
    from microvm_blueprint.runtime.configdrive import build_config_drive

    if shutil.which("mkfs.vfat") is None and not Path("/usr/sbin/mkfs.vfat").exists():
        pytest.skip("mkfs.vfat is not installed")
    if shutil.which("mcopy") is None:
        pytest.skip("mcopy is not installed")
    return build_config_drive(GuestConfig.make(iid, hostname, [key()], GuestNetwork.user()),
                              tmp_path / f"{iid}.img")


def test_the_fingerprint_of_a_drive_changes_with_its_instance_id(tmp_path: Path) -> None:
    """What the watcher polls: the drive's first 64 KiB (a plain file here: BLKFLSBUF is refused, fadvise
    drops the cache instead); two drives for two instance-ids differ in it (the FAT volume serial)."""
    a, b = _drive(tmp_path, "i-aaaa", "src-1"), _drive(tmp_path, "i-bbbb", "src-2")
    fa, fb = guestinit.fingerprint(str(a)), guestinit.fingerprint(str(b))
    assert len(fa) == min(guestinit.FINGERPRINT_BYTES, a.stat().st_size)
    assert fa[:512] != fb[:512]  # already the boot sector differs
    assert guestinit.fingerprint(str(a)) == fa


def test_a_running_guest_re_identifies_only_for_another_instance_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    net = json.loads(GuestConfig.make("i-1", "h", [], GuestNetwork.user()).network_config())
    drive: dict[str, object] = {"meta": {"instance-id": "i-old", "local-hostname": "src-1"}}
    applied: list[str] = []
    monkeypatch.setattr(guestinit, "IID_FILE", str(tmp_path / "instance-id"))
    monkeypatch.setattr(guestinit, "NET_FILE", str(tmp_path / "net"))
    monkeypatch.setattr(guestinit, "read_drive", lambda dev, fs: (drive["meta"], {}, net))

    def apply_identity(meta: dict[str, object], user: dict[str, object]) -> str:
        applied.append(str(meta["local-hostname"]))
        (tmp_path / "instance-id").write_text(str(meta["instance-id"]) + "\n")
        return str(meta["instance-id"])

    monkeypatch.setattr(guestinit, "apply_identity", apply_identity)
    networks: list[object] = []
    monkeypatch.setattr(guestinit, "apply_network", networks.append)
    (tmp_path / "instance-id").write_text("i-old\n")  # what boot applied
    guestinit.remember_network(net)
    assert guestinit.reidentify("/dev/vdb", "vfat") is None  # the same drive: nothing happens
    assert applied == [] and guestinit.REIDENT_PREFIX not in capsys.readouterr().out
    drive["meta"] = {"instance-id": "i-new", "local-hostname": "src-2"}  # a clone's drive
    assert guestinit.reidentify("/dev/vdb", "vfat") == "i-new"
    assert applied == ["src-2"]
    assert capsys.readouterr().out.splitlines()[-1] == "microvm: re-identified as i-new"
    assert networks == []  # the same network: left alone (SSH sessions on it survive)
    assert guestinit.reidentify("/dev/vdb", "vfat") is None  # applied once
    monkeypatch.setattr(guestinit, "read_drive", lambda dev, fs: None)
    with pytest.raises(OSError, match="cannot mount"):  # the watcher tries again next round
        guestinit.reidentify("/dev/vdb", "vfat")


def test_a_changed_network_config_is_seen_whatever_its_key_order() -> None:
    a = {"version": 2, "ethernets": {"eth0": {"addresses": ["10.0.2.15/24"], "dhcp4": False}}}
    b = {"ethernets": {"eth0": {"dhcp4": False, "addresses": ["10.0.2.15/24"]}}, "version": 2}
    assert guestinit.canonical(a) == guestinit.canonical(b)
    assert guestinit.canonical(a) != guestinit.canonical({**a, "ethernets": {"eth0": {"addresses": ["10.0.3.15/24"]}}})
