"""The root of every error this package raises on purpose, and the whole tree below it.

Every class that subclasses :class:`MicrovmBlueprintError` anywhere in the package is drawn here
(``tests/unit/test_error_tree.py`` fails when one is missing, or when a drawn name is no class)::

    MicrovmBlueprintError                       errors              the root; the CLI catches it and exits 1
    ├── ConfigError                             errors              a missing or malformed setting (names it, one line)
    ├── TransientError                          errors              says nothing about the call: retried, never recorded
    │   └── StoreError                          runtime.errors      state database locked / busy / I/O hiccup / disk full
    ├── StoreUnusable                           runtime.errors      state database corrupt, not a database, other schema
    ├── VmError                                 runtime.errors      VM lifecycle and VMM backends (L0); a call's outcome
    │   ├── InvalidInput                        runtime.errors      bad id / spec (the job's input); nothing changed
    │   ├── VmNotFound                          runtime.errors      "vm '<id>' not found"
    │   ├── VmAlreadyExists                     runtime.errors      "vm '<id>' already exists" (tombstones count)
    │   ├── SnapshotNotFound                    runtime.errors
    │   ├── SnapshotAlreadyExists               runtime.errors
    │   ├── InvalidTransition                   runtime.errors      a forbidden cell of the state x job table
    │   ├── OwnershipError                      runtime.errors      "vm '<id>' belongs to another caller" (§9)
    │   ├── QuotaExceeded                       runtime.errors      over a configured host limit
    │   ├── RecordedFailure                     runtime.errors      a replayed call that failed the first time (same text)
    │   ├── ImageError                          runtime.errors      missing kernel / image / build tool
    │   └── VmmError                            runtime.errors      the VMM misbehaved (exit code + log tail kept)
    │       ├── VmmTimeout                      runtime.errors      a deadline passed (boot not ready, API silent)
    │       └── VmmApiError                     runtime.errors      the VMM's API refused a request (status + body)
    ├── TangleError                             tangle.errors       chain side (SDK port)
    │   ├── KeystoreError                       tangle.errors       keystore missing, unreadable or malformed
    │   ├── AbiDecodeError                      tangle.errors       calldata that does not decode
    │   ├── RpcError                            tangle.errors       the chain answered an error or garbage (retried)
    │   │   └── RpcUnavailable                  tangle.errors       the chain could not be reached (connection, timeout, 5xx)
    │   ├── ContractRevert                      tangle.rpc          a call or gas estimate reverted (custom error's name)
    │   ├── JobError                            tangle.errors       a job handler refused a call (recorded, not sent)
    │   ├── BridgeError                         tangle.errors       the blueprint manager's bridge failed or refused (exit 1)
    │   ├── RegistrationError                   tangle.errors       registerOperator refused; not an operator of the service
    │   ├── DefinitionError                     tangle.definition   a blueprint definition not encodable; createBlueprint refused
    │   └── DevnetError                         tangle.devnet       the local chain could not be started or set up
    ├── JournalError                            blueprint.journal   the job journal database is unusable
    ├── BadRequest                              blueprint.query     a query API parameter out of range (HTTP 400)
    ├── Unauthorized                            blueprint.tangle_sig  a console read not signed by its owner (HTTP 401)
    ├── TooManySigned                           blueprint.tangle_sig  too many signed reads remembered (HTTP 503)
    ├── Unavailable                             blueprint.events    a live endpoint cannot serve now (HTTP 503)
    │   ├── TooBusy                             blueprint.events    too many waiters or event streams
    │   └── Closed                              blueprint.events    the query API is shutting down
    ├── ClientError                             blueprint.client    the customer client: unknown job, bad argument, tx refused
    └── CliError                                cli                 a command-line usage or client-side failure

Adapters translate foreign exceptions (OSError, sqlite3, httpx, QMP) into this tree with
``raise ... from exc`` so callers only ever catch ours. A ``TransientError`` is the one kind whose
text is never a job's outcome: whoever runs the call retries it (with a deadline) or leaves it
unfinished so it runs again at the next start.
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

