"""Runs inside the ``debian`` guest at boot (python3-minimal: no json, no yaml): applies the config drive.

Not imported by the operator: :mod:`.images` copies this file into the guest's root as
``/usr/lib/microvm/guestinit.py``; the tests import it to check its readers. Standard library only.

Finds the NoCloud drive (label ``cidata``/``CIDATA``, FAT or ISO9660) among the virtio disks, mounts it
read-only, and applies ``meta-data`` (instance-id, hostname), ``user-data`` (root's authorized_keys,
resize_rootfs) and ``network-config`` version 2 (static addresses, routes, nameservers). The files are JSON
(what this project writes); plain ``key: value`` YAML is read as a fallback for hand-made drives.
Every value is checked again here before it reaches a file or a command (argv lists only).

``guestinit.py --watch`` then runs for the guest's life: a VM restored from a snapshot of a *running* guest
(a clone) carries on with the source's memory, hostname and instance-id, but boots with a config drive of
its own. Every :data:`WATCH_EVERY` seconds the watcher reads the drive's first 64 KiB past the page cache
(BLKFLSBUF, i.e. ``blockdev --flushbufs``, then ``pread``: one small virtio-blk read, no process started);
when those bytes change and the drive names another instance-id, it re-applies the hostname, root's
authorized_keys and (only if it differs) the network, renews dropbear's host keys (see below), and only then
prints ``microvm: re-identified as <id>`` on the console: once that line is out, a new SSH connection to the
clone meets the clone's own host keys. A poll rather than a host trigger: it needs nothing from the VMM
(QEMU and Firecracker restores alike, and a clone restored by an older operator), and costs next to nothing
between changes.

Host keys belong to an instance-id. The image ships none; dropbear runs with ``-R`` (it makes a key of the
asked type on first use and keeps it in ``/etc/dropbear``), so every VM makes its own. Whenever the drive
names another instance-id than the one the disk last applied, the keys on disk are someone else's (a clone
of a running guest, or a disk copied from another VM) and are removed: at boot before dropbear starts, and
in a running clone by :func:`renew_host_keys`, which also restarts the dropbear *listener* (it may hold the
source's keys in memory), leaving the SSH sessions already open (its own child processes) alone.
"""

import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

MOUNT = "/run/cidata"
IID_FILE = "/var/lib/cloud/data/instance-id"
NET_FILE = "/run/microvm-network"
"""The network config applied (canonical text), so a re-read re-does the network only if it changed."""
REIDENT_PREFIX = "microvm: re-identified as "
"""The console line a running guest prints when its drive names another instance-id (+ the new one)."""
WATCH_EVERY = 2.0
DROPBEAR_DIR = "/etc/dropbear"
DROPBEAR_PID = "/run/dropbear.pid"
DROPBEAR_ARGV = ("dropbear", "-R", "-s", "-p", "22", "-P", DROPBEAR_PID)
"""How ``/sbin/init`` starts the SSH server, and the watcher restarts it (``-R``: host keys made on first use)."""
SSH_PORT = 22
LISTENER_DEADLINE = 20.0
"""How long a restart of the dropbear listener may take (the old one gone, the new one listening)."""
_HOST_KEY = re.compile(r"dropbear_[a-z0-9]+_host_key(\.tmp[0-9]+)?")
FINGERPRINT_BYTES = 64 * 1024
BLKFLSBUF = 0x1261
_IID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_KEY = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|"
                  r"sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/=]+( [ -~]*)?")
_TOKEN = re.compile(r'\s*(?:(?P<s>"(?:[^"\\]|\\.)*")|(?P<n>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|(?P<w>true|false|null)'
                    r"|(?P<p>[{}\[\],:]))")
_ESC = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def say(msg: str) -> None:
    print("microvm-init: " + msg, flush=True)


def run(*argv: str) -> bool:
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"{argv[0]}: {exc}")
        return False
    if proc.returncode != 0:
        say("{} failed: {}".format(" ".join(argv), proc.stderr.decode(errors="replace").strip()[-300:]))
    return proc.returncode == 0


