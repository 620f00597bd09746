"""This blueprint's definition on Tangle, generated from the job table :data:`~.jobs.JOBS` (one source
of truth: the jobs, their order, their argument names and types).

Each job gets its name, its summary as description, and its schemas: parameters from
``JobDef.arg_names``/``arg_types``, result ``(bool ok)``. The metadata document (JSON: name,
description, license, every job with its parameters and result, the native source) is hashed as
blueprint-sdk hashes a ``metadata_file`` (keccak of the key-sorted compact JSON), and by default
travels as its own ``data:`` URI, so the definition is self-contained and checkable.

Schemas on-chain (``schemas_on_chain``): tnt-core validates a job's inputs and its result against a
stored schema in its compact binary payload format, while this operator, its customers' client and
blueprint-sdk's ``TangleResult`` use the ABI encoding (a ``bool`` result is 32 bytes; the compact
format wants 1). So the definition sent by default stores **empty** schemas on-chain (no
validation, as the fixture's blueprint 0 does) and carries the schemas in the metadata document;
``schemas_on_chain=True`` stores the TLV schemas too (then every ABI-encoded call and result is
refused with ``SchemaValidationFailed``: tests/integration/test_real_tangle_blueprint.py shows it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eth_utils import keccak

from ..errors import ConfigError
from ..tangle.definition import (
    Arch,
    Binary,
    BlueprintDefinition,
    Config,
    Fetcher,
    JobDefinition,
    Membership,
    Metadata,
    NativeSource,
    Os,
    encode_schema,
)
from .jobs import JOBS, JobDef

NAME = "microvm-blueprint"
DESCRIPTION = (
    "MicroVM lifecycle as Tangle jobs: create, start, stop, snapshot, restore and destroy QEMU microvm or "
    "Firecracker guests, with SSH keys and published ports; a read-only query API answers about the VMs."
)
CATEGORY = "compute"
LICENSE = "MIT"
ENTRYPOINT = "microvm-blueprint"
RESULT_FIELDS: tuple[tuple[str, str], ...] = (("ok", "bool"),)


def params_fields(job: JobDef) -> list[tuple[str, str]]:
    return list(zip(job.arg_names, job.arg_types, strict=True))


def host_arch() -> Arch:
    machine = platform.machine().lower()
    return {"x86_64": Arch.AMD64, "amd64": Arch.AMD64, "aarch64": Arch.ARM64, "arm64": Arch.ARM64}.get(
        machine, Arch.AMD64)


def fetcher_for(uri: str) -> Fetcher:
    """How blueprint-sdk's manager fetches ``uri``: ``ipfs://`` IPFS, ``http(s)://`` HTTP."""
    scheme = uri.split(":", 1)[0].lower()
    if scheme == "ipfs":
        return Fetcher.IPFS
    if scheme in ("http", "https"):
        return Fetcher.HTTP
    raise ConfigError(f"artifact URI {uri!r}: the manager fetches http(s):// or ipfs:// URIs")


def native_source(artifact: Path, artifact_uri: str, *, arch: Arch | None = None, os_: Os = Os.LINUX,
                  entrypoint: str = ENTRYPOINT) -> NativeSource:
    """The native-binary source: the release artifact at ``artifact_uri``, whose bytes are ``artifact``
    (hashed here: the manager checks the download against this sha256)."""
    try:
        digest = hashlib.sha256(artifact.read_bytes()).digest()
    except OSError as exc:
        raise ConfigError(f"artifact {artifact}: cannot read it: {exc.strerror or exc}") from exc
    binary = Binary(arch if arch is not None else host_arch(), os_, artifact.name, digest)
    return NativeSource(fetcher_for(artifact_uri), artifact_uri, entrypoint, (binary,))


def metadata_document(sources: Sequence[NativeSource], jobs: Sequence[JobDef] = JOBS) -> dict[str, Any]:
    """The metadata document the definition's URI and hash name."""
    return {
        "name": NAME,
        "description": DESCRIPTION,
        "category": CATEGORY,
        "license": LICENSE,
        "jobs": [
            {
                "index": j.index, "name": j.name, "description": j.summary,
                "params": [{"name": n, "type": t} for n, t in params_fields(j)],
                "result": [{"name": n, "type": t} for n, t in RESULT_FIELDS],
                "encoding": "abi",
            }
            for j in jobs
        ],
        "sources": [
            {
                "kind": "native", "fetcher": s.fetcher.name.lower(), "artifact_uri": s.artifact_uri,
                "entrypoint": s.entrypoint,
                "binaries": [{"arch": b.arch.name.lower(), "os": b.os.name.lower(), "name": b.name,
                              "sha256": b.sha256.hex()} for b in s.binaries],
            }
            for s in sources
        ],
    }


def canonical_json(document: dict[str, Any]) -> bytes:
    """Key-sorted compact JSON (as blueprint-sdk canonicalises a metadata file before hashing it)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def metadata_hash(document: dict[str, Any]) -> bytes:
    return keccak(canonical_json({k: v for k, v in document.items() if k != "integrity"}))


def data_uri(document: dict[str, Any]) -> str:
    return "data:application/json;base64," + base64.b64encode(canonical_json(document)).decode()


def blueprint_definition(
    sources: Sequence[NativeSource], *, metadata_uri: str | None = None, jobs: Sequence[JobDef] = JOBS,
    schemas_on_chain: bool = False, config: Config | None = None,
) -> BlueprintDefinition:
    """This blueprint's ``createBlueprint`` argument: every job of ``jobs`` in index order."""
    if [j.index for j in jobs] != list(range(len(jobs))):
        raise ConfigError("job indexes must be 0, 1, 2, ... in order: the job index is the position on-chain")
    document = metadata_document(sources, jobs)
    job_defs = tuple(
        JobDefinition(
            name=j.name, description=j.summary,
            params_schema=encode_schema(params_fields(j)) if schemas_on_chain else b"",
            result_schema=encode_schema(RESULT_FIELDS) if schemas_on_chain else b"",
        )
        for j in jobs
    )
    return BlueprintDefinition(
        metadata_uri=metadata_uri or data_uri(document),
        metadata_hash=metadata_hash(document),
        metadata=Metadata(name=NAME, description=DESCRIPTION, category=CATEGORY, license=LICENSE),
        jobs=job_defs,
        sources=tuple(sources),
        config=config or Config(membership=Membership.FIXED, min_operators=1),
        supported_memberships=(Membership.FIXED, Membership.DYNAMIC),
    )
