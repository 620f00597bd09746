"""Errors of the VM runtime layer (L0).

::

    MicrovmBlueprintError                 (microvm_blueprint.errors)
    ├── TransientError                    (microvm_blueprint.errors) retried, never recorded
    │   └── StoreError                    the state database is locked / busy / had an I/O hiccup
    ├── StoreUnusable                     the state database is corrupt, not a database, wrong schema
    └── VmError
        ├── InvalidInput                  bad id / spec; nothing changed
        ├── VmNotFound                    "vm '<id>' not found"
        ├── VmAlreadyExists               "vm '<id>' already exists"
        ├── SnapshotNotFound              "snapshot '<s>' not found for vm '<id>'"
        ├── SnapshotAlreadyExists         "snapshot '<s>' already exists for vm '<id>'"
        ├── InvalidTransition             "invalid vm transition for '<id>': <from> -> <to>"
        ├── OwnershipError                "vm '<id>' belongs to another caller"
        ├── QuotaExceeded                 over a configured host limit
        ├── RecordedFailure               a replayed call that failed the first time (same text)
        ├── ImageError                    kernel / image / build tool missing or broken
        └── VmmError                      the VMM misbehaved; keeps exit code and log tail
            ├── VmmTimeout                a deadline passed (boot not ready, socket absent, API silent)
            └── VmmApiError               the VMM's API refused a request (status + body)

Store errors are not ``VmError``: they say nothing about the call (a locked database is not a
customer's mistake), so the lifecycle never records them as a call's outcome.

Every message is the exact text a customer sees in ``GET /jobs/{call_id}``; none carries a secret.
Adapters translate foreign errors (OSError, httpx, QMP) with ``raise ... from exc``.
"""

from __future__ import annotations

from ..errors import MicrovmBlueprintError, TransientError


class VmError(MicrovmBlueprintError):
    """Base of the runtime layer's errors."""


class InvalidInput(VmError):
    """An id or a spec breaks the rules; nothing was changed."""


class VmNotFound(VmError):
    def __init__(self, vm_id: str) -> None:
        super().__init__(f"vm '{vm_id}' not found")
        self.vm_id = vm_id


class VmAlreadyExists(VmError):
    def __init__(self, vm_id: str) -> None:
        super().__init__(f"vm '{vm_id}' already exists")
        self.vm_id = vm_id


class SnapshotNotFound(VmError):
    def __init__(self, vm_id: str, snapshot_id: str) -> None:
        super().__init__(f"snapshot '{snapshot_id}' not found for vm '{vm_id}'")
        self.vm_id = vm_id
        self.snapshot_id = snapshot_id


class SnapshotAlreadyExists(VmError):
    def __init__(self, vm_id: str, snapshot_id: str) -> None:
        super().__init__(f"snapshot '{snapshot_id}' already exists for vm '{vm_id}'")
        self.vm_id = vm_id
        self.snapshot_id = snapshot_id


class InvalidTransition(VmError):
    def __init__(self, vm_id: str, current: str, target: str) -> None:
        super().__init__(f"invalid vm transition for '{vm_id}': {current} -> {target}")
        self.vm_id = vm_id
        self.current = current
        self.target = target


class OwnershipError(VmError):
    """The caller neither owns the VM (created or restored it) nor owns the service (DESIGN.md §9)."""

    def __init__(self, vm_id: str) -> None:
        super().__init__(f"vm '{vm_id}' belongs to another caller")
        self.vm_id = vm_id


class QuotaExceeded(VmError):
    """A configured host limit (VM count, memory, snapshot disk, per-VM maxima) would be passed."""


class RecordedFailure(VmError):
    """A call id that was already applied and failed: answered with the same error text."""


class ImageError(VmError):
    """A guest image, kernel or a tool needed to build one is missing or unusable."""


class VmmError(VmError):
    """The VMM failed. ``exit_code`` and ``log_tail`` are kept for the operator (never secrets)."""

    def __init__(self, message: str, *, exit_code: int | None = None, log_tail: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.log_tail = log_tail

    def detail(self) -> str:
        """Message plus exit code and log tail, for logs and the job journal."""
        parts = [str(self)]
        if self.exit_code is not None:
            parts.append(f"exit code {self.exit_code}")
        if self.log_tail:
            parts.append("log tail:\n" + self.log_tail)
        return "; ".join(parts)


class VmmTimeout(VmmError):
    """A wait on the VMM passed its deadline."""


class VmmApiError(VmmError):
    """The VMM's control API answered with an error."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "", **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.status = status
        self.body = body


class StoreError(TransientError):
    """The state database failed for now (locked or busy past the busy timeout, disk I/O error, disk
    full): the step can succeed later, so it is retried and never recorded as the call's outcome."""


class StoreUnusable(MicrovmBlueprintError):
    """The state database cannot be used at all (corrupt, not a database, a schema this version does
    not know): retrying does not help; the operator has to look at the file."""
