"""Guest images built from Debian packages only: kernel + initramfs + ext4 root filesystem.

``build_image`` downloads ``linux-image-cloud-amd64`` (resolved to its versioned kernel package) and
``busybox-static`` with ``apt-get download`` (nothing is installed on the host), unpacks them with
``dpkg-deb -x``, and makes:

* ``bzImage`` — the kernel for QEMU's ``-kernel``;
* ``vmlinux`` — the ELF kernel Firecracker wants, unpacked from the bzImage's LZ4 payload;
* ``initramfs.cpio`` — busybox + the virtio modules (``virtio_ring virtio virtio_mmio virtio_blk``,
  loaded in that order); its ``/init`` waits for ``/dev/vda``, mounts it and ``switch_root``s;
* ``rootfs.ext4`` — made with ``mkfs.ext4 -d`` (no loop mounts); its ``/sbin/init`` prints the ready
  line :data:`READY_LINE` and then ``tick N`` once a second (so tests see a paused guest's clock stop
  and a restored guest carry on).

The ``debian`` recipe (``microvm-blueprint image build debian``) shares that kernel, adds ``virtio_net``
and the FAT/ISO modules to the initramfs (whose ``/init`` takes whichever virtio disk holds ext4 as the
root), and makes the root with ``mmdebstrap --variant=minbase`` from the host's own apt mirror (bookworm
+ dropbear-bin, iproute2, python3-minimal; downloaded ``.deb`` files are kept in ``.apt-archives`` for
the next build). Its ``/sbin/init`` runs :mod:`.guestinit` (config drive: instance-id, hostname, root's
authorized_keys, network, ``resize2fs``), starts dropbear and the drive's watcher (``guestinit.py --watch``:
a clone restored from a running guest re-identifies itself, host keys included) and only then prints
:data:`READY_LINE`. The image holds no SSH host keys: dropbear (``-R``) makes each VM's own on first use.
The ``default`` image reads no config drive (its hostname is always ``microvm``).
:func:`import_image` registers a user's own kernel + ext4 root (+ initrd) after checking them.

Images are cached under a folder named by a hash of their inputs (package versions, build recipe,
size; for ``debian`` also :func:`debian_guest_init`, the guest's own init files) with a ``manifest.json``; a build happens in a temporary folder renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ImageError

READY_LINE = "MICROVM-READY"
RECIPE_VERSION = "2"
DEFAULT_ROOTFS_MIB = 64
MODULES = ("virtio_ring", "virtio", "virtio_mmio", "virtio_blk")
"""Modules the guest cannot boot without (loaded in this order, after their dependencies)."""
OPTIONAL_MODULES = ("virtio_net",)
"""Modules carried when the kernel has them (with their dependencies, e.g. ``failover``)."""
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"

INITRAMFS_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t proc proc /proc
for m in {modules}; do /bin/busybox insmod /lib/modules/$m.ko || echo "initramfs: insmod $m failed"; done
n=0
while [ ! -b /dev/vda ]; do
  n=$((n+1))
  if [ $n -gt 400 ]; then echo "initramfs: no /dev/vda"; /bin/busybox sh; fi
  /bin/busybox usleep 25000
done
/bin/busybox mount -t ext4 /dev/vda /newroot || {{ echo "initramfs: cannot mount /dev/vda"; /bin/busybox sh; }}
/bin/busybox mount --move /dev /newroot/dev
/bin/busybox umount /proc
exec /bin/busybox switch_root /newroot /sbin/init
"""

ROOT_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox hostname microvm
echo {ready}
i=0
while true; do
  i=$((i+1))
  echo "tick $i"
  /bin/busybox sleep 1
