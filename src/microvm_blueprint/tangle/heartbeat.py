"""QoS heartbeat: an EIP-712 signed ``submitHeartbeat`` to the OperatorStatusRegistry (DESIGN.md §11).

Every ``HEARTBEAT_INTERVAL_SECS`` (default 300, +-10 % jitter; the first one right at start) the
operator signs ``Heartbeat(address operator,uint64 serviceId,uint64 blueprintId,uint8 statusCode,
bytes32 metricsHash,uint64 timestamp)`` under the domain ``{name "OperatorStatusRegistry", version
"1", chainId, verifyingContract: STATUS_REGISTRY_CONTRACT}`` and sends ``submitHeartbeat`` through
the result sender (:meth:`TangleConsumer.send_call`): one owner of the operator's nonces, results
first.

Timestamp: the chain's, never the host's clock. It is the latest block's timestamp; the registry
refuses one older than 5 minutes (``HeartbeatStale``) or newer than the block that mines it
(``HeartbeatFromFuture``), and the send is simulated first, so neither is ever sent: when the
simulation answers ``HeartbeatStale(signed, now)`` (a chain that made no block for minutes, as an
idle dev chain) the heartbeat is signed again once with that ``now``, the simulated block's time.

Status code (``uint8``; the registry reads 0 as healthy, 1-99 as degraded, 100 and up as alarms that
may lead to slashing, which this operator never sends): 0, or the sum of the conditions that hold
(:data:`OUTBOX_BACKLOG` 1, :data:`PRODUCER_LAG` 2, :data:`RPC_ERRORS` 4; see :class:`TangleHealth`).

Metrics: ``abi.encode((string name, uint256 value)[])`` (an empty list is empty bytes), given by an
injected callable (the blueprint layer's VM and job counts; this layer never imports it).

A failed heartbeat (RPC outage, revert, no receipt) is logged once and tried again at the next
interval; "heartbeats resumed" is logged when one goes through again. It never stops the operator.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import coincurve
from eth_abi import decode, encode
from eth_utils import keccak

from .consumer import TangleConsumer
from .contracts import SUBMIT_HEARTBEAT, selector_bytes
from .errors import TangleError
from .keystore import OperatorKey
from .producer import TangleProducer
from .rpc import ContractRevert, JsonRpc

log = logging.getLogger(__name__)

DOMAIN_NAME = "OperatorStatusRegistry"
DOMAIN_VERSION = "1"
DOMAIN_TYPEHASH = keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
HEARTBEAT_TYPEHASH = keccak(
    text="Heartbeat(address operator,uint64 serviceId,uint64 blueprintId,uint8 statusCode,bytes32 metricsHash,"
         "uint64 timestamp)"
)
SEL_SUBMIT_HEARTBEAT = selector_bytes(SUBMIT_HEARTBEAT)
#: the SDK's default interval and jitter
DEFAULT_INTERVAL = 300.0
JITTER = 0.1

#: status code bits (their sum is sent; 0 = healthy)
OUTBOX_BACKLOG = 1
PRODUCER_LAG = 2
RPC_ERRORS = 4

Metric = tuple[str, int]


def encode_metrics(metrics: Sequence[Metric]) -> bytes:
    """``abi.encode((string,uint256)[])``; an empty list is empty bytes (as the SDK sends it)."""
    if not metrics:
        return b""
    for name, value in metrics:
        if not 0 <= value < 2**256:
            raise TangleError(f"metric {name!r}={value} does not fit a uint256")
    return encode(["(string,uint256)[]"], [[(name, int(value)) for name, value in metrics]])


def domain_separator(chain_id: int, registry: str) -> bytes:
    """The registry's EIP-712 domain separator (its ``DOMAIN_SEPARATOR()``)."""
    return keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [DOMAIN_TYPEHASH, keccak(text=DOMAIN_NAME), keccak(text=DOMAIN_VERSION), chain_id, registry],
        )
    )


def heartbeat_digest(
    *, chain_id: int, registry: str, operator: str, service_id: int, blueprint_id: int, status_code: int,
    metrics: bytes, timestamp: int,
) -> bytes:
    """The EIP-712 digest the operator signs: ``keccak(0x1901 || domainSeparator || structHash)``."""
    struct_hash = keccak(
        encode(
            ["bytes32", "address", "uint64", "uint64", "uint8", "bytes32", "uint64"],
            [HEARTBEAT_TYPEHASH, operator, service_id, blueprint_id, status_code, keccak(metrics), timestamp],
        )
    )
    return keccak(b"\x19\x01" + domain_separator(chain_id, registry) + struct_hash)


