"""`microvm-blueprint dev` never removes what it did not make, and never takes a port that already
has a chain (issue 13, item 7): `dev --data-dir D` used to delete `D/run` whatever it held, and a
`dev` restarted after a kill -9 silently used the old chain still answering on its port."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from microvm_blueprint.blueprint.dev import RUN_MARK
from microvm_blueprint.procs import Child
from microvm_blueprint.tangle.devnet import Anvil, free_port, port_in_use
from microvm_blueprint.tangle.rpc import JsonRpc

from ..waiting import until

pytestmark = pytest.mark.chain

CLI = [sys.executable, "-m", "microvm_blueprint.cli"]
BANNER_END = "dev: Ctrl-C stops everything."

Tree = dict[str, tuple[int, int, bytes | None]]


def tree(root: Path) -> Tree:
    """Every path under ``root`` (itself excluded) with its mode, mtime and, for files, bytes."""
    found: Tree = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        found[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, path.read_bytes() if path.is_file() else None)
    return found


def user_files(root: Path) -> Tree:
    """A data dir full of someone else's things: a `run` folder, a lone SSH key, notes."""
    for rel, text in (("notes.txt", "mine\n"), ("keep/a.bin", "\x00\x01"), ("ssh/id_ed25519", "not dev's key\n")):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tree(root)


def dev_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"  # no ~/.ssh/id_*.pub: dev looks in its own dir for a key
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "MICROVM_DEV_DIR": str(tmp_path / "unused-default")}
    for name in ("HTTP_RPC_URL", "TANGLE_CONTRACT", "SERVICE_ID", "CUSTOMER_KEY", "MICROVM_API_URL"):
        env.pop(name, None)
    return env


async def start_dev(tmp_path: Path, data: Path, rpc_port: int, log: str) -> Child:
    argv = [*CLI, "dev", "--data-dir", str(data), "--provider", "in-memory", "--rpc-port", str(rpc_port),
            "--api-addr", f"127.0.0.1:{free_port()}"]
    return await Child.spawn(argv, tmp_path / log, env=dev_env(tmp_path), cwd=tmp_path)


async def until_banner_or_exit(child: Child) -> None:
    await until(lambda: child.returncode is not None or BANNER_END in child.log_tail(100_000), 90,
                "dev's banner or its exit")


async def refusal(tmp_path: Path, data: Path, rpc_port: int) -> str:
    """Run dev (log ``dev.log``) until its banner or its exit, then stop it: it must have refused to
    start (exit 1). Returns what it wrote."""
    child = await start_dev(tmp_path, data, rpc_port, "dev.log")
    try:
        await until_banner_or_exit(child)
    finally:
        code = await child.stop(grace=30)
    assert code == 1, child.log_tail()
    return child.log_tail()


async def test_dev_refuses_a_run_folder_it_did_not_make(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "run" / "deep").mkdir(parents=True)
    (data / "run" / "results.csv").write_text("a,b\n1,2\n")
    (data / "run" / "deep" / "model.bin").write_bytes(os.urandom(4096))
    before = user_files(data)
    rpc_port = free_port()
    assert await refusal(tmp_path, data, rpc_port) == (
        f"error: {data / 'run'} exists and was not made by dev (no {RUN_MARK} in it): "
        f"move it away or choose another --data-dir\n"
    )
    assert tree(data) == before  # nothing removed, added or rewritten
    assert not port_in_use(rpc_port)  # and no chain started


async def test_dev_start_and_stop_leave_what_it_did_not_make(tmp_path: Path) -> None:
    data = tmp_path / "data"
    before = user_files(data)  # no `run` yet: dev makes (and marks) it
    for round_ in (1, 2):
        child = await start_dev(tmp_path, data, free_port(), f"dev-{round_}.log")
        try:
            await until_banner_or_exit(child)
            assert child.returncode is None, child.log_tail()
            log = child.log_tail(100_000)
        finally:
            code = await child.stop(grace=30)
        assert code == 0, child.log_tail()
        # the lone key is not dev's: left alone, and no key suggested
        assert "dev: data/ssh/id_ed25519 or its .pub exists without the other" in log, log
        after = tree(data)
        assert {k: after[k] for k in before} == before, round_  # every path there before: untouched
        assert (data / "run" / RUN_MARK).is_file() and (data / "dev.json").is_file()
        if round_ == 2:
            assert not (data / "run" / "left-by-dev-1.txt").exists()  # dev's own folder was emptied
        (data / "run" / "left-by-dev-1.txt").write_text("in dev's folder: dev's to remove\n")


async def test_dev_refuses_a_port_that_already_has_a_chain(anvil: Anvil, tmp_path: Path) -> None:
    rpc = JsonRpc(anvil.rpc_url)
    try:
        await rpc.call("anvil_mine", [hex(5)])
        head = await rpc.call("eth_getBlockByNumber", ["latest", False])
        data = tmp_path / "data"
        assert await refusal(tmp_path, data, anvil.port) == (
            f"error: --rpc-port {anvil.port}: something already listens on 127.0.0.1:{anvil.port} (a chain left by "
            f"an earlier dev?): stop it, or choose another port with --rpc-port\n"
        )
        assert not data.exists()  # refused before touching anything
        # the chain already there is left alone: still running, nothing deployed or mined on it
        assert anvil.child is not None and anvil.child.returncode is None
        assert await rpc.call("eth_getBlockByNumber", ["latest", False]) == head
    finally:
        await rpc.aclose()


async def test_anvil_refuses_a_port_in_use(anvil: Anvil, tmp_path: Path) -> None:
    from microvm_blueprint.tangle.devnet import DevnetError

    with pytest.raises(DevnetError, match=f"port {anvil.port} on 127.0.0.1 already has something listening"):
        async with Anvil(port=anvil.port, log_dir=tmp_path / "second"):
            pass
    assert anvil.child is not None and anvil.child.returncode is None
