"""CLI start-up: how long the customer's `microvm-blueprint jobs submit` takes before it sends anything.

Each round, in turns (the order rotates): `python -c pass` (the baseline), `jobs submit --help`, and a
real `jobs submit create_vm ... --no-wait` against a local socket, timed from the spawn to the first
bytes of its first JSON-RPC request (then the socket closes and the CLI exits with its one-line
error). Medians over the rounds, of wall time (what a user waits) and of each process's CPU time
(user + system, which a loaded machine inflates far less: the first request's CPU figure includes the
few milliseconds of its error exit). One more run under `-X importtime` names the packages whose
modules cost most.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import emit, median

CUSTOMER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"  # anvil's account 0
CONTRACT = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "microvm-blueprint"
    return [str(script)] if script.exists() else [sys.executable, "-m", "microvm_blueprint.cli"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("HTTP_RPC_URL", "TANGLE_CONTRACT", "SERVICE_ID", "CUSTOMER_KEY", "MICROVM_DEV_DIR"):
        env.pop(name, None)
    return env


def _children_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _wall(argv: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, check=False, timeout=60)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return took


def _submit_argv(port: int, key_file: Path, *, python_flags: tuple[str, ...] = ()) -> list[str]:
    cli = [sys.executable, *python_flags, "-m", "microvm_blueprint.cli"] if python_flags else _cli()
    return [*cli, "jobs", "submit", "create_vm", "vm-1", "--rpc-url", f"http://127.0.0.1:{port}",
            "--contract", CONTRACT, "--service-id", "0", "--key-file", str(key_file), "--no-wait"]


def _until_first_request(key_file: Path, cwd: Path, *, python_flags: tuple[str, ...] = ()) -> tuple[float, str]:
    """Seconds from spawning `jobs submit` to the first bytes of its first request; and its stderr."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(60)
        port = server.getsockname()[1]
        t0 = time.perf_counter()
        proc = subprocess.Popen(_submit_argv(port, key_file, python_flags=python_flags), cwd=cwd, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(60)
                first = conn.recv(1)
                took = time.perf_counter() - t0
            if not first:
                raise RuntimeError("jobs submit connected but sent nothing")
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    stderr = err.decode()
    if proc.returncode != 1 or "unreachable" not in stderr:
        raise RuntimeError(f"jobs submit exited {proc.returncode} after its first request: {stderr[-500:]}")
    return took, stderr


def _heaviest_imports(key_file: Path, cwd: Path, top: int = 8) -> dict[str, float]:
    """Import time (ms) by package, each module's own time only (``self``, not what it imports in turn),
    in one `-X importtime` run of the submit path: which distributions the start-up pays for."""
    _, stderr = _until_first_request(key_file, cwd, python_flags=("-X", "importtime"))
    costs: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        own, _, name = line.removeprefix("import time:").split("|")
        root = name.strip().split(".")[0]
        costs[root] = costs.get(root, 0.0) + int(own) / 1000
    ordered = sorted(costs.items(), key=lambda kv: -kv[1])
    return {name: round(ms, 1) for name, ms in ordered[:top]} | {"(all)": round(sum(costs.values()), 1)}


def _measure(rounds: int) -> dict[str, Any]:
    cwd = Path(tempfile.mkdtemp(prefix="bench-cli-"))  # no .devnet/dev.json here to pick up
    try:
        key_file = cwd / "customer.key"
        key_file.write_text(CUSTOMER_KEY + "\n")
        runs: dict[str, list[float]] = {"python": [], "help": [], "first_rpc": []}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        steps = {
            "python": lambda: _wall([sys.executable, "-c", "pass"], cwd),
            "help": lambda: _wall([*_cli(), "jobs", "submit", "--help"], cwd),
            "first_rpc": lambda: _until_first_request(key_file, cwd)[0],
        }
        _until_first_request(key_file, cwd)  # warm the page cache, as a second run of a user's command finds it
        order = list(steps)
        for k in range(rounds):
            for name in order[k % 3:] + order[: k % 3]:
                cpu_before = _children_cpu()  # each step reaps its one child before returning
                runs[name].append(steps[name]())
                cpu[name].append(_children_cpu() - cpu_before)
        imports = _heaviest_imports(key_file, cwd)
        src = subprocess.run([sys.executable, "-c", "import microvm_blueprint; print(microvm_blueprint.__path__[0])"],
                             capture_output=True, text=True, check=True, env=_env()).stdout.strip()
        return {"runs": runs, "cpu": cpu, "imports": imports, "source": src}
    finally:
        shutil.rmtree(cwd, ignore_errors=True)


async def run(rounds: int | None = None) -> None:
    n = rounds or int(os.environ.get("BENCH_CLI_ROUNDS", "9"))
    got = await asyncio.to_thread(_measure, n)
    ms = {name: median(values) * 1000 for name, values in got["runs"].items()}
    cpu_ms = {name: median(values) * 1000 for name, values in got["cpu"].items()}
    emit(
        "cli_startup",
        {
            "jobs_submit_to_first_rpc_ms": round(ms["first_rpc"], 1),
            "jobs_submit_help_ms": round(ms["help"], 1),
            "jobs_submit_to_first_rpc_cpu_ms": round(cpu_ms["first_rpc"], 1),
            "jobs_submit_help_cpu_ms": round(cpu_ms["help"], 1),
            "first_rpc_every_round_ms": [round(x * 1000) for x in got["runs"]["first_rpc"]],
            "heaviest_imports_ms": got["imports"],
        },
        {"python_c_pass_ms": round(ms["python"], 1), "python_c_pass_cpu_ms": round(cpu_ms["python"], 1)},
        {
            "first_rpc_vs_python": round(ms["first_rpc"] / ms["python"], 1),
            "help_vs_python": round(ms["help"] / ms["python"], 1),
            "first_rpc_minus_python_ms": round(ms["first_rpc"] - ms["python"], 1),
            "first_rpc_vs_python_cpu": round(cpu_ms["first_rpc"] / cpu_ms["python"], 1),
            "help_vs_python_cpu": round(cpu_ms["help"] / cpu_ms["python"], 1),
        },
        rounds=n,
        cli=" ".join(_cli()),
        source=got["source"],
    )