def _unescape(s: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c != "\\":
            out.append(c)
            i += 1
        elif s[i + 1] == "u":
            out.append(chr(int(s[i + 2:i + 6], 16)))
            i += 6
        else:
            out.append(_ESC[s[i + 1]])
            i += 2
    return "".join(out)


def parse_json(text: str) -> Any:
    """A small strict JSON reader (python3-minimal has no json module)."""
    toks: list[tuple[str, Any]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"bad JSON at {pos}")
        pos = m.end()
        if m.group("s") is not None:
            toks.append(("s", _unescape(m.group("s")[1:-1])))
        elif m.group("n") is not None:
            n = m.group("n")
            toks.append(("v", float(n) if "." in n or "e" in n.lower() else int(n)))
        elif m.group("w") is not None:
            toks.append(("v", {"true": True, "false": False, "null": None}[m.group("w")]))
        else:
            toks.append(("p", m.group("p")))
    value, i = _value(toks, 0)
    if i != len(toks):
        raise ValueError("trailing JSON")
    return value


def _value(toks: list[tuple[str, Any]], i: int) -> tuple[Any, int]:
    kind, v = toks[i]
    if kind != "p":
        return v, i + 1
    if v == "[":
        out: list[Any] = []
        i += 1
        if toks[i] == ("p", "]"):
            return out, i + 1
        while True:
            item, i = _value(toks, i)
            out.append(item)
            if toks[i] == ("p", "]"):
                return out, i + 1
            if toks[i] != ("p", ","):
                raise ValueError("expected , in list")
            i += 1
    if v == "{":
        obj: dict[str, Any] = {}
        i += 1
        if toks[i] == ("p", "}"):
            return obj, i + 1
        while True:
            if toks[i][0] != "s" or toks[i + 1] != ("p", ":"):
                raise ValueError("expected key")
            obj[toks[i][1]], i = _value(toks, i + 2)
            if toks[i] == ("p", "}"):
                return obj, i + 1
            if toks[i] != ("p", ","):
                raise ValueError("expected , in object")
            i += 1
    raise ValueError(f"unexpected {v!r}")


def parse_simple_yaml(text: str) -> dict[str, Any]:
    """Fallback for hand-made drives: top-level ``key: value`` and ``key:`` + ``- item`` lists."""
    out: dict[str, Any] = {}
    current = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] not in " -\t" and ":" in line:
            k, _, v = line.partition(":")
            v = v.strip().strip("'\"")
            current = k.strip()
            out[current] = v if v else []
        elif line.strip().startswith("- ") and isinstance(out.get(current), list):
            out[current].append(line.strip()[2:].strip().strip("'\""))
    return out


