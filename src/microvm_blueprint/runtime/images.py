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

Images are cached under a folder named by a hash of their inputs (package versions, build recipe,
size) with a ``manifest.json``; a build happens in a temporary folder renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import stat
import subprocess
import tempfile
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

    @classmethod
    def load(cls, folder: Path) -> ImageManifest:
        try:
            data = json.loads((folder / "manifest.json").read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise ImageError(f"image manifest in {folder} is unreadable: {exc}") from exc


Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    env = os.environ.get("MICROVM_IMAGE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "microvm-blueprint" / "images"


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


def resolve_inputs() -> dict[str, str]:
    """The exact packages a default image is built from (needs apt package lists)."""
    depends = _package_field(KERNEL_META, "Depends")
    kernel_pkg = depends.split(",")[0].split()[0]
    return {
        "kernel_package": kernel_pkg,
        "kernel_version": _package_field(kernel_pkg, "Version"),
        "busybox_version": _package_field(BUSYBOX, "Version"),
    }


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
    rootfs_size_mib: int = DEFAULT_ROOTFS_MIB,
) -> ImageManifest:
    """Build (or find cached) the image ``name``; returns its manifest."""
    say = progress or (lambda line: None)
    cache = Path(cache_dir or default_cache_dir())
    if "/" in name or name in {"", ".", ".."}:
        raise ImageError(f"image name {name!r} must be a plain name")
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "mkfs.ext4", "lz4"):
        _tool(tool)
    say("resolving Debian packages")
    inputs = resolve_inputs()
    key = image_key(inputs, rootfs_size_mib)
    final = cache / f"{name}-{key}"
    if (final / "manifest.json").exists():
        say(f"cached: {final}")
        manifest = ImageManifest.load(final)
        _link_name(cache, name, final)
        return manifest
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp_s:
        tmp = Path(tmp_s)
        debs, unpacked, out = tmp / "debs", tmp / "x", tmp / "image"
        for folder in (debs, unpacked, out):
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
        modules = module_load_order(moddir, MODULES, OPTIONAL_MODULES)
        say("writing initramfs with " + " ".join(m for m, _ in modules))
        entries: list[tuple[str, int, bytes]] = [
            ("bin", 0o40755, b""), ("dev", 0o40755, b""), ("proc", 0o40755, b""), ("sys", 0o40755, b""),
            ("newroot", 0o40755, b""), ("lib", 0o40755, b""), ("lib/modules", 0o40755, b""),
            ("bin/busybox", 0o100755, busybox.read_bytes()),
            ("init", 0o100755, INITRAMFS_INIT.format(modules=" ".join(m for m, _ in modules)).encode()),
        ]
        entries += [(f"lib/modules/{m}.ko", 0o100644, data) for m, data in modules]
        (out / "initramfs.cpio").write_bytes(cpio_newc(entries))
        say(f"making a {rootfs_size_mib} MiB ext4 root filesystem (mkfs.ext4 -d)")
        root = tmp / "root"
        for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root"):
            (root / d).mkdir(parents=True)
        shutil.copyfile(busybox, root / "bin" / "busybox")
        os.chmod(root / "bin" / "busybox", 0o755)
        (root / "bin" / "sh").symlink_to("busybox")
        (root / "sbin" / "init").write_text(ROOT_INIT.format(ready=READY_LINE))
        os.chmod(root / "sbin" / "init", 0o755)
        (root / "etc" / "hostname").write_text("microvm\n")
        rootfs = out / "rootfs.ext4"
        with open(rootfs, "wb") as fh:
            fh.truncate(rootfs_size_mib * 1024 * 1024)
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
            rootfs_size_mib=rootfs_size_mib,
            kernel_package=inputs["kernel_package"],
            kernel_version=kver,
            busybox_version=inputs["busybox_version"],
            cmdline="console=ttyS0 reboot=t panic=-1 quiet",
            ready_line=READY_LINE,
            created_at=time.time(),
            sha256={f: _sha256(out / f) for f in files},
            sizes={f: (out / f).stat().st_size for f in files},
            packages={inputs["kernel_package"]: inputs["kernel_version"], BUSYBOX: inputs["busybox_version"]},
            modules=[m for m, _ in modules],
        )
        (out / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    _link_name(cache, name, final)
    say(f"image {name!r} ready in {final}")
    return manifest


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
        raise ImageError(f"image '{name}' is not built (run `microvm-blueprint image build --name {name}`)")
    manifest = ImageManifest.load(link.resolve())
    for path in (manifest.bzimage, manifest.initramfs, manifest.rootfs):
        if not Path(path).is_file():
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
