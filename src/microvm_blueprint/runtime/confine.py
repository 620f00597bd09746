"""Who a VMM runs as and the cgroup it runs in (DESIGN.md §9): the one place that decides both.

* **User.** When the operator is root, a VMM is spawned as ``MICROVM_VMM_USER`` (default ``microvm``, a
  system user ``scripts/bootstrap.sh`` creates) from its first instruction: ``subprocess``'s
  ``user=``/``group=``/``extra_groups=`` (the ``kvm`` and ``tun`` groups when they exist), never QEMU's
  ``-runas`` (which dies under ``-sandbox ...,elevateprivileges=deny``). When the operator is not root, the
  VMM simply runs as the operator's user. Every VMM gets umask 077.
* **A uid per VM.** With ``MICROVM_VMM_UID_RANGE`` (default 1879048192-1879113727), each VM's VMM runs as a uid
  (and gid) of its own from that range, recorded with the VM by the lifecycle core, with the ``kvm``/``tun``
  groups as supplementary groups and no ``/etc/passwd`` entry: one VMM cannot open another VM's disk,
  console, sockets or memory. Every method below takes that ``uid``; ``None`` means the shared
  ``MICROVM_VMM_USER`` (VMs from before per-VM uids keep it). :func:`check_uid_range` refuses a range
  that holds a user, a group or a subordinate id of the host.
* **Files.** The VM folder is its VMM's user's and 0700, its files 0600 (:meth:`Confinement.own`); the
  operator (root) still reads them.
* **Cgroup.** Each VMM in a cgroup of its own with a memory limit (guest memory + overhead), a pids limit
  and a CPU quota (its vCPUs): cgroup v2 where it is mounted with those controllers, else the v1
  ``memory``/``pids``/``cpu`` hierarchies, at ``<controller root>/<parent>/<name>``. Removed at destroy;
  empty ones left by a dead operator are swept. Where cgroups cannot be used (not root, read-only), a
  warning is logged once and VMMs run without.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_USER = "microvm"
DEVICE_GROUPS = ("kvm", "tun")
"""Groups a VMM user joins when they exist (``/dev/kvm``, ``/dev/net/tun`` are usually theirs)."""
DEFAULT_UID_RANGE = (0x70000000, 0x7000FFFF)
"""``MICROVM_VMM_UID_RANGE``'s default, 1879048192-1879113727: 65,536 uids that no conventional allocation
reaches: above every account (system and regular users, ``nobody`` 65534, systemd's dynamic users
61184-65519), above what ``useradd`` hands out as subordinate ids (``SUB_UID_MAX`` 600100000), and between
systemd's container range (524288-1879048191) and its foreign range (from 2147352576). A lower default
(200000-265535) fell into the subordinate ids ``useradd`` gives a host's second user, so a root operator
on such a host refused to start."""
UID_RANGE_BOUNDS = (65536, 2**31 - 2)
"""Where a range may lie: above the 16-bit ids accounts use, below the ids tools read as negative."""
CPU_PERIOD_US = 100_000
V1_CONTROLLERS = ("memory", "pids", "cpu")


@dataclass(frozen=True)
class VmmUser:
    """The account a VMM runs as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class CgroupLimits:
    """One VMM's limits: memory in bytes, processes/threads, whole CPUs."""

    mem_bytes: int
    pids: int
    cpus: int


def resolve_user(name: str | None) -> VmmUser | None:
    """The VMM user: ``None`` when the operator is not root (the VMM runs as the operator) or when
    ``name`` is empty or ``root`` (no switch). Raises :class:`ConfigError` for a user that does not exist."""
    if os.geteuid() != 0 or not name or name == "root":
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(
            f"MICROVM_VMM_USER={name!r}: no such user; create it (scripts/bootstrap.sh runs `useradd --system "
            f"--no-create-home --shell /usr/sbin/nologin {name}`) or name another unprivileged user"
        ) from None
    if pw.pw_uid == 0:
        raise ConfigError(f"MICROVM_VMM_USER={name!r} is uid 0: the VMM must run unprivileged")
    groups: list[int] = []
    for g in DEVICE_GROUPS:
        with contextlib.suppress(KeyError):
            groups.append(grp.getgrnam(g).gr_gid)
    return VmmUser(name, pw.pw_uid, pw.pw_gid, tuple(groups))