done
"""

RECIPES = ("default", "debian")
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("dropbear-bin", "iproute2", "python3-minimal")
"""Installed on top of ``mmdebstrap --variant=minbase`` (which brings mount, util-linux, e2fsprogs)."""
DEBIAN_ROOTFS_MIB = 512
DEBIAN_MODULES = (*MODULES, "virtio_net", "vfat")
"""The ``debian`` guest's network and its FAT config drive (``fat`` comes in as vfat's dependency)."""
DEBIAN_OPTIONAL_MODULES = ("nls_cp437", "nls_iso8859-1", "nls_utf8", "nls_ascii", "isofs")
MMDEBSTRAP_TIMEOUT = 1800.0

DEBIAN_INITRAMFS_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t proc proc /proc
for m in {modules}; do /bin/busybox insmod /lib/modules/$m.ko || echo "initramfs: insmod $m failed"; done
n=0
root=
while [ -z "$root" ]; do
  for d in /dev/vda /dev/vdb /dev/vdc /dev/vdd; do
    if [ -b $d ] && /bin/busybox mount -t ext4 $d /newroot 2>/dev/null; then root=$d; break; fi
  done
  [ -n "$root" ] && break
  n=$((n+1))
  if [ $n -gt 400 ]; then echo "initramfs: no ext4 root on /dev/vd*"; /bin/busybox sh; fi
  /bin/busybox usleep 25000
done
/bin/busybox mount --move /dev /newroot/dev
/bin/busybox umount /proc
exec /bin/busybox switch_root /newroot /sbin/init
"""
"""Like :data:`INITRAMFS_INIT`, but the root is whichever virtio disk holds ext4 (the config drive may
come first: virtio-mmio slots are not in command-line order)."""

DEBIAN_INIT = """#!/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
ip link set lo up
hostname microvm
python3 -S /usr/lib/microvm/guestinit.py
mkdir -p /etc/dropbear
dropbear -R -s -p 22 -P /run/dropbear.pid
python3 -S /usr/lib/microvm/guestinit.py --watch &
echo {ready}
exec python3 -S /usr/lib/microvm/reaper.py
"""
"""The ``debian`` root's ``/sbin/init``: config drive (hostname, root's keys, network, grow), sshd, the
drive's watcher (a restored clone re-identifies itself while running), ready."""

REAPER = """import os
import time

while True:  # PID 1: reap every orphan so none stays a zombie
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
"""


@dataclass(frozen=True)
class ImageManifest:
    name: str
    root: str
    bzimage: str
    vmlinux: str
    initramfs: str
    rootfs: str
    rootfs_size_mib: int
    kernel_package: str
    kernel_version: str
    busybox_version: str
    cmdline: str
    ready_line: str
    created_at: float
    sha256: dict[str, str]
    sizes: dict[str, int] = field(default_factory=dict)
    packages: dict[str, str] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    recipe: str = "default"
    """``default`` (busybox), ``debian`` (mmdebstrap root with SSH) or ``imported`` (a user's own)."""
    guest_init: str = ""
    """For ``debian``: :func:`debian_guest_init` of the files the root got (an older image has none)."""

    @classmethod
    def load(cls, folder: Path) -> ImageManifest:
        """The manifest in ``folder``, its file paths taken as absolute paths inside ``folder``: an image's
        files always live in its own folder, so a manifest written with a relative cache dir (or a cache
        that moved) still names files QEMU finds from a VM's folder and ``qemu-img`` from an overlay."""
        folder = Path(folder).absolute()
        try:
            data = json.loads((folder / "manifest.json").read_text())
            manifest = cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise ImageError(f"image manifest in {folder} is unreadable: {exc}") from exc

        def here(path: str) -> str:
            return str(folder / Path(path).name) if path else path

        return dataclasses.replace(manifest, root=str(folder), bzimage=here(manifest.bzimage),
                                   vmlinux=here(manifest.vmlinux), initramfs=here(manifest.initramfs),
                                   rootfs=here(manifest.rootfs))


Progress = Callable[[str], None]


SYSTEM_CACHE_DIR = Path("/var/cache/microvm-blueprint/images")
"""Where a root operator keeps images: its VMMs run as an unprivileged user (DESIGN.md §9), who must reach
them, and root's home (``/root``, 0700) is closed to it."""


