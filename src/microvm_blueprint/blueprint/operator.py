"""Wiring: settings -> provider (driver chosen here, once) -> jobs + query API -> Tangle runner.

This is the only place a VMM backend is chosen; everything below receives it injected.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..runtime.confine import Confinement, check_uid_range
from ..runtime.driver import VmmDriver
from ..runtime.errors import ImageError
from ..runtime.lifecycle import Lifecycle
from ..runtime.model import VmSpec
from ..runtime.store import Store
from ..tangle.calls import JobCall
from ..tangle.consumer import TangleConsumer
from ..tangle.environment import BlueprintEnvironment
from ..tangle.errors import RpcError
from ..tangle.heads import NewHeads
from ..tangle.heartbeat import HeartbeatService, TangleHealth
from ..tangle.keystore import OperatorKey, load_operator_key
from ..tangle.producer import TangleProducer, job_topics
from ..tangle.registration import check_service_operator
from ..tangle.rpc import ContractRevert, JsonRpc
from ..tangle.runner import BlueprintRunner
from ..tangle.service import ServiceOwner
from ..tangle.state import TangleState
from .jobs import build_router
from .journal import JobJournal
from .metrics import Observers, OperatorMetrics
from .query import QueryApp
from .server import QueryServer
from .settings import OperatorSettings, ProviderKind
from .tangle_sig import SignedReads

if TYPE_CHECKING:
    from ..runtime.adapters.firecracker.settings import FirecrackerSettings
    from ..tangle.bridge.client import ManagerBridge

log = logging.getLogger(__name__)


def make_driver(settings: OperatorSettings) -> VmmDriver:
    """Choose the VMM driver from ``MICROVM_PROVIDER`` (the one place this happens)."""
    if settings.provider is ProviderKind.IN_MEMORY:
        from ..runtime.adapters.in_memory import InMemoryDriver

        return InMemoryDriver()
    if settings.provider is ProviderKind.QEMU:
        try:
            from ..runtime.adapters.qemu import QemuDriver, QemuSettings
        except ImportError as exc:
            raise ImageError(f"the QEMU provider is not available: {exc}") from exc
        from ..runtime import images

        return QemuDriver(
            QemuSettings(
                qemu_bin=settings.qemu_bin,
                image_dir=settings.image_dir or images.default_cache_dir(),
                accel=settings.qemu_accel,
                boot_timeout=settings.boot_timeout_s,
                confine=Confinement(settings.vmm_user, mem_overhead_mib=settings.vmm_mem_overhead_mib),
                disk_limits=settings.disk_limits,
            )
        )
    try:
        from ..runtime.adapters.firecracker import FirecrackerDriver
    except ImportError as exc:
        raise ImageError(f"the Firecracker provider is not available: {exc}") from exc
    fc = firecracker_settings(settings)
    if fc.state_dir:
        # pointing VM folders at it would let reconciliation remove whatever else lives there
        log.warning("MICROVM_FIRECRACKER_STATE_DIR=%s is accepted for compatibility and not used: VM folders "
                    "and snapshots live under %s", fc.state_dir, settings.state_dir)
    return FirecrackerDriver(dataclasses.replace(fc, disk_limits=settings.disk_limits))


def firecracker_settings(settings: OperatorSettings) -> FirecrackerSettings:
    """The Firecracker settings parsed at the entry point (defaults if the settings were built by hand)."""
    if settings.firecracker is not None:
        return settings.firecracker
    from ..runtime.adapters.firecracker.settings import FirecrackerSettings

    return FirecrackerSettings.from_env({}, image_dir=settings.image_dir)


def default_spec(settings: OperatorSettings) -> VmSpec | None:
    """The spec of ``create_vm`` (no spec given): Firecracker's ``MICROVM_FIRECRACKER_VCPU_COUNT`` /
    ``_MEM_MIB``; the built-in default (1 vCPU, 256 MiB) for the others."""
    if settings.provider is not ProviderKind.FIRECRACKER:
        return None
    return firecracker_settings(settings).default_spec()


def build_provider(
    settings: OperatorSettings, driver: VmmDriver | None = None, *, service_owner: Callable[[], str | None] | None = None
) -> Lifecycle:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.data_dir.chmod(0o700)  # disks, snapshots, consoles, keys: the operator's alone (DESIGN.md §9)
    store = Store(":memory:" if settings.ephemeral else settings.data_dir / "runtime.sqlite3")
    driver = driver or make_driver(settings)
    # a uid of its own per VMM where the driver switches users (confined QEMU, jailed Firecracker): a
    # range that is the VMMs' alone, checked here at start (DESIGN.md §9)
    uids = settings.vmm_uid_range if driver.isolates_users() else None
    if uids is not None:
        check_uid_range(uids)  # the VMM user and its groups are in /etc/passwd and /etc/group: checked too
    return Lifecycle(driver, store, state_dir=settings.state_dir, limits=settings.limits,
                     default_spec=default_spec(settings), network=settings.network, service_owner=service_owner,
                     min_free_mib=settings.min_free_mib, vmm_uids=uids)


class JournalObserver:
    """The :class:`~microvm_blueprint.tangle.calls.JobObserver` that feeds the runner's and the result
    sender's events into the journal behind ``GET /jobs/{call_id}``."""

    def __init__(self, journal: JobJournal) -> None:
        self.journal = journal

    def on_received(self, call: JobCall, job: str) -> None:
        self.journal.received(call.call_id, job, call.job_index, call.caller)

    def on_done(self, call: JobCall, output: bytes) -> None:
        self.journal.finished(call.call_id, error=None)

    def on_failed(self, call: JobCall, error: str) -> None:
        self.journal.finished(call.call_id, error=error)

    def on_submitted(self, call_id: int, tx_hash: str) -> None:
        self.journal.submitted(call_id, tx_hash)

    def on_dropped(self, call_id: int, reason: str) -> None:
        self.journal.dropped(call_id, reason)