def load(name: str) -> dict[str, Any]:
    try:
        with open(os.path.join(MOUNT, name), encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return {}
    body = text.split("\n", 1)[1] if text.startswith("#cloud-config") else text
    try:
        doc = parse_json(body)
    except (ValueError, IndexError, KeyError):
        doc = parse_simple_yaml(body)
    return doc if isinstance(doc, dict) else {}


def find_drive() -> tuple[str | None, str | None]:
    for dev in sorted(os.listdir("/sys/class/block")):
        if not re.fullmatch(r"vd[a-z]+", dev):
            continue
        try:
            with open("/dev/" + dev, "rb") as fh:
                head = fh.read(512)
                fh.seek(32808)
                iso = fh.read(32)
        except OSError:
            continue
        if head[510:512] == b"\x55\xaa" and (head[43:54].strip().lower() == b"cidata"
                                             or head[71:82].strip().lower() == b"cidata"):
            return "/dev/" + dev, "vfat"
        if iso.strip().lower() == b"cidata":
            return "/dev/" + dev, "iso9660"
    return None, None


def root_device() -> str | None:
    with open("/proc/mounts") as fh:
        for line in fh:
            dev, mnt = line.split()[:2]
            if mnt == "/" and dev.startswith("/dev/"):
                return dev
    return None


def apply_network(net: dict[str, Any]) -> None:
    found = net.get("ethernets")
    ethernets: dict[str, Any] = found if isinstance(found, dict) else {}
    resolv: list[str] = []
    for name, eth in sorted(ethernets.items()):
        if not isinstance(eth, dict):
            continue
        iface = name
        mac = (eth.get("match") or {}).get("macaddress") if isinstance(eth.get("match"), dict) else None
        if isinstance(mac, str):
            for cand in os.listdir("/sys/class/net"):
                try:
                    with open(f"/sys/class/net/{cand}/address") as fh:
                        if fh.read().strip().lower() == mac.lower():
                            iface = cand
                except OSError:
                    continue
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", iface) or not os.path.exists("/sys/class/net/" + iface):
            say(f"network: no interface {iface!r}")
            continue
        run("ip", "link", "set", iface, "up")
        if eth.get("dhcp4") is True:
            say(f"network: dhcp4 asked for {iface}, but this image has no DHCP client")
        for addr in eth.get("addresses") or []:
            if isinstance(addr, str) and re.fullmatch(r"[0-9.]+/[0-9]{1,2}", addr):
                run("ip", "addr", "add", addr, "dev", iface)
        routes = [r for r in eth.get("routes") or [] if isinstance(r, dict)]
        if isinstance(eth.get("gateway4"), str):
            routes.append({"to": "0.0.0.0/0", "via": eth["gateway4"]})
        for route in routes:
            to, via = route.get("to"), route.get("via")
            if not (isinstance(to, str) and isinstance(via, str) and re.fullmatch(r"[0-9.]+", via)):
                continue
            to = "default" if to in ("0.0.0.0/0", "default") else to
            if to == "default" or re.fullmatch(r"[0-9.]+/[0-9]{1,2}", to):
                run("ip", "route", "add", to, "via", via, "dev", iface)
        found_ns = eth.get("nameservers")
        ns: dict[str, Any] = found_ns if isinstance(found_ns, dict) else {}
        resolv += [a for a in ns.get("addresses") or [] if isinstance(a, str) and re.fullmatch(r"[0-9.]+", a)]
    if resolv:
        with open("/etc/resolv.conf", "w") as fh:
            fh.write("".join(f"nameserver {a}\n" for a in resolv))


def read_drive(dev: str, fstype: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
    """``meta-data``, ``user-data`` and ``network-config`` as the drive holds them *now*: the device's
    cached blocks are dropped first (a guest restored from a snapshot still holds the source's drive in
    its page cache when anything kept the device open), then it is mounted read-only, read, unmounted."""
    flush(dev)
    os.makedirs(MOUNT, exist_ok=True)
    if not run("mount", "-t", fstype, "-o", "ro", dev, MOUNT):
        return None
    try:
        return load("meta-data"), load("user-data"), load("network-config")
    finally:
        run("umount", MOUNT)


def flush(dev: str) -> None:
    """Drop ``dev``'s cached blocks."""
    fd = os.open(dev, os.O_RDONLY)
    try:
        _drop_cache(fd)
    finally:
        os.close(fd)


def _drop_cache(fd: int) -> None:
    # BLKFLSBUF is `blockdev --flushbufs` (a block device, root); a plain file (the tests) takes fadvise
    try:
        fcntl.ioctl(fd, BLKFLSBUF)
    except OSError:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def fingerprint(dev: str) -> bytes:
    """The drive's first :data:`FINGERPRINT_BYTES` read past the page cache: the FAT boot sector (whose
    volume serial this project derives from the instance-id), the FAT and root directory, or an ISO9660
    primary volume descriptor. Cheap enough to take every couple of seconds under TCG."""
    fd = os.open(dev, os.O_RDONLY)
    try:
        _drop_cache(fd)
        return os.pread(fd, FINGERPRINT_BYTES, 0)
    finally:
        os.close(fd)


def instance_id_of(meta: dict[str, Any]) -> str | None:
    iid = meta.get("instance-id")
    return iid if isinstance(iid, str) and _IID.fullmatch(iid) else None


def applied_instance_id() -> str | None:
    """The instance-id this guest last applied (``/var/lib/cloud/data/instance-id``)."""
    try:
        with open(IID_FILE) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def apply_identity(meta: dict[str, Any], user: dict[str, Any]) -> str | None:
    """Record the instance-id, set the hostname and write root's authorized_keys; returns the instance-id."""
    iid = instance_id_of(meta)
    if iid is not None:
        os.makedirs(os.path.dirname(IID_FILE), exist_ok=True)
        with open(IID_FILE + ".tmp", "w") as fh:
            fh.write(iid + "\n")
        os.replace(IID_FILE + ".tmp", IID_FILE)
        say("instance-id " + iid)
    host = meta.get("local-hostname") or user.get("hostname")
    if isinstance(host, str) and len(host) <= 253 and _HOSTNAME.fullmatch(host):
        socket.sethostname(host)
        with open("/etc/hostname", "w") as fh:
            fh.write(host + "\n")
        with open("/etc/hosts", "w") as fh:
            fh.write("127.0.0.1 localhost\n127.0.1.1 {} {}\n::1 localhost ip6-localhost\n".format(host, host.split(".")[0]))
    keys = [k for k in user.get("ssh_authorized_keys") or [] if isinstance(k, str) and _KEY.fullmatch(k)
            and len(k) <= 8192]
    os.makedirs("/root/.ssh", mode=0o700, exist_ok=True)
    os.chmod("/root/.ssh", 0o700)
    tmp = "/root/.ssh/.authorized_keys.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        fh.write("".join(k + "\n" for k in keys))
    os.replace(tmp, "/root/.ssh/authorized_keys")
    say(f"{len(keys)} authorized key(s) for root")
    return iid


def canonical(doc: Any) -> str:
    """A stable text of a parsed document (dict keys sorted), to compare two network configs."""
    if isinstance(doc, dict):
        return "{" + ",".join(repr(k) + ":" + canonical(doc[k]) for k in sorted(doc)) + "}"
    if isinstance(doc, list):
        return "[" + ",".join(canonical(v) for v in doc) + "]"
    return repr(doc)


def remember_network(net: dict[str, Any]) -> None:
    with open(NET_FILE, "w") as fh:
        fh.write(canonical(net))


def network_changed(net: dict[str, Any]) -> bool:
    try:
        with open(NET_FILE) as fh:
            return fh.read() != canonical(net)
    except OSError:
        return True


def reapply_network(net: dict[str, Any]) -> None:
    """A running guest's network, re-done only when the drive asks for another one (a clone on the same
    user-mode or /30 network keeps its addresses, and the SSH sessions on them, untouched)."""
    if not network_changed(net):
        return
    found = net.get("ethernets")
    for name in sorted(found) if isinstance(found, dict) else []:
        if re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", name) and os.path.exists("/sys/class/net/" + name):
            run("ip", "route", "flush", "dev", name)
            run("ip", "addr", "flush", "dev", name)
    apply_network(net)
    remember_network(net)
    say("network re-applied")


def host_keys_stale(applied: str | None, iid: str | None) -> bool:
    """True if the host keys on disk belong to another instance than ``iid`` (the drive's): the disk last
    applied another instance-id, or none (a first boot: keys, if any, came with the image). A drive without
    an instance-id changes nothing."""
    return iid is not None and applied != iid


def remove_host_keys(folder: str = DROPBEAR_DIR) -> list[str]:
    """Remove dropbear's host keys (and half-written ones) from ``folder``; returns the names removed."""
    try:
        names = sorted(n for n in os.listdir(folder) if _HOST_KEY.fullmatch(n))
    except FileNotFoundError:
        return []
    for name in names:
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            continue
    return names


def listening(port: int, proc_net: list[str]) -> bool:
    """True if one of ``proc_net`` (texts of ``/proc/net/tcp``, ``/proc/net/tcp6``) has a socket listening
    on ``port`` (state ``0A``)."""
    for text in proc_net:
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and fields[1].rsplit(":", 1)[-1].upper() == f"{port:04X}":
                return True
    return False


def _proc_net() -> list[str]:
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as fh:
                out.append(fh.read())
        except OSError:
            continue
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has closed its sockets: gone for our purpose)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def listener_pid(pidfile: str = DROPBEAR_PID) -> int | None:
    """The dropbear listener's pid from its pid file, if that process is a live dropbear."""
    try:
        with open(pidfile) as fh:
            pid = int(fh.read().strip())
        with open(f"/proc/{pid}/comm") as fh:
            comm = fh.read().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == "dropbear" and _alive(pid) else None


def _wait(cond: Any, deadline: float) -> bool:
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def start_listener() -> bool:
    """Start dropbear (:data:`DROPBEAR_ARGV`); it forks into the background once it listens. Its output goes
    to a file, not a pipe: the listener it leaves behind would hold a pipe open (and a reader waiting)."""
    try:
        with open("/run/dropbear-start.log", "w+") as err:
            proc = subprocess.run(list(DROPBEAR_ARGV), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                  timeout=60, check=False)
            err.seek(0)
            text = err.read()
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"dropbear: {exc}")
        return False
    if proc.returncode != 0:
        say(f"dropbear failed ({proc.returncode}): {text.strip()[-300:]}")
    return proc.returncode == 0


