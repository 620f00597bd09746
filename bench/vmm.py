"""VM lifecycle and density under QEMU (TCG here), each against bare QEMU measured in the same run."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

from microvm_blueprint.runtime import images
from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings, qemu_argv
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmSpec
from microvm_blueprint.runtime.store import Store

from .common import emit, median, pss_kib, rss_kib

REPO = Path(__file__).resolve().parent.parent
IMAGE_DIR = Path(os.environ.get("MICROVM_IMAGE_DIR", REPO / ".cache" / "images"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "9"))
CREATE_ROUNDS = 5 * ROUNDS
BOOT_ROUNDS = 2 * ROUNDS - 1  # odd, so the median pair is one pair


def _image(name: str = "default", size: int = images.DEFAULT_ROOTFS_MIB) -> images.ImageManifest:
    try:
        m = images.resolve_image(name, IMAGE_DIR)
        if m.rootfs_size_mib == size:
            return m
    except Exception:  # noqa: BLE001 - build it
        pass
    return images.build_image(name, cache_dir=IMAGE_DIR, rootfs_size_mib=size)


class BareQemu:
    """QEMU started by hand with the driver's own argv (minus -S), console to a chardev file."""

    def __init__(self, manifest: images.ImageManifest, workdir: Path, mem_mib: int = 256) -> None:
        self.manifest = manifest
        self.workdir = workdir
        self.mem = mem_mib
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient("bare")

    async def boot(self, timeout: float = 120) -> float:
        import subprocess

        await asyncio.to_thread(
            subprocess.run,
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", self.manifest.rootfs,
             str(self.workdir / "disk.qcow2")],
            check=True,
        )
        argv = qemu_argv(QemuSettings(), self.manifest, vcpus=1, mem_mib=self.mem, accel="tcg")
        argv = [a for a in argv if a != "-S"]
        i = argv.index("-serial")
        argv[i - 1] = "file,id=console,path=console.log"  # -chardev value
        t0 = time.perf_counter()
        self.proc = await asyncio.create_subprocess_exec(*argv, cwd=self.workdir, stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.DEVNULL)
        path = self.workdir / "console.log"
        while not (path.exists() and images.READY_LINE in path.read_text(errors="replace")):
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError("bare qemu did not boot")
            await asyncio.sleep(0.01)
        return time.perf_counter() - t0

    async def connect(self) -> None:
        fd = os.open(self.workdir, os.O_RDONLY)
        s = socket.socket(socket.AF_UNIX)
        s.connect(f"/proc/self/fd/{fd}/qmp.sock")
        await self.qmp.connect(s)

    async def save(self, path: Path) -> float:
        t0 = time.perf_counter()
        await self.qmp.execute("stop")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.qmp.send_fd_scm(fd)
        await self.qmp.execute("getfd", {"fdname": "m"})
        os.close(fd)
        await self.qmp.execute("migrate", {"uri": "fd:m"})
        while True:
            answer = await self.qmp.execute("query-migrate")
            if isinstance(answer, dict) and answer.get("status") == "completed":
                break
            await asyncio.sleep(0.005)
        await self.qmp.execute("cont")
        return time.perf_counter() - t0

    async def kill(self) -> None:
        with contextlib.suppress(Exception):  # a QMP session left open logs an EOFError when QEMU dies
            await asyncio.wait_for(self.qmp.disconnect(), 3)
        if self.proc and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def lifecycle() -> None:
    small = _image()
    _image("bench-4g", 4096)  # built once; created from below by name
    ours_boot: list[float] = []
    bare_boot: list[float] = []
    ours_snap: list[float] = []
    bare_snap: list[float] = []
    restore: list[float] = []
    create_small: list[float] = []
    create_big: list[float] = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        life = Lifecycle(QemuDriver(QemuSettings(image_dir=IMAGE_DIR, accel="tcg")), Store(tmp / "s.db"),
                         state_dir=tmp / "state")
        o = Origin()
        async def bare_boot_round(r: int) -> None:
            wd = tmp / f"bare-boot-{r}"
            wd.mkdir()
            bare = BareQemu(small, wd)
            bare_boot.append(await bare.boot())
            await bare.kill()

        async def our_boot_round(r: int) -> None:
            t0 = time.perf_counter()
            await life.create_vm(f"boot-{r}", None, o)
            await life.start_vm(f"boot-{r}", o)
            ours_boot.append(time.perf_counter() - t0)
            await life.destroy_vm(f"boot-{r}", o)

        async def bare_round(r: int) -> None:
            wd = tmp / f"bare-{r}"
            wd.mkdir()
            bare = BareQemu(small, wd)
            await bare.boot()
            await bare.connect()
            await asyncio.sleep(1)
            bare_snap.append(await bare.save(wd / "mem.bin"))
            await bare.kill()

        async def our_round(r: int) -> None:
            await life.create_vm(f"vm-{r}", None, o)
            await life.start_vm(f"vm-{r}", o)
            await asyncio.sleep(1)
            t0 = time.perf_counter()
            await life.snapshot_vm(f"vm-{r}", "s", o)
            ours_snap.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await life.restore_vm(f"vm-{r}", "s", f"copy-{r}", o)
            restore.append(time.perf_counter() - t0)
            for vm in (f"vm-{r}", f"copy-{r}"):
                await life.destroy_vm(vm, o)

        # boots on their own, each after a sync, so no snapshot's 256 MiB is being written back by the
        # kernel under a boot. Bare and ours take turns to go first, and each pair is compared with
        # itself: TCG boots swing by up to a second between pairs, much less within one
        for r in range(BOOT_ROUNDS):
            for step in (bare_boot_round, our_boot_round) if r % 2 == 0 else (our_boot_round, bare_boot_round):
                await asyncio.to_thread(os.sync)
                await step(r)
        for r in range(ROUNDS):
            for step in (bare_round, our_round) if r % 2 == 0 else (our_round, bare_round):
                await asyncio.to_thread(os.sync)
                await step(r)
        # create alone is ~50 ms, so it gets more rounds than a boot, the two images taking turns to go first
        for r in range(CREATE_ROUNDS):
            pair = [("default", create_small), ("bench-4g", create_big)]
            for image, acc in pair if r % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter()
                await life.create_vm(f"c-{image}-{r}", VmSpec(image=image), o)
                acc.append(time.perf_counter() - t0)
                await life.destroy_vm(f"c-{image}-{r}", o)
        await life.close(stop_vms=True)
    emit(
        "vm_lifecycle",
        {"create_start_ready_s": round(median(ours_boot), 3), "snapshot_running_256mib_s": round(median(ours_snap), 3),
         "restore_to_running_s": round(median(restore), 3), "create_64mib_s": round(median(create_small), 4),
         "create_4gib_s": round(median(create_big), 4), "rounds": ROUNDS, "boot_rounds": BOOT_ROUNDS,
         "create_rounds": CREATE_ROUNDS},
        {"bare_boot_ready_s": round(median(bare_boot), 3), "bare_qmp_migrate_s": round(median(bare_snap), 3)},
        {"boot_vs_bare": round(median([a / b for a, b in zip(ours_boot, bare_boot, strict=True)]), 3),
         "boot_vs_bare_medians": round(median(ours_boot) / median(bare_boot), 3),
         "boot_vs_bare_every_pair": [round(a / b, 2) for a, b in zip(ours_boot, bare_boot, strict=True)],
         "snapshot_vs_bare": round(median(ours_snap) / median(bare_snap), 3),
         "cold_boot_over_restore": round(median(ours_boot) / median(restore), 1),
         "create_4gib_vs_64mib": round(median(create_big) / median(create_small), 3)},
        targets={"boot_vs_bare": "<= 1.10 (median of the pairs' ratios)", "snapshot_vs_bare": "<= 1.2", "cold_boot_over_restore": ">= 5",
                 "create_4gib_vs_64mib": "<= 1.2"},
    )


