"""The dev chain's status registry (DevTangle.submitHeartbeat): the same EIP-712 Heartbeat signature
as tnt-core's OperatorStatusRegistry (domain "OperatorStatusRegistry", version "1"), so the operator's
heartbeat service works on `dev` as on Tangle, and `dev` shows it (isOnline turns true)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_abi import decode, encode

from microvm_blueprint.tangle import contracts
from microvm_blueprint.tangle.devnet import ANVIL_ADDRESSES, ANVIL_KEYS, Anvil, deploy_dev_tangle
from microvm_blueprint.tangle.heartbeat import (
    domain_separator,
    encode_metrics,
    heartbeat_digest,
    sign_digest,
    submit_heartbeat_data,
)
from microvm_blueprint.tangle.keystore import key_from_hex
from microvm_blueprint.tangle.rpc import ContractRevert, JsonRpc
from microvm_blueprint.tangle.signing import LegacyTx, sign_legacy

from ..dev_process import dev_env, start_dev
from ..waiting import until

pytestmark = pytest.mark.chain

OPERATOR = ANVIL_ADDRESSES[1]


def _sel(fragment: dict[str, object]) -> bytes:
    return contracts.selector_bytes(fragment)


async def _is_online(rpc: JsonRpc, registry: str, service_id: int, operator: str) -> bool:
    raw = await rpc.eth_call(registry, _sel(contracts.IS_ONLINE) + encode(["uint64", "address"], [service_id, operator]))
    return bool(decode(["bool"], raw)[0])


async def _last(rpc: JsonRpc, registry: str, operator: str) -> int:
    data = _sel(contracts.GET_LAST_HEARTBEAT) + encode(["uint64", "address"], [0, operator])
    return int(decode(["uint256"], await rpc.eth_call(registry, data))[0])


async def test_dev_registry_checks_the_eip712_heartbeat(anvil: Anvil) -> None:
    deployment = await deploy_dev_tangle(anvil.rpc_url)
    registry = deployment.status_registry
    assert registry == deployment.contract
    rpc = JsonRpc(anvil.rpc_url)
    operator, other = key_from_hex(ANVIL_KEYS[1]), key_from_hex(ANVIL_KEYS[2])
    try:
        chain_id = await rpc.chain_id()
        (separator,) = decode(["bytes32"], await rpc.eth_call(registry, _sel(contracts.DOMAIN_SEPARATOR)))
        assert separator == domain_separator(chain_id, registry)
        now = int(str((await rpc.get_block("latest") or {})["timestamp"]), 16)
        metrics = encode_metrics([("vms_running", 2), ("jobs_done", 7)])

        def data(signer_secret: bytes, timestamp: int, status: int = 0) -> bytes:
            digest = heartbeat_digest(chain_id=chain_id, registry=registry, operator=operator.address, service_id=0,
                                      blueprint_id=0, status_code=status, metrics=metrics, timestamp=timestamp)
            return submit_heartbeat_data(0, 0, status, metrics, timestamp, sign_digest(digest, signer_secret))

        async def refused(call: bytes, sender: str) -> str | None:
            with pytest.raises(ContractRevert) as exc:
                await rpc.estimate_gas(registry, call, sender)
            return exc.value.name

        # signed by another key, sent by the operator: refused, nothing recorded
        assert await refused(data(other.secret.reveal(), now), operator.address) == "InvalidSignature"
        assert await refused(data(operator.secret.reveal(), now - 301), operator.address) == "HeartbeatStale"
        assert await refused(data(operator.secret.reveal(), now + 3600), operator.address) == "HeartbeatFromFuture"
        assert await refused(data(operator.secret.reveal(), now), other.address) == "NotRegisteredOperator"
        assert not await _is_online(rpc, registry, 0, operator.address)

        good = data(operator.secret.reveal(), now, status=1)
        tx = LegacyTx(nonce=await rpc.nonce(operator.address), gas_price=await rpc.gas_price(),
                      gas=int(await rpc.estimate_gas(registry, good, operator.address) * 1.3), to=registry, data=good,
                      chain_id=chain_id)
        tx_hash = await rpc.send_raw(sign_legacy(tx, operator.secret.reveal()))
        receipts: list[dict[str, object]] = []

        async def mined() -> bool:
            r = await rpc.receipt(tx_hash)
            if r is not None:
                receipts.append(r)
            return r is not None

        await until(mined, 20, "the heartbeat's receipt")
        assert receipts[0]["status"] == "0x1"
        assert await _is_online(rpc, registry, 0, operator.address)
        assert await _last(rpc, registry, operator.address) >= now
        assert not await _is_online(rpc, registry, 0, other.address)
    finally:
        await rpc.aclose()


async def test_dev_sends_heartbeats_and_its_chain_takes_them(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = dev_env(tmp_path, home)
    child, rpc_port, _ = await start_dev(tmp_path, env)
    rpc = JsonRpc(f"http://127.0.0.1:{rpc_port}")
    try:
        recorded = json.loads((tmp_path / "devnet" / "dev.json").read_text())
        registry = recorded["status_registry"]
        assert f"dev: heartbeat  every 300 s to the status registry {registry}" in child.log_tail(100_000)
        # the first heartbeat goes out right at start
        await until(lambda: _is_online(rpc, registry, 0, OPERATOR), 60, "isOnline(0, operator) on the dev chain",
                    every=0.2)
        assert await _last(rpc, registry, OPERATOR) > 0
    finally:
        await rpc.aclose()
        code = await child.stop(grace=15)
    assert code == 0, child.log_tail()
