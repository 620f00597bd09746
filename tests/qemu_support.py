"""Shared QEMU test support: the image (built once per cache dir), drivers, evidence on failure."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

def _image_dir() -> Path:
    """``MICROVM_IMAGE_DIR``, else the checkout's ``.cache/images`` — unless the checkout sits below a
    folder others cannot pass (e.g. /root): as root, QEMU runs as the unprivileged VMM user, who must
    reach the images, so they then live in the system cache a root operator uses too."""
    from microvm_blueprint.runtime import images

    env = os.environ.get("MICROVM_IMAGE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0 and not images.reachable_by_others(REPO):
        return images.SYSTEM_CACHE_DIR
    return REPO / ".cache" / "images"


IMAGE_DIR = _image_dir()


def qemu_available() -> str | None:
    """None if QEMU tests can run, else the reason they cannot."""
    for tool in ("qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install qemu-system-x86 qemu-utils)"
    return None


def ensure_image() -> Path:
    from microvm_blueprint.runtime import images

    reason = qemu_available()
    if reason:
        pytest.skip(reason)
    try:
        images.resolve_image("default", IMAGE_DIR)
    except Exception:
        images.build_image("default", cache_dir=IMAGE_DIR)
    return IMAGE_DIR


def ensure_debian_image() -> Path:
    """The image dir with the ``debian`` image in it (built once per cache and guest init, minutes), or skip
    with the reason: no QEMU, no ssh/ssh-keygen/mtools to reach a guest, no mmdebstrap to build it."""
    from microvm_blueprint.runtime import images
    from microvm_blueprint.runtime.errors import ImageError

    reason = qemu_available()
    if reason:
        pytest.skip(reason)
    for tool in ("ssh", "ssh-keygen", "mcopy", "mtype"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/bootstrap.sh installs it)")
    try:
        built = images.resolve_image("debian", IMAGE_DIR)
        if built.guest_init != images.debian_guest_init():  # built by older code: the guest init changed
            raise ImageError("stale debian image")
    except Exception:  # any reason it is not there (or stale): build it
        if shutil.which("mmdebstrap") is None:
            pytest.skip("mmdebstrap is not installed (scripts/bootstrap.sh installs it)")
        images.build_image("debian", cache_dir=IMAGE_DIR, progress=print)
    return IMAGE_DIR


def ticks(text: str) -> int:
    found = re.findall(r"tick (\d+)", text)
    return int(found[-1]) if found else 0


def qemu_pids(under: Path | None = None) -> set[int]:
    """QEMU processes (those running in a folder below ``under`` only, when given)."""
    out = subprocess.run(["pgrep", "-f", "qemu-system-x86_64"], capture_output=True, text=True, check=False)
    pids = {int(p) for p in out.stdout.split()}
    if under is None:
        return pids
    root = str(Path(under).resolve())
    mine = set()
    for pid in pids:
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(root):
                mine.add(pid)
        except OSError:
            continue
    return mine