def default_cache_dir() -> Path:
    """``MICROVM_IMAGE_DIR``; else :data:`SYSTEM_CACHE_DIR` for root, ``~/.cache/microvm-blueprint/images``
    for anyone else (whose VMMs run as themselves)."""
    env = os.environ.get("MICROVM_IMAGE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return SYSTEM_CACHE_DIR
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "microvm-blueprint" / "images"


def reachable_by_others(path: Path) -> bool:
    """True if a user other than the owner can pass through every folder down to ``path`` (o+x)."""
    p = Path(os.path.realpath(path))
    try:
        return all(os.stat(folder).st_mode & 0o001 for folder in (*reversed(p.parents), p) if folder.exists())
    except OSError:
        return False


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        raise ImageError(f"building a guest image needs `{name}`, which is not installed")
    return path


def _run(argv: list[str], *, cwd: Path | None = None, what: str, input: bytes | None = None,
         timeout: float = 600) -> bytes:
    try:
        proc = subprocess.run(argv, cwd=cwd, input=input, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"{what} failed: {exc}") from exc
    if proc.returncode != 0:
        raise ImageError(f"{what} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-800:]}")
    return proc.stdout


def _package_field(package: str, field: str) -> str:
    out = _run([_tool("apt-cache"), "show", "--no-all-versions", package], what=f"apt-cache show {package}")
    for line in out.decode().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise ImageError(
        f"package {package} has no {field} (is it available? run `apt-get update` first)"
    )


def _versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Candidate versions of ``packages`` in one ``apt-cache show`` (each call reads every package list)."""
    out = _run([_tool("apt-cache"), "show", "--no-all-versions", *packages], what="apt-cache show")
    found: dict[str, str] = {}
    for stanza in out.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[:1] != " ")
        if fields.get("Package") in packages and "Version" in fields:
            found.setdefault(fields["Package"], fields["Version"])
    missing = [p for p in packages if p not in found]
    if missing:
        raise ImageError(f"packages {', '.join(missing)} have no Version (run `apt-get update` first)")
    return found


def resolve_inputs() -> dict[str, str]:
    """The exact packages a default image is built from (needs apt package lists)."""
    depends = _package_field(KERNEL_META, "Depends")
    kernel_pkg = depends.split(",")[0].split()[0]
    return {
        "kernel_package": kernel_pkg,
        "kernel_version": _package_field(kernel_pkg, "Version"),
        "busybox_version": _package_field(BUSYBOX, "Version"),
    }


def debian_guest_init() -> str:
    """A hash of what the ``debian`` recipe writes into the guest from this source tree (its init scripts
    and :mod:`.guestinit`): part of the image key, so an image built by older code is rebuilt."""
    h = hashlib.sha256()
    for part in (DEBIAN_INITRAMFS_INIT, DEBIAN_INIT, REAPER):
        h.update(part.encode() + b"\0")
    h.update(Path(__file__).with_name("guestinit.py").read_bytes())
    return h.hexdigest()[:16]


def image_key(inputs: dict[str, str], rootfs_size_mib: int) -> str:
    blob = json.dumps({**inputs, "recipe": RECIPE_VERSION, "rootfs_mib": rootfs_size_mib}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- cpio (newc) ----------------------------------------------------------------------------


def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, data) entries; directories have empty data."""
    out = bytearray()
    ino = 1
    for path, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
        name = path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        header = "070701" + "".join(
            f"{v:08x}"
            for v in (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name), 0)
        )
        out += header.encode() + name
        out += b"\0" * ((4 - len(out) % 4) % 4)
        out += data
        out += b"\0" * ((4 - len(out) % 4) % 4)
        ino += 1
    return bytes(out)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is LZ4 (legacy frame, as the kernel writes it)."""
    magic = b"\x02\x21\x4c\x18"
    offset = bzimage.find(magic)
    while offset != -1:
        proc = subprocess.run([_tool("lz4"), "-dc"], input=bzimage[offset:], capture_output=True, timeout=120,
                              check=False)
        if proc.stdout[:4] == b"\x7fELF":
            return proc.stdout
        offset = bzimage.find(magic, offset + 1)
    raise ImageError("no LZ4-compressed ELF kernel found inside the bzImage")


# ---- kernel modules ----------------------------------------------------------------------------

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst")


def find_module(moddir: Path, name: str) -> Path | None:
    """The file of module ``name`` under ``moddir`` (``.ko``, ``.ko.xz`` or ``.ko.zst``); ``-``/``_`` alike."""
    alt = {name, name.replace("_", "-"), name.replace("-", "_")}
    for suffix in MODULE_SUFFIXES:
        for n in sorted(alt):
            found = sorted(moddir.rglob(n + suffix))
            if found:
                return found[0]
    return None


def module_bytes(path: Path) -> bytes:
    """A module file's ELF bytes (busybox ``insmod`` wants them uncompressed)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        try:
            data = lzma.decompress(data)
        except lzma.LZMAError as exc:
            raise ImageError(f"module {path.name} is not valid xz: {exc}") from exc
    elif path.name.endswith(".ko.zst"):
        proc = subprocess.run([_tool("zstd"), "-dc"], input=data, capture_output=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise ImageError(f"module {path.name} is not valid zstd: {proc.stderr.decode(errors='replace')[-300:]}")
        data = proc.stdout
    if data[:4] != b"\x7fELF":
        raise ImageError(f"module {path.name} is not an ELF object")
    return data


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list of a module's ``.modinfo`` section."""
    at = ko.find(b"\0depends=")
    if at == -1:
        return []
    end = ko.find(b"\0", at + 1)
    value = ko[at + len(b"\0depends="):end].decode("ascii", "replace")
    return [d for d in value.split(",") if d]


def module_load_order(moddir: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()
                      ) -> list[tuple[str, bytes]]:
    """(name, ELF bytes) of ``required`` + available ``optional`` modules, each after its dependencies."""
    loaded: dict[str, bytes] = {}
    order: list[str] = []

    def visit(name: str, needed: bool, trail: tuple[str, ...]) -> bool:
        if name in loaded:
            return True
        if name in trail:
            raise ImageError(f"kernel modules depend on each other in a cycle: {' -> '.join((*trail, name))}")
        path = find_module(moddir, name)
        if path is None:
            if needed:
                raise ImageError(f"the kernel has no module {name} (looked for {name}.ko[.xz|.zst] in {moddir})")
            return False
        data = module_bytes(path)
        for dep in module_depends(data):
            if not visit(dep, needed, (*trail, name)):
                return False
        loaded[name] = data
        order.append(name)
        return True

    for m in required:
        visit(m, True, ())
    for m in optional:
        visit(m, False, ())
    return [(m, loaded[m]) for m in order]


# ---- build ----------------------------------------------------------------------------------


def build_image(
    name: str = "default",
    *,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    rootfs_size_mib: int | None = None,
    recipe: str | None = None,
) -> ImageManifest:
    """Build (or find cached) the image ``name``; returns its manifest.

    ``recipe`` is ``default`` (busybox guest) or ``debian`` (Debian bookworm with SSH); when not given it is
    ``debian`` for the name ``debian`` and ``default`` for every other name."""
    say = _timed(progress)
    cache = Path(cache_dir or default_cache_dir()).absolute()  # the manifest names absolute paths
    _plain_name(name)
    recipe = recipe or ("debian" if name == "debian" else "default")
    if recipe not in RECIPES:
        raise ImageError(f"unknown image recipe {recipe!r} (known: {', '.join(RECIPES)})")
    size = rootfs_size_mib or (DEBIAN_ROOTFS_MIB if recipe == "debian" else DEFAULT_ROOTFS_MIB)
    tools = ["apt-get", "apt-cache", "dpkg-deb", "mkfs.ext4", "lz4"]
    if recipe == "debian":
        tools.append("mmdebstrap")
    for tool in tools:
        _tool(tool)
    say("resolving Debian packages")
    inputs = resolve_inputs()
    if recipe == "debian":
        sources = host_debian_sources()
        inputs = {**inputs, "recipe_name": "debian", "sources": "|".join(sources),
                  "guest_init": debian_guest_init(),
                  **{f"pkg:{p}": v for p, v in _versions(DEBIAN_PACKAGES).items()}}
    key = image_key(inputs, size)
    final = cache / f"{name}-{key}"
    if (final / "manifest.json").exists():
        say(f"cached: {final}")
        manifest = ImageManifest.load(final)
        _link_name(cache, name, final)
        return manifest
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp_s:
        tmp = Path(tmp_s)
        out = tmp / "image"
        out.mkdir()
        if recipe == "debian":
            kernel = _kernel_and_initramfs(tmp, out, inputs, say, DEBIAN_MODULES, DEBIAN_OPTIONAL_MODULES,
                                           DEBIAN_INITRAMFS_INIT)
            root = tmp / "root"
            packages = _debian_root(root, cache / ".apt-archives", sources, say)
        else:
            kernel = _kernel_and_initramfs(tmp, out, inputs, say, MODULES, OPTIONAL_MODULES, INITRAMFS_INIT)
            root = tmp / "root"
            _busybox_root(root, tmp / "x" / "bin" / "busybox")
            packages = {}
        say(f"making a {size} MiB ext4 root filesystem (mkfs.ext4 -d)")
        rootfs = out / "rootfs.ext4"
        with open(rootfs, "wb") as fh:
            fh.truncate(size * 1024 * 1024)
        _run([_tool("mkfs.ext4"), "-q", "-F", "-L", "microvm-root", "-E", "root_owner=0:0", "-d", str(root),
              str(rootfs)], what="mkfs.ext4")
        os.chmod(rootfs, 0o444)
        say("hashing and writing the manifest")
        files = {"bzImage": "bzimage", "vmlinux": "vmlinux", "initramfs.cpio": "initramfs", "rootfs.ext4": "rootfs"}
        manifest = ImageManifest(
            name=name,
            root=str(final),
            bzimage=str(final / "bzImage"),
            vmlinux=str(final / "vmlinux"),
            initramfs=str(final / "initramfs.cpio"),
            rootfs=str(final / "rootfs.ext4"),
            rootfs_size_mib=size,
            kernel_package=inputs["kernel_package"],
            kernel_version=kernel.version,
            busybox_version=inputs["busybox_version"],
            cmdline="console=ttyS0 reboot=t panic=-1 quiet",
            ready_line=READY_LINE,
            created_at=time.time(),
            sha256={f: _sha256(out / f) for f in files},
            sizes={f: (out / f).stat().st_size for f in files},
            packages={inputs["kernel_package"]: inputs["kernel_version"], BUSYBOX: inputs["busybox_version"],
                      **packages},
            modules=kernel.modules,
            recipe=recipe,
            guest_init=inputs.get("guest_init", ""),
        )
        (out / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    _link_name(cache, name, final)
    say(f"image {name!r} ready in {final}")
    return manifest


@dataclass(frozen=True)
class _Kernel:
    version: str
    modules: list[str]


def _kernel_and_initramfs(tmp: Path, out: Path, inputs: dict[str, str], say: Progress,
                          required: tuple[str, ...], optional: tuple[str, ...], init: str) -> _Kernel:
    """Download the kernel + busybox-static, write ``bzImage``, ``vmlinux`` and ``initramfs.cpio`` to ``out``."""
    debs, unpacked = tmp / "debs", tmp / "x"
    for folder in (debs, unpacked):
        folder.mkdir()
    os.chmod(debs, 0o777)  # apt-get download drops privileges to _apt when it can
    say(f"downloading {inputs['kernel_package']} {inputs['kernel_version']} and {BUSYBOX}")
    _run([_tool("apt-get"), "download", "-q", f"{inputs['kernel_package']}={inputs['kernel_version']}",
          f"{BUSYBOX}={inputs['busybox_version']}"], cwd=debs, what="apt-get download")
    say("unpacking packages")
    for deb in sorted(debs.glob("*.deb")):
        _run([_tool("dpkg-deb"), "-x", str(deb), str(unpacked)], what=f"dpkg-deb -x {deb.name}")
    vmlinuz = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise ImageError("kernel package has no /boot/vmlinuz-*")
    kver = vmlinuz[0].name.removeprefix("vmlinuz-")
    busybox = unpacked / "bin" / "busybox"
    if not busybox.exists():
        raise ImageError("busybox-static package has no /bin/busybox")
    shutil.copyfile(vmlinuz[0], out / "bzImage")
    say("unpacking vmlinux (ELF) for Firecracker")
    (out / "vmlinux").write_bytes(extract_vmlinux((out / "bzImage").read_bytes()))
    moddir = unpacked / "lib" / "modules" / kver / "kernel"
    modules = module_load_order(moddir, required, optional)
    say("writing initramfs with " + " ".join(m for m, _ in modules))
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o40755, b""), ("dev", 0o40755, b""), ("proc", 0o40755, b""), ("sys", 0o40755, b""),
        ("newroot", 0o40755, b""), ("lib", 0o40755, b""), ("lib/modules", 0o40755, b""),
        ("bin/busybox", 0o100755, busybox.read_bytes()),
        ("init", 0o100755, init.format(modules=" ".join(m for m, _ in modules)).encode()),
    ]
    entries += [(f"lib/modules/{m}.ko", 0o100644, data) for m, data in modules]
    (out / "initramfs.cpio").write_bytes(cpio_newc(entries))
    return _Kernel(version=kver, modules=[m for m, _ in modules])