def build_heartbeat(env: BlueprintEnvironment, rpc: JsonRpc, consumer: TangleConsumer, producer: TangleProducer,
                    key: OperatorKey | None, metrics: OperatorMetrics) -> HeartbeatService | None:
    """The QoS heartbeat (sent through the result sender's nonces), or ``None`` (said in one line) when
    there is no registry, HEARTBEAT_INTERVAL_SECS is 0, or no transaction may be sent."""
    if env.status_registry_contract is None:
        log.info("no STATUS_REGISTRY_CONTRACT: QoS heartbeats are off")
    elif env.heartbeat_interval == 0:
        log.info("HEARTBEAT_INTERVAL_SECS=0: QoS heartbeats are off")
    elif key is None or env.dry_run:
        log.info("--dry-run: QoS heartbeats are off")
    else:
        return HeartbeatService(
            rpc, consumer, key, registry=env.status_registry_contract, service_id=env.service_id or 0,
            blueprint_id=env.blueprint_id, interval=env.heartbeat_interval, metrics=metrics.heartbeat_metrics,
            health=TangleHealth(consumer, producer, rpc).check,
        )
    return None


@dataclass
class Operator:
    """Everything ``run`` starts, assembled; ``await operator.run()`` until ``operator.stop()``."""

    env: BlueprintEnvironment
    settings: OperatorSettings
    provider: Lifecycle
    runner: BlueprintRunner
    server: QueryServer
    journal: JobJournal
    state: TangleState
    rpc: JsonRpc
    key: OperatorKey | None
    metrics: OperatorMetrics | None = None
    heartbeat: HeartbeatService | None = None
    bridge: ManagerBridge | None = None

    @classmethod
    def assemble(
        cls,
        env: BlueprintEnvironment,
        settings: OperatorSettings,
        *,
        driver: VmmDriver | None = None,
        key: OperatorKey | None = None,
    ) -> Operator:
        if env.service_id is None:
            from ..tangle.errors import ConfigError

            raise ConfigError("SERVICE_ID is required for run")
        data = Path(env.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        if key is None and not env.dry_run:
            key = load_operator_key(env.keystore_uri)
        rpc = JsonRpc(env.http_rpc_url)
        # the service owner may act on every VM (DESIGN.md §9): read from the chain once, at start
        owner = ServiceOwner(rpc, env.tangle_contract, env.service_id)
        provider = build_provider(settings, driver, service_owner=owner.get)
        journal = JobJournal(data / "jobs.sqlite3")
        state = TangleState(data / "tangle.sqlite3")
        metrics = OperatorMetrics(service_id=env.service_id, blueprint_id=env.blueprint_id)
        metrics.watch_vms(provider.store)
        observer = Observers(JournalObserver(journal), metrics.observer())
        # WS_RPC_URL: an announced job log wakes the producer at once (it still polls every POLL_INTERVAL;
        # a new block alone costs no request), and the result sender looks for its receipts when a block
        # comes instead of on a timer
        heads = NewHeads(
            env.ws_rpc_url, logs={"address": env.tangle_contract, "topics": job_topics(env.service_id)},
            confirmations=env.confirmations,
        ) if env.ws_rpc_url else None
        consumer = TangleConsumer(
            rpc, state, key, contract=env.tangle_contract, dry_run=env.dry_run,
            observer=observer,
            blocks=(lambda: heads.heads) if heads else None, linger=env.result_linger,
        )
        producer = TangleProducer(
            rpc, state, contract=env.tangle_contract, service_id=env.service_id, from_block=env.from_block,
            max_range=env.max_getlogs_range, poll_interval=env.poll_interval, confirmations=env.confirmations,
            wake=heads.wake if heads else None, read_to=heads.read_to if heads else None,
            on_reorg=consumer.chain_reorged,
        )
        heartbeat = build_heartbeat(env, rpc, consumer, producer, key, metrics)
        metrics.watch_tangle(consumer, producer, rpc, heartbeat)
        reads = SignedReads(public=settings.public_console, service_owner=owner.get)
        server = QueryServer(QueryApp(provider, journal, metrics=metrics.render, console=reads), settings.api_host,
                             settings.api_port, max_connections=settings.api_max_connections,
                             header_timeout=settings.api_header_timeout_s)
        runner = BlueprintRunner(
            build_router(provider), producer, consumer, state,
            background_services=[server, owner, *([heads] if heads else []), *([heartbeat] if heartbeat else [])],
            observer=observer,
        )
        return cls(env, settings, provider, runner, server, journal, state, rpc, key, metrics, heartbeat)

    def stop(self) -> None:
        self.runner.stop()

    async def run(self) -> None:
        env = self.env
        if env.dry_run:
            log.info("--dry-run: jobs run, no transaction is sent")
        log.info(
            "operator %s, service %s on %s, provider %s",
            self.key.address if self.key else "(dry run, no key)", env.service_id, env.tangle_contract,
            self.settings.provider.value,
        )
        try:
            await self._report_to_manager()
            await self._check_membership()
            await self.provider.reconcile()
            await self.runner.run()
        finally:
            await asyncio.shield(self._close())

    async def _report_to_manager(self) -> None:
        """Outside test mode with ``BRIDGE_SOCKET_PATH``: ``Ping`` the manager first (a failure ends
        ``run``), then take the query API port it grants (DESIGN.md §11)."""
        env = self.env
        if env.test_mode:
            log.info("test mode: no blueprint manager bridge")
            return
        if env.bridge_socket_path is None:
            log.info("no blueprint manager present (BRIDGE_SOCKET_PATH unset): running on our own")
            return
        from ..tangle.bridge.client import ManagerBridge

        self.bridge = ManagerBridge(env.bridge_socket_path)
        await self.bridge.ping()
        port = await self.bridge.request_port(self.server.port)
        log.info("blueprint manager answered Ping on %s; query API port %d (asked %d)", env.bridge_socket_path,
                 port, self.server.port)
        self.server.port = port

    async def _check_membership(self) -> None:
        """``isServiceOperator(SERVICE_ID, me)`` false ends ``run`` (one line); a chain that cannot
        answer now is logged and the operator goes on (the producer waits for it as ever)."""
        if self.key is None or self.env.service_id is None:
            return
        try:
            await asyncio.wait_for(check_service_operator(
                self.rpc, self.env.tangle_contract, self.env.service_id, self.key.address), 15)
        except (RpcError, ContractRevert, TimeoutError) as exc:
            log.warning("could not check that %s is an operator of service %d: %s", self.key.address,
                        self.env.service_id, exc or type(exc).__name__)

    async def _close(self) -> None:
        if self.bridge is not None:
            await self.bridge.aclose()
        await self.provider.close(stop_vms=self.settings.stop_vms_on_exit)
        await self.rpc.aclose()
        self.journal.close()
        self.state.close()
        self.provider.store.close()