def parse_uid_range(raw: str) -> tuple[int, int] | None:
    """``MICROVM_VMM_UID_RANGE``: ``LO-HI`` inclusive within :data:`UID_RANGE_BOUNDS`, or empty / ``off``
    (``None``: every VMM runs as the shared ``MICROVM_VMM_USER``). Raises :class:`ConfigError`."""
    text = raw.strip()
    if text in ("", "off"):
        return None
    lo, sep, hi = text.partition("-")
    low, high = UID_RANGE_BOUNDS
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit() or not low <= int(lo) <= int(hi) <= high:
        raise ConfigError(f"MICROVM_VMM_UID_RANGE={raw!r} must be LO-HI with {low} <= LO <= HI <= {high} "
                          "(or `off`: every VMM runs as MICROVM_VMM_USER)")
    return int(lo), int(hi)


def _subid_ranges(path: str) -> list[tuple[str, int, int]]:
    """``name:start:count`` lines of ``/etc/subuid`` or ``/etc/subgid`` as (name, first, last)."""
    found: list[tuple[str, int, int]] = []
    try:
        text = Path(path).read_text()
    except OSError:
        return found
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() and int(parts[2]) > 0:
            found.append((parts[0], int(parts[1]), int(parts[1]) + int(parts[2]) - 1))
    return found


def check_uid_range(uid_range: tuple[int, int], *, subuid: str = "/etc/subuid",
                    subgid: str = "/etc/subgid") -> None:
    """Refuse (:class:`ConfigError`) a ``MICROVM_VMM_UID_RANGE`` that is not the VMMs' alone: one holding a
    user or a group of the host (``/etc/passwd``, ``/etc/group``: the VMM's gid is its uid; the shared
    VMM user and the device groups are among them), the operator's own ids, or a subordinate id range
    (a rootless container could run as it). Called at start."""
    lo, hi = uid_range
    var = f"MICROVM_VMM_UID_RANGE={lo}-{hi}"
    taken: list[str] = []
    taken += [f"user {p.pw_name} (uid {p.pw_uid})" for p in pwd.getpwall() if lo <= p.pw_uid <= hi]
    taken += [f"group {g.gr_name} (gid {g.gr_gid})" for g in grp.getgrall() if lo <= g.gr_gid <= hi]
    own = {os.getuid(), os.geteuid(), os.getgid(), os.getegid(), *os.getgroups()}
    taken += [f"the operator's own id {i}" for i in sorted(own) if lo <= i <= hi]
    for path in (subuid, subgid):
        taken += [f"{name}'s subordinate ids {a}-{b} in {path}" for name, a, b in _subid_ranges(path)
                  if a <= hi and lo <= b]
    if taken:
        raise ConfigError(f"{var} overlaps " + "; ".join(taken[:5]) + (" and more" if len(taken) > 5 else "")
                          + ": give the VMMs a range of ids nothing else on this host uses")