def sign_digest(digest: bytes, secret: bytes) -> bytes:
    """65 bytes ``r || s || v`` with ``v`` 27 or 28 (what OpenZeppelin's ECDSA.recover takes)."""
    sig = coincurve.PrivateKey(secret).sign_recoverable(digest, hasher=None)
    return sig[:64] + bytes([27 + sig[64]])


def submit_heartbeat_data(
    service_id: int, blueprint_id: int, status_code: int, metrics: bytes, timestamp: int, signature: bytes
) -> bytes:
    """Calldata of ``submitHeartbeat(uint64,uint64,uint8,bytes,uint64,bytes)`` (selector 0x2bf4d6a7)."""
    return SEL_SUBMIT_HEARTBEAT + encode(
        ["uint64", "uint64", "uint8", "bytes", "uint64", "bytes"],
        [service_id, blueprint_id, status_code, metrics, timestamp, signature],
    )


@dataclass(frozen=True)
class Health:
    """The status code a heartbeat reports, and why (empty when healthy)."""

    status_code: int = 0
    reasons: tuple[str, ...] = ()


def producer_lag(producer: TangleProducer) -> int | None:
    """Blocks between the newest block the producer saw and the last one it has read; ``None``
    before its first poll."""
    cursor = producer.state.cursor(producer.key)
    if producer.head_seen < 0 or cursor is None:
        return None
    return max(0, producer.head_seen - (cursor.next_block - 1))


class TangleHealth:
    """The tangle layer's own view of whether the operator keeps up, checked once per heartbeat:

    * :data:`OUTBOX_BACKLOG`: ``outbox_max`` or more results wait for a transaction (the chain does
      not take them, or they come faster than they go);
    * :data:`PRODUCER_LAG`: the producer is more than ``lag_max`` blocks (beyond ``CONFIRMATIONS``)
      behind the newest block it saw;
    * :data:`RPC_ERRORS`: ``rpc_errors_max`` or more chain RPC requests failed (transport or
      protocol, not reverts) since the previous check.
    """

    def __init__(self, consumer: TangleConsumer, producer: TangleProducer, rpc: JsonRpc, *, outbox_max: int = 50,
                 lag_max: int = 50, rpc_errors_max: int = 5) -> None:
        self.consumer = consumer
        self.producer = producer
        self.rpc = rpc
        self.outbox_max = max(1, outbox_max)
        self.lag_max = lag_max
        self.rpc_errors_max = max(1, rpc_errors_max)
        self._errors_seen = rpc.errors

    def check(self) -> Health:
        """The current status code and its reasons (resets the RPC error window)."""
        code = 0
        reasons: list[str] = []
        depth = len(self.consumer.state.pending(self.outbox_max))
        if depth >= self.outbox_max:
            code |= OUTBOX_BACKLOG
            reasons.append(f"{depth}+ results wait in the outbox")
        lag = producer_lag(self.producer)
        if lag is not None and lag - self.producer.confirmations > self.lag_max:
            code |= PRODUCER_LAG
            reasons.append(f"job producer {lag} blocks behind")
        errors, self._errors_seen = self.rpc.errors - self._errors_seen, self.rpc.errors
        if errors >= self.rpc_errors_max:
            code |= RPC_ERRORS
            reasons.append(f"{errors} chain RPC errors since the last heartbeat")
        return Health(code, tuple(reasons))


class CallSender(Protocol):
    """The owner of the operator's nonces (:class:`TangleConsumer`)."""

    async def send_call(self, to: str, data: bytes, *, label: str = "call", timeout: float = 120.0) -> dict[str, Any]:
        """Send one transaction with the operator key; return its receipt (see TangleConsumer.send_call)."""
        ...


@dataclass(frozen=True)
class Beat:
    """One heartbeat that went through: its transaction, signed timestamp and status code."""

    tx_hash: str
    timestamp: int
    status_code: int
    block_number: int


