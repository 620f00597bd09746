"""The debian guest's config reader (runs under python3-minimal, which has no json): checked here on the
exact files the config drive carries."""

from __future__ import annotations

import json
import shutil
import subprocess
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
    renewed: list[str] = []  # the host keys are renewed before the line is printed (hosts wait on it)
    monkeypatch.setattr(guestinit, "renew_host_keys", lambda: renewed.append(capsys.readouterr().out))
    (tmp_path / "instance-id").write_text("i-old\n")  # what boot applied
    guestinit.remember_network(net)
    assert guestinit.reidentify("/dev/vdb", "vfat") is None  # the same drive: nothing happens
    assert applied == [] and guestinit.REIDENT_PREFIX not in capsys.readouterr().out
    drive["meta"] = {"instance-id": "i-new", "local-hostname": "src-2"}  # a clone's drive
    assert guestinit.reidentify("/dev/vdb", "vfat") == "i-new"
    assert applied == ["src-2"]
    assert len(renewed) == 1 and guestinit.REIDENT_PREFIX not in renewed[0]
    assert capsys.readouterr().out.splitlines()[-1] == "microvm: re-identified as i-new"
    assert networks == []  # the same network: left alone (SSH sessions on it survive)
    assert guestinit.reidentify("/dev/vdb", "vfat") is None  # applied once
    assert len(renewed) == 1
    monkeypatch.setattr(guestinit, "read_drive", lambda dev, fs: None)
    with pytest.raises(OSError, match="cannot mount"):  # the watcher tries again next round
        guestinit.reidentify("/dev/vdb", "vfat")


def test_a_changed_network_config_is_seen_whatever_its_key_order() -> None:
    a = {"version": 2, "ethernets": {"eth0": {"addresses": ["10.0.2.15/24"], "dhcp4": False}}}
    b = {"ethernets": {"eth0": {"dhcp4": False, "addresses": ["10.0.2.15/24"]}}, "version": 2}
    assert guestinit.canonical(a) == guestinit.canonical(b)
    assert guestinit.canonical(a) != guestinit.canonical({**a, "ethernets": {"eth0": {"addresses": ["10.0.3.15/24"]}}})


def test_host_keys_belong_to_one_instance_id() -> None:
    assert guestinit.host_keys_stale(None, "i-new")  # a first boot: any key on disk came with the image
    assert guestinit.host_keys_stale("i-source", "i-clone")  # a clone, or a disk copied from another VM
    assert not guestinit.host_keys_stale("i-same", "i-same")  # a reboot keeps the VM's keys
    assert not guestinit.host_keys_stale("i-same", None)  # a drive without an instance-id changes nothing


def test_only_dropbear_host_keys_are_removed(tmp_path: Path) -> None:
    keys = ["dropbear_ed25519_host_key", "dropbear_ecdsa_host_key", "dropbear_rsa_host_key",
            "dropbear_rsa_host_key.tmp123"]
    for name in [*keys, "authorized_keys", "dropbear_ed25519_host_key.pub", "notes"]:
        (tmp_path / name).write_text("x")
    assert guestinit.remove_host_keys(str(tmp_path)) == sorted(keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["authorized_keys", "dropbear_ed25519_host_key.pub",
                                                          "notes"]
    assert guestinit.remove_host_keys(str(tmp_path)) == []
    assert guestinit.remove_host_keys(str(tmp_path / "none")) == []


PROC_NET_TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0F02000A:0016 0202000A:C350 01 00000000:00000000 02:000A7B4D 00000000     0        0 2 1 0 20 4 30 10 -1
"""
PROC_NET_TCP6 = """  sl  local_address                         remote_address                        st tx_queue
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000
"""


def test_a_listener_is_seen_in_proc_net_tcp() -> None:
    assert guestinit.listening(22, [PROC_NET_TCP])
    assert guestinit.listening(8080, [PROC_NET_TCP, PROC_NET_TCP6])
    # an established connection on port 22 (a session that stays) is not a listener
    established = PROC_NET_TCP.splitlines()[0] + "\n" + PROC_NET_TCP.splitlines()[2]
    assert not guestinit.listening(22, [established, PROC_NET_TCP6])
    assert not guestinit.listening(2222, [PROC_NET_TCP, PROC_NET_TCP6])
    assert not guestinit.listening(22, [])


def test_the_listener_pid_is_a_live_dropbear(tmp_path: Path) -> None:
    import os

    pidfile = tmp_path / "dropbear.pid"
    assert guestinit.listener_pid(str(pidfile)) is None  # no file
    pidfile.write_text(f"{os.getpid()}\n")  # a live process, but not dropbear (a reused pid)
    assert guestinit.listener_pid(str(pidfile)) is None
    pidfile.write_text("garbage\n")
    assert guestinit.listener_pid(str(pidfile)) is None
    sleep = shutil.which("sleep")
    assert sleep is not None
    shutil.copy(sleep, tmp_path / "dropbear")  # a real process whose name is dropbear
    proc = subprocess.Popen([str(tmp_path / "dropbear"), "60"])
    try:
        pidfile.write_text(f"{proc.pid}\n")
        assert guestinit.listener_pid(str(pidfile)) == proc.pid
        proc.terminate()
        proc.wait(timeout=10)
        assert guestinit.listener_pid(str(pidfile)) is None  # gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
