"""Operator metrics in the Prometheus text format (0.0.4), for ``GET /metrics`` and the heartbeat.

Built once at wiring (``operator.py``) and handed to whoever reports into it: the runner and the
result sender through :class:`MetricsObserver` (a ``JobObserver``), everything else read when
scraped from the objects that already count it (the VM store, the result sender, the producer, the
RPC client, the heartbeat). No global registry, no import of this module below the blueprint layer.

blueprint-sdk's names: ``blueprint_job_executions{job_id,service_id,blueprint_id}`` (counter),
``blueprint_job_execution_time`` (histogram, seconds), ``blueprint_job_errors{...,error_type}``,
``blueprint_uptime`` (seconds), ``blueprint_last_heartbeat`` (unix time of the last heartbeat that
went through, 0 before). Each job metric also carries ``job`` (the job's name). The host's own are
``microvm_*`` (see :class:`OperatorMetrics`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from ..tangle.calls import GuardedObserver, JobCall, JobObserver

if TYPE_CHECKING:
    from ..runtime.store import Store
    from ..tangle.consumer import TangleConsumer
    from ..tangle.heartbeat import HeartbeatService
    from ..tangle.producer import TangleProducer
    from ..tangle.rpc import JsonRpc

JOB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BOOT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
#: jobs whose successful run is (dominated by) a guest boot or a restore: ``microvm_boot_seconds``
BOOT_JOBS = frozenset({"start_vm", "restore_vm"})

Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, Labels, float]  # (name suffix, labels, value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


class Family:
    """One metric family: its name, ``# HELP``, ``# TYPE`` and samples."""

    def __init__(self, name: str, help_text: str, kind: str) -> None:
        self.name = name
        self.help = help_text
        self.kind = kind

    def samples(self) -> Iterable[Sample]:
        """The family's samples now."""
        return ()

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}",
                 f"# TYPE {self.name} {self.kind}"]
        lines += [f"{self.name}{suffix}{_labels(labels)} {_number(value)}" for suffix, labels, value in self.samples()]
        return "\n".join(lines) + "\n"


class Counter(Family):
    """A monotonic count per label set."""

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text, "counter")
        self._values: dict[Labels, float] = {}

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, labels: Labels = ()) -> float:
        return self._values.get(labels, 0.0)

    def total(self) -> float:
        return sum(self._values.values())

    def samples(self) -> Iterable[Sample]:
        return [("", labels, v) for labels, v in sorted(self._values.items())]


