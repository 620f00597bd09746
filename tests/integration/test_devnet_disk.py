"""The embedded chain leaves nothing on disk: anvil's default writes old states under
~/.foundry/anvil/tmp and, stopped through its npm wrapper, never removed them (77 GB after a day of
test and benchmark chains)."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm_blueprint.tangle.devnet import Anvil
from microvm_blueprint.tangle.rpc import JsonRpc

pytestmark = pytest.mark.chain

STATE_DIR = Path.home() / ".foundry" / "anvil" / "tmp"


def _entries() -> set[str]:
    return {p.name for p in STATE_DIR.iterdir()} if STATE_DIR.is_dir() else set()


async def test_a_chain_of_thousands_of_blocks_writes_no_state_to_disk(anvil: Anvil) -> None:
    before = _entries()
    assert "--prune-history" in anvil.argv()
    rpc = JsonRpc(anvil.rpc_url)
    try:
        for _ in range(20):
            await rpc.call("anvil_mine", [hex(150)])
        assert await rpc.block_number() >= 3000
    finally:
        await rpc.aclose()
    assert _entries() - before == set()  # anvil writes its state folder once it keeps ~128 blocks
