"""Shared helpers: machine facts, percentiles, resident memory, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any


def machine() -> dict[str, Any]:
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False)
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "qemu": qemu.stdout.splitlines()[0] if qemu.returncode == 0 else None,
        "kvm_usable": os.access("/dev/kvm", os.R_OK | os.W_OK),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return rss_kib(pid)


def emit(name: str, figures: dict[str, Any], baseline: dict[str, Any], ratio: dict[str, Any], **extra: Any) -> None:
    out = {"benchmark": name, "figures": figures, "baseline": baseline, "ratio": ratio, "machine": machine(), **extra}
    print(json.dumps(out), flush=True)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds used so far by ``pid`` and its live descendants (this process when None)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += used.get(p, 0.0)
        todo += [c for c, parent in parents.items() if parent == p]
    return total