class Histogram(Family):
    """Cumulative buckets, ``_sum`` and ``_count`` per label set."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text, "histogram")
        self.buckets = (*sorted(buckets), math.inf)
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}  # labels -> (bucket counts, [sum])

    def observe(self, value: float, labels: Labels = ()) -> None:
        counts, total = self._series.setdefault(labels, ([0] * len(self.buckets), [0.0]))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        total[0] += value

    def count(self, labels: Labels = ()) -> int:
        series = self._series.get(labels)
        return series[0][-1] if series else 0

    def samples(self) -> Iterable[Sample]:
        out: list[Sample] = []
        for labels, (counts, total) in sorted(self._series.items()):
            for bound, n in zip(self.buckets, counts, strict=True):
                out.append(("_bucket", (*labels, ("le", _number(bound))), n))
            out.append(("_sum", labels, total[0]))
            out.append(("_count", labels, counts[-1]))
        return out


class Reading(Family):
    """A gauge or counter read when scraped from ``read`` (labels -> value); a failing read is left out."""

    def __init__(self, name: str, help_text: str, kind: str, read: Callable[[], Mapping[Labels, float]]) -> None:
        super().__init__(name, help_text, kind)
        self.read = read

    def samples(self) -> Iterable[Sample]:
        try:
            values = self.read()
        except Exception:  # a closed store at shutdown, a database hiccup: no sample this time
            return []
        return [("", labels, v) for labels, v in sorted(values.items())]


class Registry:
    """The families ``GET /metrics`` renders, in the order they were added."""

    def __init__(self) -> None:
        self.families: list[Family] = []

    def add(self, family: Family) -> Family:
        if any(f.name == family.name for f in self.families):
            raise ValueError(f"metric {family.name} registered twice")
        self.families.append(family)
        return family

    def render(self) -> str:
        return "".join(f.render() for f in self.families)


class OperatorMetrics:
    """Every metric of one operator. Jobs are counted by :meth:`observer`'s events; the rest is read
    at scrape time from what :meth:`watch_vms` and :meth:`watch_tangle` were given:

    * ``microvm_vms{status}``: VMs by status; ``microvm_guest_memory_mib``: guest memory of the VMs
      not destroyed or failed;
    * ``microvm_boot_seconds``: wall time of successful ``start_vm`` / ``restore_vm`` jobs (a guest
      boot, resume or restore dominates them), labelled ``job``;
    * ``microvm_producer_lag_blocks``: blocks between the newest block seen and the last one read;
    * ``microvm_outbox_depth``: results waiting for (or in) a transaction;
    * ``microvm_result_transactions{outcome}``: result transactions ``sent``, ``mined`` (status 1) and
      ``failed`` (mined with status 0);
    * ``microvm_rpc_errors``: chain RPC requests that failed (transport or protocol, not reverts);
    * ``microvm_heartbeats{outcome}``: heartbeats ``sent`` (mined) and ``failed``.
    """

    def __init__(self, *, service_id: int, blueprint_id: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.service_id = service_id
        self.blueprint_id = blueprint_id
        self.clock = clock
        self.started = clock()
        self.registry = Registry()
        self.executions = Counter("blueprint_job_executions", "Jobs run to completion, by job")
        self.execution_time = Histogram("blueprint_job_execution_time", "Job run time in seconds (done or failed)", JOB_BUCKETS)
        self.errors = Counter("blueprint_job_errors", "Jobs that failed, by job and error type "
                                                      "(job_error: refused or failed as the customer asked; "
                                                      "internal: a bug or a host failure)")
        self.boot = Histogram("microvm_boot_seconds", "Wall time of successful start_vm/restore_vm jobs, seconds",
                              BOOT_BUCKETS)
        self.heartbeat: HeartbeatService | None = None
        self._store: Store | None = None
        for family in (self.executions, self.execution_time, self.errors):
            self.registry.add(family)
        self.registry.add(Reading("blueprint_uptime", "Seconds since the operator started", "gauge",
                                  lambda: {(): self.clock() - self.started}))
        self.registry.add(Reading("blueprint_last_heartbeat", "Unix time of the last heartbeat mined, 0 if none",
                                  "gauge", self._last_heartbeat))
        self.registry.add(self.boot)

    def job_labels(self, call: JobCall, job: str) -> Labels:
        return (("job_id", str(call.job_index)), ("job", job), ("service_id", str(self.service_id)),
                ("blueprint_id", str(self.blueprint_id)))

    def observer(self) -> MetricsObserver:
        """The ``JobObserver`` that counts jobs into these metrics."""
        return MetricsObserver(self)

    def watch_vms(self, store: Store) -> None:
        """Read VM counts and guest memory from ``store`` when scraped."""
        self._store = store
        self.registry.add(Reading("microvm_vms", "VMs by status", "gauge",
                                  lambda: {(("status", s),): n for s, n in store.status_counts().items()}))
        self.registry.add(Reading("microvm_guest_memory_mib", "Guest memory of the VMs not destroyed or failed, MiB",
                                  "gauge", lambda: {(): store.usage()[1]}))

    def watch_tangle(self, consumer: TangleConsumer, producer: TangleProducer, rpc: JsonRpc,
                     heartbeat: HeartbeatService | None) -> None:
        """Read the chain side's figures from these objects when scraped."""
        from ..tangle.heartbeat import producer_lag

        self.heartbeat = heartbeat

        def lag() -> dict[Labels, float]:
            value = producer_lag(producer)
            return {} if value is None else {(): value}

        self.registry.add(Reading("microvm_producer_lag_blocks", "Blocks between the newest block seen and the "
                                  "last one read for jobs", "gauge", lag))
        self.registry.add(Reading("microvm_outbox_depth", "Results waiting for (or in) a transaction", "gauge",
                                  lambda: {(): len(consumer.state.pending(1_000_000))}))
        self.registry.add(Reading("microvm_result_transactions", "Result transactions by outcome", "counter",
                                  lambda: {(("outcome", "sent"),): consumer.tx_sent,
                                           (("outcome", "mined"),): consumer.tx_mined - consumer.tx_failed,
                                           (("outcome", "failed"),): consumer.tx_failed}))
        self.registry.add(Reading("microvm_rpc_errors", "Chain RPC requests that failed (not reverts)", "counter",
                                  lambda: {(): rpc.errors}))
        if heartbeat is not None:
            self.registry.add(Reading("microvm_heartbeats", "QoS heartbeats by outcome", "counter",
                                      lambda: {(("outcome", "sent"),): heartbeat.sent,
                                               (("outcome", "failed"),): heartbeat.failed}))

    def _last_heartbeat(self) -> dict[Labels, float]:
        hb = self.heartbeat
        return {(): hb.last.timestamp if hb is not None and hb.last is not None else 0}

    def heartbeat_metrics(self) -> list[tuple[str, int]]:
        """What each heartbeat reports on-chain: VMs running and total (not destroyed), jobs done and
        failed since start, guest memory allocated (MiB)."""
        store = self._store
        counts = store.status_counts() if store is not None else {}
        memory = store.usage()[1] if store is not None else 0
        return [
            ("vms_running", counts.get("running", 0)),
            ("vms_total", sum(n for s, n in counts.items() if s != "destroyed")),
            ("jobs_done", int(self.executions.total())),
            ("jobs_failed", int(self.errors.total())),
            ("guest_memory_mib", int(memory)),
        ]

    def render(self) -> str:
        return self.registry.render()


