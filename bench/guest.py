"""`debian` guests (issue #12): create+start to SSH-ready against a bare QEMU boot of the same image with
the same devices, and the image build on a cold and on a warm apt cache.

`python -m bench guest` (boots, `BENCH_ROUNDS` pairs, default 5) and `python -m bench build`
(`BENCH_BUILD_ROUNDS` cold/warm pairs, default 1). Figures are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from microvm_blueprint.runtime import images
from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings, qemu_argv
from microvm_blueprint.runtime.adapters.qemu.argv import CONFIG_DRIVE, CONSOLE_LOG, DISK
from microvm_blueprint.runtime.configdrive import build_config_drive_async, guest_config
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import (
    NetworkMode,
    NetworkSettings,
    Origin,
    PortMapping,
    VmNetwork,
    VmRecord,
    VmSpec,
    VmStatus,
)
from microvm_blueprint.runtime.store import Store

from .common import emit, median

REPO = Path(__file__).resolve().parent.parent
IMAGE_DIR = Path(os.environ.get("MICROVM_IMAGE_DIR", REPO / ".cache" / "images"))
PAIRS = int(os.environ.get("BENCH_ROUNDS", "5"))
BUILD_ROUNDS = int(os.environ.get("BENCH_BUILD_ROUNDS", "1"))
BOOT_TIMEOUT = 300.0
SSH_DEADLINE = 300.0
SSH_EVERY = 0.25
"""Both sides are polled with the same `ssh ... true` loop, so its step (plus one ssh run) is the
resolution of either figure and cancels out of the ratio on average."""
# the spec job 8 builds for `create_vm_with_config vm 1 512 0 debian [key] [22]`
VCPUS, MEM_MIB = 1, 512


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _debian() -> images.ImageManifest:
    try:
        return images.resolve_image("debian", IMAGE_DIR)
    except Exception:  # noqa: BLE001 - build it (minutes, once per cache)
        return images.build_image("debian", cache_dir=IMAGE_DIR, progress=lambda line: print(line, file=sys.stderr))


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench@microvm", "-f", str(path)],
                   check=True, timeout=30)
    return path.with_suffix(".pub").read_text().strip()


def _ssh_true(key: Path, port: int) -> bool:
    try:
        r = subprocess.run(
            ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
             "root@127.0.0.1", "true"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


async def wait_ssh(key: Path, port: int, t0: float, deadline: float = SSH_DEADLINE) -> float:
    """Seconds from ``t0`` until a real `ssh root@127.0.0.1 -p PORT true` succeeds (polled, with a deadline)."""
    while not await asyncio.to_thread(_ssh_true, key, port):
        if time.perf_counter() - t0 > deadline:
            raise TimeoutError(f"no ssh on port {port} within {deadline:.0f} s")
        await asyncio.sleep(SSH_EVERY)
    return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BareDebian:
    """`qemu-system-x86_64` started by hand with the argv the driver builds for the same VM (config drive,
    user-mode NIC with a `hostfwd` to guest port 22, `restrict=on`), minus `-S`; the overlay and the
    config drive are made before the clock starts, as one would by hand."""

    def __init__(self, manifest: images.ImageManifest, workdir: Path, pub: str) -> None:
        self.manifest = manifest
        self.workdir = workdir
        self.pub = pub
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    async def prepare(self) -> list[str]:
        await asyncio.to_thread(
            subprocess.run,
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", self.manifest.rootfs,
             str(self.workdir / DISK)],
            check=True, timeout=60,
        )
        self.port = _free_port()
        network = VmNetwork(NetworkMode.USER, (PortMapping(22, "127.0.0.1", self.port),))
        spec = VmSpec(vcpus=VCPUS, mem_mib=MEM_MIB, image="debian", ssh_keys=(self.pub,), ports=(22,))
        record = VmRecord(self.workdir.name, VmStatus.CREATED, spec, str(self.workdir), network=network)
        await build_config_drive_async(guest_config(record), self.workdir / CONFIG_DRIVE)
        argv = qemu_argv(QemuSettings(image_dir=IMAGE_DIR, accel="tcg"), self.manifest, vcpus=VCPUS,
                         mem_mib=MEM_MIB, accel="tcg", network=network, config_drive=True)
        return [a for a in argv if a != "-S"]

    async def spawn(self, argv: list[str]) -> None:
        self.proc = await asyncio.create_subprocess_exec(*argv, cwd=self.workdir, stdin=asyncio.subprocess.DEVNULL,
                                                         stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.DEVNULL)

    async def wait_ready(self, t0: float, timeout: float = BOOT_TIMEOUT) -> float:
        path = self.workdir / CONSOLE_LOG
        while not (path.exists() and images.READY_LINE in path.read_text(errors="replace")):
            if self.proc is not None and self.proc.returncode is not None:
                raise RuntimeError(f"bare qemu exited ({self.proc.returncode})")
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError("bare qemu did not print the ready line")
            await asyncio.sleep(0.01)
        return time.perf_counter() - t0

    async def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def boot() -> None:
    """`debian` create+start to SSH-ready, ours (Lifecycle + QemuDriver) vs bare QEMU, pair by pair."""
    manifest = _debian()
    ours_ready: list[float] = []
    ours_ssh: list[float] = []
    bare_ready: list[float] = []
    bare_ssh: list[float] = []
    load: list[list[float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-guest-") as tmp_s:
        tmp = Path(tmp_s)
        key = tmp / "id_ed25519"
        pub = await asyncio.to_thread(_keygen, key)
        life = Lifecycle(QemuDriver(QemuSettings(image_dir=IMAGE_DIR, accel="tcg", boot_timeout=BOOT_TIMEOUT)),
                         Store(tmp / "s.db"), state_dir=tmp / "state", network=NetworkSettings(mode=NetworkMode.USER))
        o = Origin()

        async def ours(r: int) -> None:
            vm = f"deb-{r}"
            spec = VmSpec(vcpus=VCPUS, mem_mib=MEM_MIB, image="debian", ssh_keys=(pub,), ports=(22,))
            t0 = time.perf_counter()
            try:
                await life.create_vm(vm, spec, o)
                [mapping] = life.store.network(vm).ports
                await life.start_vm(vm, o)
                ours_ready.append(time.perf_counter() - t0)
                ours_ssh.append(await wait_ssh(key, mapping.host_port, t0))
            finally:
                await life.destroy_vm(vm, o)

        async def bare(r: int) -> None:
            wd = tmp / f"bare-{r}"
            wd.mkdir()
            b = BareDebian(manifest, wd, pub)
            argv = await b.prepare()
            t0 = time.perf_counter()
            try:
                await b.spawn(argv)
                bare_ready.append(await b.wait_ready(t0))
                bare_ssh.append(await wait_ssh(key, b.port, t0))
            finally:
                await b.kill()
                shutil.rmtree(wd, ignore_errors=True)

        try:
            for r in range(PAIRS):
                load.append(_loadavg())
                for step in (bare, ours) if r % 2 == 0 else (ours, bare):
                    await asyncio.to_thread(os.sync)
                    await step(r)
                print(f"pair {r}: bare {bare_ssh[-1]:.2f} s, ours {ours_ssh[-1]:.2f} s to ssh "
                      f"(load {load[-1]})", file=sys.stderr, flush=True)
        finally:
            await life.close(stop_vms=True)
    pairs = [a / b for a, b in zip(ours_ssh, bare_ssh, strict=True)]
    emit(
        "debian_boot",
        {"create_start_ssh_ready_s": round(median(ours_ssh), 2), "create_start_ready_line_s": round(median(ours_ready), 2),
         "pairs": PAIRS, "vcpus": VCPUS, "mem_mib": MEM_MIB, "ssh_poll_s": SSH_EVERY},
        {"bare_ssh_ready_s": round(median(bare_ssh), 2), "bare_ready_line_s": round(median(bare_ready), 2)},
        {"ssh_ready_vs_bare": round(median(pairs), 3),
         "ssh_ready_vs_bare_medians": round(median(ours_ssh) / median(bare_ssh), 3),
         "ssh_ready_vs_bare_every_pair": [round(p, 2) for p in pairs],
         "ready_line_vs_bare": round(median([a / b for a, b in zip(ours_ready, bare_ready, strict=True)]), 3)},
        targets={"ssh_ready_vs_bare": "<= 1.10 (median of the pairs' ratios)"},
        every={"ours_ssh_s": [round(x, 2) for x in ours_ssh], "bare_ssh_s": [round(x, 2) for x in bare_ssh],
               "ours_ready_s": [round(x, 2) for x in ours_ready], "bare_ready_s": [round(x, 2) for x in bare_ready]},
        loadavg_at_each_pair=load,
    )


def _seed_warm(dest: Path) -> int:
    """Copy the project's kept `.deb` files (IMAGE_DIR/.apt-archives, never changed here) into ``dest``."""
    dest.mkdir(parents=True)
    source = IMAGE_DIR / ".apt-archives"
    n = 0
    if source.is_dir():
        for deb in source.glob("*.deb"):
            shutil.copy2(deb, dest / deb.name)
            n += 1
    return n