def _busybox_root(root: Path, busybox: Path) -> None:
    """The ``default`` image's root: busybox and an init that prints the ready line, then ticks."""
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root"):
        (root / d).mkdir(parents=True)
    shutil.copyfile(busybox, root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "sbin" / "init").write_text(ROOT_INIT.format(ready=READY_LINE))
    os.chmod(root / "sbin" / "init", 0o755)
    (root / "etc" / "hostname").write_text("microvm\n")


def _plain_name(name: str) -> str:
    if "/" in name or name in {"", ".", ".."} or "\0" in name:
        raise ImageError(f"image name {name!r} must be a plain name")
    return name


def _timed(progress: Progress | None) -> Progress:
    """Progress lines prefixed with the seconds since the build began."""
    if progress is None:
        return lambda line: None
    start = time.monotonic()
    sink = progress
    return lambda line: sink(f"[{time.monotonic() - start:6.1f}s] {line}")


def host_debian_sources(paths: list[Path] | None = None, suite: str = DEBIAN_SUITE) -> list[str]:
    """``deb URI SUITE main`` lines for ``suite``, ``suite-updates`` and ``suite-security`` from the host's
    apt configuration (one-line ``.list`` and deb822 ``.sources``), so the build uses the same mirror."""
    if paths is None:
        base = Path("/etc/apt")
        paths = [base / "sources.list", *sorted((base / "sources.list.d").glob("*.list")),
                 *sorted((base / "sources.list.d").glob("*.sources"))]
    wanted = (suite, f"{suite}-updates", f"{suite}-security")
    found: list[str] = []

    def add(uri: str, suites: list[str]) -> None:
        for s in suites:
            line = f"deb {uri} {s} main"
            if s in wanted and line not in found and re.fullmatch(r"[a-z+]+://[^\s]+", uri):
                found.append(line)

    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, _, v = line.partition(":")
                    fields[k.strip().lower()] = v.strip()
                if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    add(uri.rstrip("/"), fields.get("suites", "").split())
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    add(words[1].rstrip("/"), [words[2]])
    if not found:
        found = [f"deb http://deb.debian.org/debian {suite} main",
                 f"deb http://deb.debian.org/debian {suite}-updates main",
                 f"deb http://deb.debian.org/debian-security {suite}-security main"]
    return found


