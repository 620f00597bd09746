"""The customer CLI imports only what its command needs (``python -m bench cli_startup`` times it; this
checks which modules, not how long). Each case runs in a fresh interpreter, as a user's command does."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ANVIL_0 = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
CONTRACT = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
HEAVY = ("eth_account", "py_ecc", "web3", "eth_keyfile", "eth_keys", "rlp")

PROBE = """
import contextlib, io, json, sys
from microvm_blueprint.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = f"exit {exc.code}"
print(json.dumps({"code": code, "stderr": err.getvalue(), "modules": sorted(sys.modules)}))
"""


def probe(*argv: str, cwd: Path) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60,
                          check=False, cwd=cwd)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but not listening: a connection to it is refused at once (and nobody else takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_jobs_submit_reaches_its_first_request_without_eth_account(tmp_path: Path, refused_port: int) -> None:
    key = tmp_path / "customer.key"
    key.write_text(ANVIL_0 + "\n")
    got = probe("jobs", "submit", "create_vm", "vm-1", "--rpc-url", f"http://127.0.0.1:{refused_port}",
                "--contract", CONTRACT, "--service-id", "0", "--key-file", str(key), "--no-wait", cwd=tmp_path)
    assert got["code"] == 1
    assert "chain RPC unreachable" in str(got["stderr"])  # it got as far as the first request
    modules = set(got["modules"])  # type: ignore[call-overload]
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []
    assert "microvm_blueprint.blueprint.client" in modules


def test_help_imports_no_chain_or_http_library(tmp_path: Path) -> None:
    got = probe("jobs", "submit", "--help", cwd=tmp_path)
    modules = set(got["modules"])  # type: ignore[call-overload]
    assert got["code"] == "exit 0" and got["stderr"] == ""  # argparse printed the help and exited
    loaded = sorted(m for m in modules if m.split(".")[0] in (*HEAVY, "eth_utils", "eth_abi", "httpx", "asyncio"))
    assert loaded == []
    assert not any(m.startswith("microvm_blueprint.blueprint.operator") for m in modules)