class Confinement:
    """Spawn credentials, file ownership and per-VMM cgroups, injected into a driver's settings."""

    def __init__(
        self,
        user: str | None = DEFAULT_USER,
        *,
        cgroups: bool = True,
        cgroup_root: str | Path = "/sys/fs/cgroup",
        parent: str = "microvm",
        mem_overhead_mib: int = 256,
        pids_max: int = 512,
    ) -> None:
        """``mem_overhead_mib``: what a VMM may use beyond its guest's memory (QEMU itself, TCG's code
        cache, device buffers); may be negative in tests that want a VMM killed by its cgroup."""
        self.user = resolve_user(user)
        self.cgroups = cgroups
        self.cgroup_root = Path(cgroup_root)
        self.parent = parent
        self.mem_overhead_mib = mem_overhead_mib
        self.pids_max = pids_max
        self._warned = False

    # ---- user and files ----------------------------------------------------------------------

    def vm_user(self, uid: int | None = None) -> VmmUser | None:
        """Who a VMM runs as: ``uid`` (a VM's own, gid the same, with the device groups), else the shared
        VMM user; ``None`` when the operator does not switch users (not root, or no VMM user)."""
        if self.user is None:
            return None
        if uid is None:
            return self.user
        return VmmUser(f"uid {uid}", uid, uid, self.user.groups)

    def isolates_users(self) -> bool:
        """True if VMMs switch users here, so each VM may get a uid of its own (``MICROVM_VMM_UID_RANGE``)."""
        return self.user is not None

    def spawn_kwargs(self, uid: int | None = None) -> dict[str, Any]:
        """Keyword arguments for ``asyncio.create_subprocess_exec``: the VMM's user (:meth:`vm_user`, when
        switching) and umask 077."""
        kw: dict[str, Any] = {"umask": 0o077}
        user = self.vm_user(uid)
        if user is not None:
            kw.update(user=user.uid, group=user.gid, extra_groups=list(user.groups))
        return kw

    def setpriv_prefix(self, uid: int | None = None) -> list[str]:
        """argv prefix that drops to the VMM's user (:meth:`vm_user`) just before the VMM runs (util-linux
        ``setpriv``), for a VMM that must be started as root first (inside a network namespace: ``ip netns
        exec``). Supplementary groups: exactly the device groups (none: ``--clear-groups``)."""
        user = self.vm_user(uid)
        if user is None:
            return []
        groups = ",".join(str(g) for g in user.groups)
        return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                f"--groups={groups}" if groups else "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
                "--"]

    def tap_owner(self, uid: int | None = None) -> tuple[int, int] | None:
        """(uid, gid) a TAP must belong to for the VMM's user (:meth:`vm_user`) to open it without privileges."""
        user = self.vm_user(uid)
        return (user.uid, user.gid) if user is not None else None

    def own(self, path: str | Path, mode: int, uid: int | None = None) -> None:
        """Make ``path`` the VMM's user's (:meth:`vm_user`, when switching) with ``mode``. Raises OSError."""
        user = self.vm_user(uid)
        if user is not None:
            os.chown(path, user.uid, user.gid, follow_symlinks=False)
        os.chmod(path, mode)

    def can_use(self, path: str | Path, write: bool = False, uid: int | None = None) -> bool:
        """True if the VMM's user (:meth:`vm_user`) can read (and, with ``write``, write) ``path``: by its
        mode bits and those of every folder above it (the operator, root, would pass ``os.access`` anyway)."""
        user = self.vm_user(uid)
        if user is None:
            return os.access(path, os.R_OK | (os.W_OK if write else 0))
        p = Path(os.path.realpath(path))
        try:
            for folder in reversed(p.parents):
                if not _allows(user, os.stat(folder), 1):
                    return False
            return _allows(user, os.stat(p), 4 | (2 if write else 0))
        except OSError:
            return False

    # ---- cgroups -----------------------------------------------------------------------------

    def limits(self, mem_mib: int, vcpus: int) -> CgroupLimits:
        """A VMM's limits for a guest of ``mem_mib`` MiB and ``vcpus`` vCPUs."""
        return CgroupLimits(max(32, mem_mib + self.mem_overhead_mib) << 20, self.pids_max, max(1, vcpus))

    def _v2_root(self) -> Path | None:
        """The cgroup v2 mount, if it has the memory, pids and cpu controllers."""
        for root in (self.cgroup_root, self.cgroup_root / "unified"):
            try:
                have = set((root / "cgroup.controllers").read_text().split())
            except OSError:
                continue
            if {"memory", "pids", "cpu"} <= have:
                return root
        return None

    def cgroup_version(self) -> int:
        """2 where cgroup v2 has the memory, pids and cpu controllers, else 1 (for Firecracker's jailer)."""
        return 2 if self._v2_root() is not None else 1

    def _dirs(self, name: str) -> list[tuple[str, Path]]:
        """(controller or ``v2``, folder) of the cgroup ``name``."""
        v2 = self._v2_root()
        if v2 is not None:
            return [("v2", v2 / self.parent / name)]
        return [(c, self.cgroup_root / c / self.parent / name) for c in V1_CONTROLLERS
                if (self.cgroup_root / c / "cgroup.procs").exists()]

    def _warn(self, what: str, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("VMMs run without cgroup limits: cannot %s (%s)", what, exc.strerror or exc)

    def enter(self, name: str, pid: int, limits: CgroupLimits) -> bool:
        """Create the cgroup ``name`` with ``limits`` and move ``pid`` into it. True if it did; False
        (warned once) where cgroups cannot be used."""
        if not self.cgroups:
            return False
        dirs = self._dirs(name)
        if not dirs:
            self._warn("find cgroup controllers", OSError(f"none under {self.cgroup_root}"))
            return False
        try:
            for kind, folder in dirs:
                if kind == "v2":  # the controllers must be enabled on the way down
                    folder.parent.mkdir(exist_ok=True)
                    for level in (folder.parent.parent, folder.parent):
                        _write(level / "cgroup.subtree_control", "+memory +pids +cpu")
                folder.mkdir(parents=True, exist_ok=True)
                for file, value in _limit_files(kind, limits):
                    _write(folder / file, value)
                for file, value in _best_effort(kind, limits):
                    with contextlib.suppress(OSError):
                        _write(folder / file, value)
            for _, folder in dirs:
                _write(folder / "cgroup.procs", str(pid))
        except OSError as exc:
            self._warn(f"set up cgroup {dirs[0][1]}", exc)
            self.remove(name)
            return False
        return True

    def paths(self, name: str) -> list[Path]:
        """The folders of the cgroup ``name`` (whether or not they exist)."""
        return [folder for _, folder in self._dirs(name)]

    def remove(self, name: str, timeout: float = 2.0) -> None:
        """Remove the cgroup ``name`` (its processes gone; a just-reaped one may linger a moment)."""
        if not self.cgroups:
            return
        deadline = time.monotonic() + timeout
        for folder in self.paths(name):
            while folder.is_dir():
                try:
                    folder.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        log.warning("cannot remove cgroup %s: it still has processes", folder)
                        break
                    time.sleep(0.02)

    def sweep(self, keep: set[str] | None = None) -> int:
        """Remove the empty cgroups under the parent (left by an operator that died), except ``keep``.
        A cgroup with a process in it cannot be removed (the kernel refuses), so a live VMM's stays."""
        if not self.cgroups:
            return 0
        removed = 0
        for folder in {f.parent for f in self.paths("swept")}:
            with contextlib.suppress(OSError):
                for entry in folder.iterdir():
                    if entry.is_dir() and entry.name not in (keep or set()):
                        with contextlib.suppress(OSError):
                            entry.rmdir()
                            removed += 1
        return removed


def _allows(user: VmmUser, st: os.stat_result, bits: int) -> bool:
    """True if ``user`` has ``bits`` (4 read, 2 write, 1 search) on a file with ``st``, by its mode bits."""
    if st.st_uid == user.uid:
        shift = 6
    elif st.st_gid == user.gid or st.st_gid in user.groups:
        shift = 3
    else:
        shift = 0
    return (stat.S_IMODE(st.st_mode) >> shift) & bits == bits


def _limit_files(kind: str, lim: CgroupLimits) -> list[tuple[str, str]]:
    if kind == "v2":
        return [("memory.max", str(lim.mem_bytes)), ("pids.max", str(lim.pids)),
                ("cpu.max", f"{lim.cpus * CPU_PERIOD_US} {CPU_PERIOD_US}")]
    if kind == "memory":
        return [("memory.limit_in_bytes", str(lim.mem_bytes))]
    if kind == "pids":
        return [("pids.max", str(lim.pids))]
    return [("cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu.cfs_quota_us", str(lim.cpus * CPU_PERIOD_US))]


def _best_effort(kind: str, lim: CgroupLimits) -> list[tuple[str, str]]:
    """Settings a kernel may lack: no swap beyond the limit; charges follow the process into the group."""
    if kind == "v2":
        return [("memory.swap.max", "0")]
    if kind == "memory":
        return [("memory.move_charge_at_immigrate", "3"), ("memory.memsw.limit_in_bytes", str(lim.mem_bytes))]
    return []


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