def renew_host_keys() -> None:
    """A running clone's own host keys: stop the dropbear listener (SIGTERM, SIGKILL after half the deadline;
    the sessions it forked are processes of their own and stay), remove the source's keys, start a new
    listener (``-R`` makes keys on first use) and wait until it listens. OSError if it does not."""
    deadline = time.monotonic() + LISTENER_DEADLINE
    old = listener_pid()
    if old is not None:
        os.kill(old, signal.SIGTERM)
        if not _wait(lambda: not _alive(old), deadline - LISTENER_DEADLINE / 2):
            os.kill(old, signal.SIGKILL)
            _wait(lambda: not _alive(old), deadline)
    removed = remove_host_keys()
    while not start_listener():  # the old socket may linger a moment
        if time.monotonic() >= deadline:
            raise OSError("dropbear did not start again")
        time.sleep(0.2)
    if not _wait(lambda: listening(SSH_PORT, _proc_net()), deadline):
        raise OSError(f"dropbear does not listen on port {SSH_PORT}")
    say(f"host keys renewed ({len(removed)} removed), dropbear restarted")


def reidentify(dev: str, fstype: str) -> str | None:
    """Re-read the drive; if it names another instance-id than the one applied, apply it (hostname, root's
    keys, network where it changed, new host keys) and then say so on the console. Returns the new
    instance-id, else None; OSError if the drive cannot be read (the caller tries again)."""
    found = read_drive(dev, fstype)
    if found is None:
        raise OSError(f"cannot mount {dev}")
    meta, user, net = found
    iid = instance_id_of(meta)
    if iid is None or iid == applied_instance_id():
        return None
    apply_identity(meta, user)
    reapply_network(net)
    try:
        renew_host_keys()
    except OSError as exc:  # the identity is applied (not retried); the console says what went wrong
        say(f"SSH server not back with new host keys: {exc}")
    print(f"{REIDENT_PREFIX}{iid}", flush=True)
    return iid