def _run_streaming(argv: list[str], *, what: str, timeout: float, say: Progress) -> None:
    """Run ``argv`` and pass its ``I:`` lines to ``say``; killed (and reaped) at the deadline."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        raise ImageError(f"{what} failed: {exc}") from exc
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail = [*tail[-30:], line]
            if line.startswith("I: "):
                say(f"{what}: {line[3:]}")
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0:
        late = " (deadline passed)" if code == -9 else ""
        raise ImageError(f"{what} failed ({code}){late}: " + "\n".join(tail)[-1500:])


def _debian_root(root: Path, apt_cache: Path, sources: list[str], say: Progress) -> dict[str, str]:
    """Debian ``minbase`` + :data:`DEBIAN_PACKAGES` in ``root`` with the guest's init; returns package versions.

    Downloaded ``.deb`` files are kept in ``apt_cache`` between builds (mmdebstrap's ``sync-in``/``sync-out``
    hooks), so a rebuild on a warm cache downloads nothing it already has."""
    argv = [_tool("mmdebstrap"), "--variant=minbase", "--include=" + ",".join(DEBIAN_PACKAGES),
            "--components=main"]
    if re.search(r"\s", str(apt_cache)):  # mmdebstrap splits special hooks on white space
        say(f"not keeping downloaded packages: {apt_cache} has white space in its path")
    else:
        apt_cache.mkdir(parents=True, exist_ok=True)
        # The one hook run by a shell is this fixed text (mmdebstrap passes the root as "$1"); the
        # sync-in/sync-out hooks are mmdebstrap's own commands.
        argv += ["--skip=download/empty", "--skip=essential/unlink",
                 '--setup-hook=mkdir -p "$1/var/cache/apt/archives"',
                 f"--setup-hook=sync-in {apt_cache} /var/cache/apt/archives/",
                 f"--customize-hook=sync-out /var/cache/apt/archives {apt_cache}"]
    argv += [DEBIAN_SUITE, str(root), *sources]
    say(f"mmdebstrap {DEBIAN_SUITE} minbase + {', '.join(DEBIAN_PACKAGES)} from {sources[0].split()[1]}")
    _run_streaming(argv, what="mmdebstrap", timeout=MMDEBSTRAP_TIMEOUT, say=say)
    for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()
    say("installing the guest init (config drive, dropbear, ready line)")
    lib = root / "usr" / "lib" / "microvm"
    lib.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).with_name("guestinit.py"), lib / "guestinit.py")
    (lib / "reaper.py").write_text(REAPER)
    init = root / "usr" / "sbin" / "init"
    init.write_text(DEBIAN_INIT.format(ready=READY_LINE))
    os.chmod(init, 0o755)
    (root / "etc" / "hostname").write_text("microvm\n")
    for gone in ("etc/machine-id", "var/lib/dbus/machine-id"):
        p = root / gone
        if p.exists():
            p.write_text("")
    for key in sorted((root / "etc" / "dropbear").glob("dropbear_*_host_key*")):
        key.unlink()  # host keys are every VM's own (made in the guest on first use), never the image's
    return dpkg_versions(root)


def dpkg_versions(root: Path) -> dict[str, str]:
    """``Package: Version`` of every installed package in ``root``'s dpkg status file."""
    out: dict[str, str] = {}
    try:
        text = (root / "var" / "lib" / "dpkg" / "status").read_text()
    except OSError:
        return out
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[:1] != " ")
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            out[fields["Package"]] = fields.get("Version", "")
    return out