def _archive_bytes(folder: Path) -> tuple[int, int]:
    debs = list(folder.glob("*.deb"))
    return len(debs), sum(d.stat().st_size for d in debs)


def _build(cache: Path) -> dict[str, float]:
    """One `debian` build into ``cache``: wall seconds, and the seconds of each phase (from the progress lines)."""
    marks: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    images.build_image("debian", cache_dir=cache, progress=lambda line: marks.append((time.perf_counter(), line)))
    total = time.perf_counter() - t0

    def at(word: str) -> float:
        return next(t for t, line in marks if word in line)

    return {"total_s": total, "kernel_initramfs_s": at("mmdebstrap") - at("downloading"),
            "mmdebstrap_s": at("installing the guest init") - at("mmdebstrap"),
            "mkfs_hash_s": marks[-1][0] - at("making a")}


async def build() -> None:
    """`debian` image build into a fresh temporary cache: cold (an empty `.apt-archives`: mmdebstrap downloads
    every package) vs warm (`.apt-archives` seeded with the project's kept packages), taking turns to go first."""
    cold: list[dict[str, float]] = []
    warm: list[dict[str, float]] = []
    fetched: list[tuple[int, int]] = []
    seeded = 0
    load: list[list[float]] = []
    for r in range(BUILD_ROUNDS):
        for kind in ("cold", "warm") if r % 2 == 0 else ("warm", "cold"):
            with tempfile.TemporaryDirectory(prefix=f"bench-build-{kind}-") as tmp_s:
                cache = Path(tmp_s) / "images"
                if kind == "warm":
                    seeded = await asyncio.to_thread(_seed_warm, cache / ".apt-archives")
                load.append(_loadavg())
                await asyncio.to_thread(os.sync)
                result = await asyncio.to_thread(_build, cache)
                (cold if kind == "cold" else warm).append(result)
                if kind == "cold":
                    fetched.append(_archive_bytes(cache / ".apt-archives"))
                print(f"{kind}: {result['total_s']:.1f} s (mmdebstrap {result['mmdebstrap_s']:.1f} s)", file=sys.stderr,
                      flush=True)

    def med(runs: list[dict[str, float]], key: str) -> float:
        return round(median([x[key] for x in runs]), 1)

    keys = ("total_s", "kernel_initramfs_s", "mmdebstrap_s", "mkfs_hash_s")
    emit(
        "debian_build",
        {f"cold_{k}": med(cold, k) for k in keys} | {"rounds": BUILD_ROUNDS,
                                                     "cold_downloaded_debs": fetched[0][0] if fetched else None,
                                                     "cold_downloaded_mib": round(fetched[0][1] / 2**20, 1)
                                                     if fetched else None},
        {f"warm_{k}": med(warm, k) for k in keys} | {"warm_seeded_debs": seeded},
        {"cold_vs_warm_total": round(med(cold, "total_s") / med(warm, "total_s"), 2),
         "cold_vs_warm_mmdebstrap": round(med(cold, "mmdebstrap_s") / med(warm, "mmdebstrap_s"), 2)},
        every={kind: [{k: round(v, 1) for k, v in run.items()} for run in runs]
               for kind, runs in (("cold", cold), ("warm", warm))},
        loadavg_at_each_build=load,
    )