def watch(every: float = WATCH_EVERY) -> int:
    """Runs for the guest's life (started by ``/sbin/init`` after boot): every ``every`` seconds a
    fingerprint of the drive read past the page cache; when it changes (a VM restored from a snapshot of
    a running guest gets a config drive of its own), :func:`reidentify`. Never gives up on an error."""
    dev, fstype = find_drive()
    if dev is None or fstype is None:
        return 0
    last, trouble = b"", ""
    while True:
        try:
            seen = fingerprint(dev)
            if seen != last:
                # the first look compares too: a snapshot may have been taken before this watcher started
                reidentify(dev, fstype)
                last, trouble = seen, ""
        except Exception as exc:  # keep watching; the console says what went wrong (once, not every round)
            if f"{type(exc).__name__}: {exc}" != trouble:
                trouble = f"{type(exc).__name__}: {exc}"
                say("config drive not re-read: " + trouble)
        time.sleep(every)


def main() -> int:
    dev, fstype = find_drive()
    if dev is None or fstype is None:
        say("no config drive (label cidata)")
        return 0
    found = read_drive(dev, fstype)
    if found is None:
        return 1
    meta, user, net = found
    if host_keys_stale(applied_instance_id(), instance_id_of(meta)):
        removed = remove_host_keys()  # before dropbear starts: -R makes this VM's own on first use
        if removed:
            say(f"host keys of another instance removed: {' '.join(removed)}")
    apply_identity(meta, user)
    apply_network(net)
    remember_network(net)
    if user.get("resize_rootfs", True) not in (False, "false", "False"):
        root = root_device()
        if root:
            run("resize2fs", root)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(watch() if sys.argv[1:] == ["--watch"] else main())
    except Exception as exc:  # never stop the boot: the console says what went wrong
        say(f"config drive not applied: {type(exc).__name__}: {exc}")
        sys.exit(1)