# ---- import ---------------------------------------------------------------------------------

IMPORT_CMDLINE = "console=ttyS0 reboot=t panic=-1 root=/dev/vda rw"
KERNEL_MIN_BYTES = 512 * 1024
KERNEL_MAX_BYTES = 256 * 1024 * 1024
INITRD_MAX_BYTES = 1024 * 1024 * 1024
ROOTFS_MIN_BYTES = 1024 * 1024
ROOTFS_MAX_BYTES = 1024 * 1024 * 1024 * 1024
_INITRD_MAGIC = (b"070701", b"070702", b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"\xfd7zXZ\x00", b"\x02\x21\x4c\x18",
                 b"BZh", b"\x5d\x00\x00", b"\x89LZO")


def _import_file(path: Path, what: str, lo: int, hi: int) -> tuple[Path, bytes]:
    """``path`` as a regular, readable file of ``lo``-``hi`` bytes; returns it resolved and its first 64 KiB."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise ImageError(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise ImageError(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{what} {path} is not a regular file")
    if not lo <= st.st_size <= hi:
        raise ImageError(f"{what} {path} is {st.st_size} bytes; expected {lo}-{hi} bytes")
    try:
        with open(path, "rb") as fh:
            head = fh.read(65536)
    except OSError as exc:
        raise ImageError(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc
    return path.resolve(), head


def check_kernel(head: bytes, path: Path) -> str:
    """``bzImage`` (boot protocol header ``HdrS`` at 0x202) or ``elf`` (an ELF ``vmlinux``)."""
    if head[0x202:0x206] == b"HdrS" and head[0x1FE:0x200] == b"\x55\xaa":
        return "bzImage"
    if head[:4] == b"\x7fELF":
        return "elf"
    raise ImageError(f"kernel {path} is neither a bzImage (no HdrS boot header) nor an ELF vmlinux")


def check_ext4(head: bytes, path: Path) -> None:
    """An ext2/3/4 superblock: magic 0xEF53 at byte 1080."""
    if len(head) < 1082 or head[1080:1082] != b"\x53\xef":
        raise ImageError(f"rootfs {path} is not an ext4 file system (no superblock magic at byte 1080); "
                         "make one with `mkfs.ext4 -d DIR FILE`")


def import_image(
    name: str,
    *,
    kernel: Path,
    rootfs: Path,
    initrd: Path | None = None,
    cmdline: str | None = None,
    ready_line: str = READY_LINE,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> ImageManifest:
    """Register a user's own kernel and ext4 root (and initrd) as image ``name``: checked, then copied into
    the cache (the VM's disk is an overlay on the copy; later changes to the originals do not leak in)."""
    say = _timed(progress)
    _plain_name(name)
    if name in RECIPES:
        raise ImageError(f"image name {name!r} is a built-in image; import under another name")
    if "\n" in (cmdline or "") or "\0" in (cmdline or ""):
        raise ImageError("cmdline must be one line")
    if not ready_line or "\n" in ready_line:
        raise ImageError("ready_line must be one non-empty line")
    kpath, khead = _import_file(Path(kernel), "kernel", KERNEL_MIN_BYTES, KERNEL_MAX_BYTES)
    kind = check_kernel(khead, kpath)
    rpath, rhead = _import_file(Path(rootfs), "rootfs", ROOTFS_MIN_BYTES, ROOTFS_MAX_BYTES)
    check_ext4(rhead, rpath)
    ipath: Path | None = None
    if initrd is not None:
        ipath, ihead = _import_file(Path(initrd), "initrd", 1, INITRD_MAX_BYTES)
        if not ihead.startswith(_INITRD_MAGIC):
            raise ImageError(f"initrd {ipath} is neither a cpio archive nor a compressed one")
    cache = Path(cache_dir or default_cache_dir()).absolute()  # the manifest names absolute paths
    cache.mkdir(parents=True, exist_ok=True)
    say("hashing the files")
    sums = {"kernel": _sha256(kpath), "rootfs": _sha256(rpath), **({"initrd": _sha256(ipath)} if ipath else {})}
    key = hashlib.sha256(json.dumps({**sums, "cmdline": cmdline, "ready": ready_line, "name": name},
                                    sort_keys=True).encode()).hexdigest()[:16]
    final = cache / f"{name}-{key}"
    if not (final / "manifest.json").exists():
        with tempfile.TemporaryDirectory(prefix=".import-", dir=cache) as tmp_s:
            out = Path(tmp_s) / "image"
            out.mkdir()
            say(f"copying the kernel ({kind}), the root file system{' and the initrd' if ipath else ''}")
            kfile = "bzImage" if kind == "bzImage" else "vmlinux"
            shutil.copyfile(kpath, out / kfile)
            shutil.copyfile(rpath, out / "rootfs.ext4")
            os.chmod(out / "rootfs.ext4", 0o444)
            if ipath:
                shutil.copyfile(ipath, out / "initramfs.cpio")
            vmlinux = ""
            if kind == "elf":
                vmlinux = str(final / "vmlinux")
            else:
                with contextlib.suppress(ImageError):
                    (out / "vmlinux").write_bytes(extract_vmlinux((out / "bzImage").read_bytes()))
                    vmlinux = str(final / "vmlinux")
            files = [f.name for f in sorted(out.iterdir())]
            size = rpath.stat().st_size
            manifest = ImageManifest(
                name=name, root=str(final), bzimage=str(final / kfile), vmlinux=vmlinux,
                initramfs=str(final / "initramfs.cpio") if ipath else "", rootfs=str(final / "rootfs.ext4"),
                rootfs_size_mib=-(-size // (1024 * 1024)), kernel_package="imported", kernel_version="",
                busybox_version="", cmdline=cmdline or IMPORT_CMDLINE, ready_line=ready_line,
                created_at=time.time(), sha256={f: _sha256(out / f) for f in files},
                sizes={f: (out / f).stat().st_size for f in files},
                packages={}, modules=[], recipe="imported",
            )
            (out / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1, sort_keys=True))
            if final.exists():
                shutil.rmtree(final)
            os.replace(out, final)
    _link_name(cache, name, final)
    say(f"image {name!r} imported into {final}")
    return ImageManifest.load(final)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _link_name(cache: Path, name: str, folder: Path) -> None:
    link = cache / name
    tmp = cache / f".{name}.link"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(folder.name)
    os.replace(tmp, link)


def resolve_image(name: str, cache_dir: Path | None = None) -> ImageManifest:
    """The built image ``name`` (via its name link); ImageError if it was never built."""
    if "/" in name or name in {"", ".", ".."}:
        raise ImageError(f"image name {name!r} must be a plain name")
    cache = Path(cache_dir or default_cache_dir())
    link = cache / name
    if not link.exists():
        if name in RECIPES:  # one of ours: the command to build it is safe to suggest
            raise ImageError(f"image '{name}' is not built (run `microvm-blueprint image build --name {name}`)")
        # any other name is whatever a caller wrote (a job's spec): shown as data, never as a command to paste
        raise ImageError(f"image '{name}' is not built on this operator (only its operator can build or import it)")
    manifest = ImageManifest.load(link.resolve())
    for path in (manifest.bzimage, manifest.initramfs, manifest.rootfs):
        if path and not Path(path).is_file():  # an imported image may have no initramfs
            raise ImageError(f"image '{name}' is incomplete: {path} is missing")
    return manifest


def list_images(cache_dir: Path | None = None) -> list[ImageManifest]:
    cache = Path(cache_dir or default_cache_dir())
    if not cache.is_dir():
        return []
    out = []
    for link in sorted(cache.iterdir()):
        if link.is_symlink() and (link / "manifest.json").exists():
            out.append(ImageManifest.load(link.resolve()))
    return out
