"""The root of every error this package raises on purpose.

Each layer hangs its own tree below :class:`MicrovmBlueprintError`::

    MicrovmBlueprintError
    ├── runtime.errors.VmError            VM lifecycle and VMM backends (L0)
    │   ├── InvalidInput                  bad id / spec (the job's input)
    │   ├── VmNotFound, VmAlreadyExists
    │   ├── SnapshotNotFound, SnapshotAlreadyExists
    │   ├── InvalidTransition             a forbidden cell of the state x job table
    │   ├── QuotaExceeded
    │   ├── ImageError                    missing kernel / image / build tool
    │   └── VmmError                      the VMM misbehaved (exit code + log tail kept)
    │       ├── VmmTimeout                a deadline passed (boot not ready, API silent)
    │       └── VmmApiError               the VMM's API refused a request
    ├── tangle.errors.TangleError         chain side (SDK port)
    │   ├── ConfigError                   a missing or malformed setting (one line, names it)
    │   ├── KeystoreError
    │   ├── AbiDecodeError                calldata that does not decode
    │   ├── RpcError                      transport trouble talking to the chain (retried)
    │   └── JobError                      a job handler refused a call (recorded, not sent)
    └── (blueprint layer reuses the two trees; the CLI catches this root and exits 1)

Adapters translate foreign exceptions (OSError, httpx, QMP, web3) into this tree with
``raise ... from exc`` so callers only ever catch ours.
"""

from __future__ import annotations


class MicrovmBlueprintError(Exception):
    """Base class: everything this package raises deliberately."""


class ConfigError(MicrovmBlueprintError):
    """A setting (env var, flag) is missing or malformed; the one-line message names it.

    Raised at start-up by every layer's settings parser, never for a job's input (that is
    ``runtime.errors.InvalidInput``): a bad setting is the operator's to fix, a bad input the customer's.
    """


class TransientError(MicrovmBlueprintError):
    """A failure that says nothing about the call itself (a locked database, a full disk for a moment).

    Never recorded as a job's outcome: whoever runs the call retries it (with a deadline) or leaves it
    unfinished so it runs again at the next start.
    """