class MetricsObserver:
    """The :class:`~microvm_blueprint.tangle.calls.JobObserver` that times and counts jobs."""

    def __init__(self, metrics: OperatorMetrics) -> None:
        self.metrics = metrics
        self._running: dict[int, tuple[str, float]] = {}  # call id -> (job name, start)

    def on_received(self, call: JobCall, job: str) -> None:
        """Start the job's clock."""
        if len(self._running) > 100_000:  # calls told but never finished (handled before a restart)
            self._running.clear()
        self._running[call.call_id] = (job, self.metrics.clock())

    def _finish(self, call: JobCall) -> tuple[Labels, float, str]:
        job, started = self._running.pop(call.call_id, ("unknown", self.metrics.clock()))
        return self.metrics.job_labels(call, job), self.metrics.clock() - started, job

    def on_done(self, call: JobCall, output: bytes) -> None:
        """Count and time a job that succeeded."""
        labels, seconds, job = self._finish(call)
        self.metrics.executions.inc(labels)
        self.metrics.execution_time.observe(seconds, labels)
        if job in BOOT_JOBS:
            self.metrics.boot.observe(seconds, (("job", job),))

    def on_failed(self, call: JobCall, error: str) -> None:
        """Count a job that failed, by error type."""
        labels, seconds, _ = self._finish(call)
        internal = error.startswith("internal error") or error == "handler returned no result"
        self.metrics.errors.inc((*labels, ("error_type", "internal" if internal else "job_error")))
        self.metrics.execution_time.observe(seconds, labels)

    def on_submitted(self, call_id: int, tx_hash: str) -> None:
        """Nothing: result transactions are read from the result sender."""

    def on_dropped(self, call_id: int, reason: str) -> None:
        """Nothing: see on_submitted."""


class Observers:
    """Several ``JobObserver`` as one; each hears every event, and one that fails does not stop the others."""

    def __init__(self, *observers: JobObserver) -> None:
        self.observers = [GuardedObserver(o) for o in observers]

    def on_received(self, call: JobCall, job: str) -> None:
        """Tell each."""
        for o in self.observers:
            o.on_received(call, job)

    def on_done(self, call: JobCall, output: bytes) -> None:
        """Tell each."""
        for o in self.observers:
            o.on_done(call, output)

    def on_failed(self, call: JobCall, error: str) -> None:
        """Tell each."""
        for o in self.observers:
            o.on_failed(call, error)

    def on_submitted(self, call_id: int, tx_hash: str) -> None:
        """Tell each."""
        for o in self.observers:
            o.on_submitted(call_id, tx_hash)

    def on_dropped(self, call_id: int, reason: str) -> None:
        """Tell each."""
        for o in self.observers:
            o.on_dropped(call_id, reason)
