"""Networking figures (issue #15): guest -> host throughput over a published port, ``bridge`` vs
``user`` (same `debian` image, same run: a Python sender in the guest, started over SSH, serves 64 MiB
on guest port 8080; the host connects through the published port and reads it all: the guest sends,
the host receives, and egress stays denied), and the create+start cost networking adds (``bridge`` and
``user`` vs ``none``).

Printed as one JSON object; figures only, never assertions. Needs root for ``bridge``.
`python -m bench network`
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from microvm_blueprint.runtime import netns
from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import NetworkMode, NetworkSettings, Origin, VmSpec
from microvm_blueprint.runtime.store import Store

from .guest import IMAGE_DIR, _debian, _keygen, wait_ssh

MIB = 64
SENDER = (
    "import socket\n"
    "s = socket.socket(); s.bind((\"0.0.0.0\", 8080)); s.listen(1)\n"
    "c, _ = s.accept(); buf = bytes(65536)\n"
    f"for _ in range({MIB * 16}): c.sendall(buf)\n"
    "c.close()\n"
)


def _ssh_bg(key: Path, port: int, script: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "root@127.0.0.1", "python3", "-c",
         f"'{script}'"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _receive(port: int, deadline: float) -> float:
    """Connect to the guest's sender through its published port; MiB/s of what arrives. (User-mode
    networking accepts at once and closes when nothing listens in the guest yet: try again.)"""
    while True:
        got, t0 = 0, time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(60)
                while chunk := s.recv(1 << 20):
                    got += len(chunk)
        except OSError:
            pass
        if got >= MIB << 20:
            return got / (1 << 20) / (time.monotonic() - t0)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the guest sender never answered on port {port}")
        time.sleep(0.2)


async def _one(mode: NetworkMode, key: Path, pub: str, tmp: Path, image_dir: Path) -> dict[str, float]:
    life = Lifecycle(QemuDriver(QemuSettings(image_dir=image_dir, accel="tcg", boot_timeout=180)),
                     Store(tmp / f"{mode.value}.sqlite3"), state_dir=tmp / mode.value,
                     network=NetworkSettings(mode=mode))
    out: dict[str, float] = {}
    try:
        ports = (22, 8080) if mode is not NetworkMode.NONE else ()
        t0 = time.monotonic()
        await life.create_vm("n", VmSpec(mem_mib=256, image="debian", ssh_keys=(pub,), ports=ports), Origin())
        out["create_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        await life.start_vm("n", Origin())
        out["start_s"] = time.monotonic() - t1
        if mode is NetworkMode.NONE:
            return out
        by_guest = {p.guest_port: p.host_port for p in life.store.network("n").ports}
        await wait_ssh(key, by_guest[22], time.monotonic())
        proc = _ssh_bg(key, by_guest[22], SENDER)
        try:
            out["guest_to_host_mib_s"] = await asyncio.to_thread(_receive, by_guest[8080], time.monotonic() + 60)
        finally:
            proc.kill()
            proc.wait(30)
        return out
    finally:
        await life.destroy_vm("n", Origin())
        await life.close(stop_vms=True)


async def run() -> None:
    _debian()
    image_dir = IMAGE_DIR
    modes = [NetworkMode.NONE, NetworkMode.USER]
    if not netns.host_problems():
        modes.append(NetworkMode.BRIDGE)
    with tempfile.TemporaryDirectory(prefix="bench-net-") as d:
        tmp = Path(d)
        pub = _keygen(tmp / "id")
        figures = {m.value: await _one(m, tmp / "id", pub, tmp, image_dir) for m in modes}
    print(json.dumps({"bench": "network", "payload_mib": MIB, "figures": figures}, indent=1))
    print("(throughput: TCG guest; the guest's CPU is the limit more than the network path)", file=sys.stderr)