async def density(count: int = 16) -> None:
    manifest = _image()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        bares = []
        for i in range(2):
            wd = tmp / f"bare-{i}"
            wd.mkdir()
            b = BareQemu(manifest, wd, mem_mib=128)
            await b.boot(300)
            bares.append(b)
        bare_pss = median([pss_kib(b.proc.pid) for b in bares if b.proc])
        for b in bares:
            await b.kill()
        driver = QemuDriver(QemuSettings(image_dir=IMAGE_DIR, accel="tcg", boot_timeout=600))
        life = Lifecycle(driver, Store(tmp / "s.db"), state_dir=tmp / "state")
        o = Origin()
        # one VM through create, start and destroy first: imports, caches and the first use of each
        # code path are not per-VM growth (without it, the figure swung between -40 and +35 KiB)
        await life.create_vm("warm", VmSpec(mem_mib=128), o)
        await life.start_vm("warm", o)
        await life.destroy_vm("warm", o)
        gc.collect()
        rss0 = rss_kib(os.getpid())
        for i in range(count):
            await life.create_vm(f"d-{i}", VmSpec(mem_mib=128), o)
        sem = asyncio.Semaphore(4)

        async def start(i: int) -> None:
            async with sem:
                await life.start_vm(f"d-{i}", o)

        await asyncio.gather(*(start(i) for i in range(count)))
        gc.collect()
        rss1 = rss_kib(os.getpid())
        pss: list[float] = []
        for i in range(count):
            stored = life.store.get_vm(f"d-{i}")
            handle = stored.handle if stored else None
            if handle is None or handle.pid is None:
                raise RuntimeError(f"d-{i} has no running VMM to measure")
            pss.append(pss_kib(handle.pid))
        for i in range(count):
            await life.destroy_vm(f"d-{i}", o)
        await life.close(stop_vms=True)
    per_vm = median(pss)
    emit(
        "density",
        {"guests": count, "guest_mem_mib": 128, "vmm_pss_per_vm_mib": round(per_vm / 1024, 1),
         "operator_rss_growth_per_vm_kib": round((rss1 - rss0) / count, 1)},
        {"bare_qemu_pss_mib": round(bare_pss / 1024, 1)},
        {"vmm_pss_vs_bare": round(per_vm / bare_pss, 3)},
        targets={"operator_rss_growth_per_vm_kib": "< 1024"},
    )