class HeartbeatService:
    """A background service (runner.BackgroundService) that sends a heartbeat at start and then every
    ``interval`` seconds (+-``jitter``); :meth:`beat` sends one now."""

    name = "heartbeat"

    def __init__(
        self,
        rpc: JsonRpc,
        sender: CallSender,
        key: OperatorKey,
        *,
        registry: str,
        service_id: int,
        blueprint_id: int,
        interval: float = DEFAULT_INTERVAL,
        jitter: float = JITTER,
        metrics: Callable[[], Sequence[Metric]] | None = None,
        health: Callable[[], Health] | None = None,
        receipt_timeout: float = 120.0,
    ) -> None:
        self.rpc = rpc
        self.sender = sender
        self.key = key
        self.registry = registry
        self.service_id = service_id
        self.blueprint_id = blueprint_id
        self.interval = interval
        self.jitter = jitter
        self.metrics = metrics
        self.health = health
        self.receipt_timeout = receipt_timeout
        self._chain_id: int | None = None
        self._failing: str | None = None
        self.sent = 0
        self.failed = 0
        self.last: Beat | None = None
        self.last_at: float | None = None  # wall-clock time.time() of the last heartbeat that went through

    def next_delay(self) -> float:
        """The interval with its jitter (uniform within +-``jitter``)."""
        return float(self.interval * (1 + random.uniform(-self.jitter, self.jitter)))

    async def run(self, ready: asyncio.Event) -> None:
        """Beat now, then every interval, until cancelled; failures are logged once, never raised."""
        ready.set()
        log.info("QoS heartbeats to %s every %.0fs (+-%.0f%%)", self.registry, self.interval, self.jitter * 100)
        while True:
            await self._beat_logged()
            await asyncio.sleep(self.next_delay())

    async def _beat_logged(self) -> None:
        try:
            beat = await self.beat()
        except (TangleError, OSError) as exc:
            self.failed += 1
            why = str(exc)
            if self._failing is None:
                log.warning("heartbeat not sent (%s); trying again every interval (logged once until one goes "
                            "through)", why)
            else:
                log.debug("heartbeat not sent (%s)", why)
            self._failing = why
            return
        if self._failing is not None:
            log.info("heartbeats resumed (%s)", beat.tx_hash)
            self._failing = None

    async def beat(self) -> Beat:
        """Sign and send one heartbeat and wait for it to be mined; raises :class:`TangleError` (a
        :class:`ContractRevert` when the registry refuses it: nothing was sent then)."""
        if self._chain_id is None:
            self._chain_id = await self.rpc.chain_id()
        latest = await self.rpc.get_block("latest")
        if latest is None:
            raise TangleError("the chain has no latest block")
        timestamp = int(str(latest.get("timestamp")), 16)
        health = self.health() if self.health is not None else Health()
        if health.status_code:
            log.warning("heartbeat reports degraded (status %d): %s", health.status_code, "; ".join(health.reasons))
        metrics = encode_metrics(list(self.metrics()) if self.metrics is not None else [])
        for attempt in (1, 2):
            try:
                receipt = await self.send(health.status_code, metrics, timestamp)
                break
            except ContractRevert as exc:
                # the simulated block is newer than 5 minutes past the latest one (an idle chain):
                # its time is in the revert; sign again with it, once
                block_now = _revert_now(exc) if exc.name == "HeartbeatStale" else None
                if attempt == 2 or block_now is None:
                    raise
                timestamp = block_now
        if str(receipt.get("status")) != "0x1":
            raise TangleError(f"heartbeat transaction {receipt.get('transactionHash')} failed on-chain")
        beat = Beat(str(receipt.get("transactionHash")), timestamp, health.status_code,
                    int(str(receipt.get("blockNumber", "0x0")), 16))
        self.sent += 1
        self.last = beat
        self.last_at = time.time()
        log.info("heartbeat sent (status %d) in %s", beat.status_code, beat.tx_hash)
        return beat

    async def send(self, status_code: int, metrics: bytes, timestamp: int) -> dict[str, Any]:
        """Sign a heartbeat for exactly these values and send it through the nonce owner; the receipt."""
        if self._chain_id is None:
            self._chain_id = await self.rpc.chain_id()
        digest = heartbeat_digest(
            chain_id=self._chain_id, registry=self.registry, operator=self.key.address, service_id=self.service_id,
            blueprint_id=self.blueprint_id, status_code=status_code, metrics=metrics, timestamp=timestamp,
        )
        signature = sign_digest(digest, self.key.secret.reveal())
        data = submit_heartbeat_data(self.service_id, self.blueprint_id, status_code, metrics, timestamp, signature)
        return await self.sender.send_call(self.registry, data, label="heartbeat", timeout=self.receipt_timeout)


def _revert_now(exc: ContractRevert) -> int | None:
    """``now_`` of ``HeartbeatStale(uint64 signed, uint64 now_)`` / ``HeartbeatFromFuture``."""
    try:
        _signed, now = decode(["uint64", "uint64"], bytes.fromhex((exc.data or "")[10:]))
    except Exception:
        return None
    return int(now)
