"""Signed console reads (DESIGN.md §9, issue #13 item 4) over real HTTP: only the VM's owner or the
service owner, with a fresh ``Tangle-Sig`` signature used once, reads ``/vms/{id}/console``; everyone else
gets 401 ``{"error": ...}``; ``MICROVM_PUBLIC_CONSOLE`` opens it; ``vms console`` signs with the customer
key and escapes the guest's control characters unless ``--raw``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from microvm_blueprint.blueprint import tangle_sig
from microvm_blueprint.blueprint.client import ClientError, read_console
from microvm_blueprint.blueprint.query import QueryApp
from microvm_blueprint.blueprint.server import QueryServer
from microvm_blueprint.blueprint.tangle_sig import SignedReads
from microvm_blueprint.errors import TransientError
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin
from microvm_blueprint.runtime.store import Store
from microvm_blueprint.tangle.devnet import ANVIL_ADDRESSES, ANVIL_KEYS
from microvm_blueprint.tangle.environment import Secret
from microvm_blueprint.tangle.keystore import key_from_hex

OWNER_KEY, SERVICE_OWNER_KEY = ANVIL_KEYS[0], ANVIL_KEYS[2]
STRANGER_KEY = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"  # anvil's key #3
OWNER, SERVICE_OWNER, STRANGER = ANVIL_ADDRESSES[0], ANVIL_ADDRESSES[2], key_from_hex(STRANGER_KEY).address
TARGET = "/vms/vm-1/console?tail=4096"


@dataclass
class Console:
    url: str
    driver: InMemoryDriver
    reads: SignedReads

    async def get(self, target: str = TARGET, auth: str | None = None) -> httpx.Response:
        headers = {"Authorization": auth} if auth is not None else {}
        async with httpx.AsyncClient(timeout=10) as http:
            return await http.get(self.url + target, headers=headers)


def signed(key: str, target: str = TARGET, at: int | None = None) -> str:
    return tangle_sig.sign(bytes.fromhex(key[2:]), target, int(time.time()) if at is None else at)


def service_owner_unknown() -> str | None:
    raise TransientError("not read yet")


async def serve(tmp_path: Path, reads: SignedReads) -> AsyncIterator[Console]:
    driver = InMemoryDriver()
    life = Lifecycle(driver, Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")
    await life.create_vm("vm-1", None, Origin(call_id=1, caller=OWNER.lower()))  # any letter case is the owner
    await life.start_vm("vm-1", Origin(call_id=2, caller=OWNER))
    server = QueryServer(QueryApp(life, None, console=reads), "127.0.0.1", 0)
    ready = asyncio.Event()
    task = asyncio.create_task(server.run(ready))
    await asyncio.wait_for(ready.wait(), 15)
    try:
        yield Console(server.url, driver, reads)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await life.close()


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    async for c in serve(tmp_path, SignedReads(service_owner=lambda: SERVICE_OWNER)):
        yield c


async def refused(c: Console, auth: str | None, target: str = TARGET) -> str:
    r = await c.get(target, auth)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Tangle-Sig"
    error = r.json()["error"]
    assert isinstance(error, str) and "MICROVM-READY" not in r.text
    return error


async def test_the_owner_reads_with_a_fresh_signature(console: Console) -> None:
    r = await console.get(auth=signed(OWNER_KEY))
    assert r.status_code == 200 and "MICROVM-READY" in r.text
    # the client helper signs the target it sends (the id is percent-encoded as sent)
    assert "MICROVM-READY" in await asyncio.to_thread(read_console, console.url, "vm-1", 100, Secret(OWNER_KEY))


async def test_the_service_owner_reads_every_console(console: Console) -> None:
    r = await console.get(auth=signed(SERVICE_OWNER_KEY))
    assert r.status_code == 200 and "MICROVM-READY" in r.text


async def test_another_caller_is_refused(console: Console) -> None:
    error = await refused(console, signed(STRANGER_KEY))
    assert error == (f"{STRANGER} may not read the console of vm 'vm-1': only its owner and the "
                     "service owner may")
    with pytest.raises(ClientError, match=r"^401: .* may not read the console"):
        await asyncio.to_thread(read_console, console.url, "vm-1", 100, Secret(STRANGER_KEY))


async def test_unsigned_is_refused_and_told_how_to_sign(console: Console) -> None:
    error = await refused(console, None)
    assert "Tangle-Sig <address>:<unix seconds>:<0x signature>" in error
    assert f"'microvm-blueprint GET {TARGET} <unix seconds>'" in error
    with pytest.raises(ClientError, match="--key-file or CUSTOMER_KEY"):
        await asyncio.to_thread(read_console, console.url, "vm-1", 100, None)


async def test_stale_and_future_signatures_are_refused(console: Console) -> None:
    now = int(time.time())
    assert "stale signature" in await refused(console, signed(OWNER_KEY, at=now - 301 - 5))
    assert "from the future" in await refused(console, signed(OWNER_KEY, at=now + 61 + 5))
    # inside the window both ways, the same owner is answered
    assert (await console.get(auth=signed(OWNER_KEY, at=now - 240))).status_code == 200
    assert (await console.get(auth=signed(OWNER_KEY, at=now + 30))).status_code == 200


async def test_a_replayed_signature_is_refused(console: Console) -> None:
    auth = signed(OWNER_KEY)
    assert (await console.get(auth=auth)).status_code == 200
    assert "replayed signature" in await refused(console, auth)
    # the malleable twin of the same signature (s -> n - s, v flipped) is the same read: refused too
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    head, sig = auth.rsplit(":", 1)
    raw = bytes.fromhex(sig[2:])
    twin = raw[:32] + (n - int.from_bytes(raw[32:64], "big")).to_bytes(32, "big") + bytes([55 - raw[64]])
    assert "replayed signature" in await refused(console, f"{head}:0x{twin.hex()}")
    # a new second is a new request: answered
    later = signed(OWNER_KEY, at=int(time.time()) + 1)
    assert (await console.get(auth=later)).status_code == 200


async def test_a_signature_covers_its_own_request_only(console: Console) -> None:
    other = "/vms/vm-1/console?tail=1"
    assert "is not by" in await refused(console, signed(OWNER_KEY, other))  # signed for another target
    auth = signed(OWNER_KEY)
    address, at, sig = auth.removeprefix("Tangle-Sig ").split(":")
    assert "is not by" in await refused(console, f"Tangle-Sig {STRANGER}:{at}:{sig}")  # claimed by another
    assert "is not by" in await refused(console, f"Tangle-Sig {address}:{int(at) - 1}:{sig}")  # another time


@pytest.mark.parametrize("header", [
    "", "Bearer abc", "Tangle-Sig", "Tangle-Sig 0x1234:1:0x00",
    "Tangle-Sig {a}:{t}", "Tangle-Sig {a}:-{t}:{s}", "Tangle-Sig {a}:{t}:{s}00", "Tangle-Sig {a}:{t}:{s}:x",
    "tangle-sig {a}:{t}:{s}", "Tangle-Sig  {a}:{t}:{s}", "Tangle-Sig {a}:{t}.5:{s}",
])
async def test_a_malformed_header_is_refused(console: Console, header: str) -> None:
    address, at, sig = signed(OWNER_KEY).removeprefix("Tangle-Sig ").split(":")
    error = await refused(console, header.format(a=address, t=at, s=sig))
    assert error.startswith("malformed Authorization header") or error.startswith("the console is private")


async def test_a_bad_recovery_id_or_an_invalid_signature_is_refused(console: Console) -> None:
    address, at, sig = signed(OWNER_KEY).removeprefix("Tangle-Sig ").split(":")
    assert "recovery id" in await refused(console, f"Tangle-Sig {address}:{at}:{sig[:-2]}1f")
    assert "does not verify" in await refused(console, f"Tangle-Sig {address}:{at}:0x{'00' * 64}1b")


async def test_two_authorization_headers_are_refused(console: Console) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(console.url + TARGET, headers=[("Authorization", signed(OWNER_KEY)),
                                                         ("Authorization", signed(SERVICE_OWNER_KEY))])
    assert r.status_code == 401 and "more than one" in r.json()["error"]


async def test_unknown_vm_is_404_and_other_routes_stay_open(console: Console) -> None:
    assert (await console.get("/vms/nope/console")).status_code == 404
    assert (await console.get("/vms/vm-1")).status_code == 200  # the view itself is public


async def test_only_the_owner_while_the_service_owner_is_not_known(tmp_path: Path) -> None:
    async for c in serve(tmp_path, SignedReads(service_owner=service_owner_unknown)):
        assert (await c.get(auth=signed(OWNER_KEY))).status_code == 200
        assert "may not read" in await refused(c, signed(SERVICE_OWNER_KEY))


async def test_public_console_needs_no_signature(tmp_path: Path) -> None:
    async for c in serve(tmp_path, SignedReads(public=True)):
        r = await c.get()
        assert r.status_code == 200 and "MICROVM-READY" in r.text


def test_public_console_setting_and_dev_default(tmp_path: Path) -> None:
    from microvm_blueprint.blueprint.settings import OperatorSettings
    from microvm_blueprint.errors import ConfigError

    assert OperatorSettings.from_env({}, tmp_path).public_console is False
    assert OperatorSettings.from_env({"MICROVM_PUBLIC_CONSOLE": "true"}, tmp_path).public_console is True
    with pytest.raises(ConfigError, match="MICROVM_PUBLIC_CONSOLE='maybe' is not a boolean"):
        OperatorSettings.from_env({"MICROVM_PUBLIC_CONSOLE": "maybe"}, tmp_path)
    source = (Path(__file__).parents[2] / "src/microvm_blueprint/blueprint/dev.py").read_text()
    assert '"MICROVM_PUBLIC_CONSOLE": "true", **os.environ' in source  # dev opens it unless told otherwise


def test_replay_memory_forgets_stale_reads_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = SignedReads()
    now = int(time.time())
    reads.check(signed(OWNER_KEY, at=now), TARGET, "vm-1", OWNER, now)
    with pytest.raises(tangle_sig.Unauthorized, match="replayed"):
        reads.check(signed(OWNER_KEY, at=now), TARGET, "vm-1", OWNER, now + 10)
    with pytest.raises(tangle_sig.Unauthorized, match="stale"):  # once stale, stale (never answered again)
        reads.check(signed(OWNER_KEY, at=now), TARGET, "vm-1", OWNER, now + 301)
    reads.check(signed(OWNER_KEY, at=now + 1), TARGET, "vm-1", OWNER, now + 301)
    assert len(reads._seen) == 1  # the first read was forgotten once stale
    monkeypatch.setattr(tangle_sig, "REMEMBERED", 1)
    with pytest.raises(tangle_sig.TooManySigned):
        reads.check(signed(OWNER_KEY, at=now + 2), TARGET, "vm-1", OWNER, now + 301)


# ---- the CLI -----------------------------------------------------------------------------------------

GUEST = "ok \x1b]0;pwned\x07\x1b[2J\x1b[31mred\x1b[0m\r\nnext\tline \u202eevil\x9b\x7f\n"


def cli(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "CUSTOMER_KEY"}
    full.update(env, MICROVM_DEV_DIR="/nonexistent")
    return subprocess.run([sys.executable, "-m", "microvm_blueprint.cli", *argv], env=full, capture_output=True,
                          text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)


async def test_cli_signs_and_escapes_the_guests_control_characters(console: Console, tmp_path: Path) -> None:
    console.driver._console["vm-1"] = GUEST  # what a hostile guest wrote on its serial console
    key_file = tmp_path / "customer.key"
    key_file.write_text(OWNER_KEY + "\n")
    base = ["vms", "console", "vm-1", "--api-url", console.url]
    shown = await asyncio.to_thread(cli, [*base, "--key-file", str(key_file)])
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == ("ok \\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mred\\x1b[0m\nnext\tline \\u202eevil\\x9b\\x7f\n")
    raw = await asyncio.to_thread(cli, [*base, "--raw"], CUSTOMER_KEY=OWNER_KEY)  # the key from the env
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == GUEST.replace("\r\n", "\n")  # text mode reads CR LF as LF; every escape is there
    stranger = await asyncio.to_thread(cli, base, CUSTOMER_KEY=STRANGER_KEY)
    assert stranger.returncode == 1 and "401" in stranger.stderr and "may not read" in stranger.stderr
    assert "\x1b" not in stranger.stdout + stranger.stderr


async def test_dashboard_says_why_when_the_console_is_private(console: Console) -> None:
    page = (await console.get("/")).text
    assert "r.status === 401" in page and "the console is private" in page and "MICROVM_PUBLIC_CONSOLE=true" in page
    assert (await console.get("/vms/vm-1/console?tail=8192")).status_code == 401  # what the page gets unsigned
