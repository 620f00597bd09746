"""This blueprint's definition: generated from the job table, TLV schemas as tnt-core/blueprint-sdk
encode them, the createBlueprint fragments checked against the real ITangle ABI (../shared/tangle)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from eth_abi import decode
from eth_utils import keccak

from microvm_blueprint.blueprint.definition import (
    blueprint_definition,
    canonical_json,
    fetcher_for,
    metadata_document,
    native_source,
)
from microvm_blueprint.blueprint.jobs import JOBS, JobDef
from microvm_blueprint.errors import ConfigError
from microvm_blueprint.tangle import contracts
from microvm_blueprint.tangle.definition import (
    DEFINITION_TYPE,
    Binary,
    DefinitionError,
    Fetcher,
    create_blueprint_data,
    decode_schema,
    encode_schema,
)


def test_schema_bytes_match_blueprint_sdks_encoder() -> None:
    # the byte layouts blueprint-sdk's `encode_json_schema_to_tlv` tests pin (cli/src/command/deploy/definition.rs)
    assert encode_schema([("greeting", "string")]) == bytes([2, 0, 1, 17, 0, 0, 0, 0, 8]) + b"greeting"
    two = encode_schema([("name", "string"), ("value", "uint256")])
    assert len(two) == 24 and two[13] == 12 and two[19:24] == b"value"
    values = encode_schema([("values", "uint256[]")])
    assert values == bytes([2, 0, 1, 21, 0, 0, 0, 1, 6]) + b"values" + bytes([12, 0, 0, 0, 0, 0])
    assert encode_schema([]) == b""
    with pytest.raises(DefinitionError, match="no schema kind"):
        encode_schema([("x", "(uint8,bool)")])


def test_every_job_round_trips_through_its_schema() -> None:
    for job in JOBS:
        fields = list(zip(job.arg_names, job.arg_types, strict=True))
        assert decode_schema(encode_schema(fields)) == fields
    assert decode_schema(encode_schema([("a", "uint16[3]")])) == [("a", "uint16[3]")]
    with pytest.raises(DefinitionError, match="after the schema"):
        decode_schema(encode_schema([("a", "bool")]) + b"\0")


def _source(tmp_path: Path) -> Any:
    artifact = tmp_path / "mvb.tar.gz"
    artifact.write_bytes(b"artifact")
    return native_source(artifact, "https://example.org/mvb.tar.gz")


def test_definition_comes_from_the_job_table(tmp_path: Path) -> None:
    source = _source(tmp_path)
    d = blueprint_definition([source])
    assert [j.name for j in d.jobs] == [j.name for j in JOBS] and len(d.jobs) == 9
    assert d.jobs[8].name == "create_vm_with_config" and d.jobs[8].description == JOBS[8].summary
    assert all(j.params_schema == b"" == j.result_schema for j in d.jobs)  # off-chain by default (module doc)
    on_chain = blueprint_definition([source], schemas_on_chain=True)
    assert decode_schema(on_chain.jobs[8].params_schema) == list(zip(JOBS[8].arg_names, JOBS[8].arg_types, strict=True))
    assert decode_schema(on_chain.jobs[0].result_schema) == [("ok", "bool")]
    # the metadata document travels as a data: URI and its keccak is the hash
    doc = json.loads(base64.b64decode(d.metadata_uri.split(",", 1)[1]))
    assert doc == metadata_document([source]) and keccak(canonical_json(doc)) == d.metadata_hash
    assert [p["name"] for p in doc["jobs"][8]["params"]] == list(JOBS[8].arg_names)
    assert source.binaries[0].sha256 == __import__("hashlib").sha256(b"artifact").digest()
    # the calldata decodes back to the definition
    data = create_blueprint_data(d)
    assert data[:4].hex() == contracts.selector(contracts.CREATE_BLUEPRINT)[2:]
    (value,) = decode([DEFINITION_TYPE], data[4:])
    assert value[0] == d.metadata_uri and len(value[7]) == 9 and value[10][0][0] == 2  # a Native source
    assert value[10][0][3] == (int(Fetcher.HTTP), "https://example.org/mvb.tar.gz", "microvm-blueprint")


def test_a_definition_the_contract_would_refuse_is_refused_here(tmp_path: Path) -> None:
    source = _source(tmp_path)
    with pytest.raises(ConfigError, match="0, 1, 2"):
        blueprint_definition([source], jobs=[JobDef(1, "x", (), (), "")])
    with pytest.raises(DefinitionError, match="at least one source"):
        create_blueprint_data(blueprint_definition([]))
    zero = Binary(source.binaries[0].arch, source.binaries[0].os, "x", bytes(32))
    with pytest.raises(DefinitionError, match="sha256"):
        zero.abi()
    with pytest.raises(ConfigError, match="http"):
        fetcher_for("file:///tmp/x")
    assert fetcher_for("ipfs://bafy") is Fetcher.IPFS


def _sig(item: dict[str, Any]) -> str:
    def t(i: dict[str, Any]) -> str:
        if i["type"].startswith("tuple"):
            return "(" + ",".join(t(c) for c in i["components"]) + ")" + str(i["type"])[5:]
        return str(i["type"])

    return f"{item['name']}({','.join(t(i) for i in item.get('inputs', []))})"


def test_fragments_match_the_full_itangle_abi(shared: Path) -> None:
    path = shared / "tangle" / "itangle-full-abi.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    abi = json.loads(path.read_text())
    abi = abi["abi"] if isinstance(abi, dict) else abi
    real = {(i["type"], _sig(i)): i for i in abi if i["type"] in ("function", "event")}
    for fragment in (contracts.CREATE_BLUEPRINT, contracts.GET_BLUEPRINT_DEFINITION, contracts.REQUEST_SERVICE,
                     contracts.APPROVE_SERVICE, contracts.BLUEPRINT_CREATED, contracts.SERVICE_REQUESTED):
        key = (fragment["type"], _sig(fragment))
        assert key in real, key
        if fragment["type"] == "event":
            assert [i["indexed"] for i in fragment["inputs"]] == [i["indexed"] for i in real[key]["inputs"]]
    # DEFINITION_TYPE is the struct createBlueprint takes
    assert _sig(contracts.CREATE_BLUEPRINT) == f"createBlueprint({DEFINITION_TYPE})"


def test_dev_contract_has_the_registrys_heartbeat_interface(shared: Path) -> None:
    from microvm_blueprint.tangle.devnet import ARTIFACT

    path = shared / "tangle" / "operator-status-registry-abi.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    registry = {(i["type"], _sig(i)) for i in json.loads(path.read_text())}
    dev = {(i["type"], _sig(i)) for i in json.loads(ARTIFACT.read_text())["abi"]}
    for fragment in contracts.STATUS_REGISTRY_ABI:
        key = (fragment["type"], _sig(fragment))
        if key in registry and key != ("error", "OperatorSlashed()"):  # the dev chain slashes no one
            assert key in dev, f"the dev contract lacks {key}"


def test_cli_dry_run_prints_nine_jobs(tmp_path: Path) -> None:
    artifact = tmp_path / "a.tar.gz"
    artifact.write_bytes(b"x")
    done = subprocess.run([sys.executable, "-m", "microvm_blueprint.cli", "blueprint", "deploy", "--artifact",
                           str(artifact), "--artifact-uri", "https://example.org/a.tar.gz", "--dry-run"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "9 jobs" in done.stdout and "8 create_vm_with_config" in done.stdout and "nothing sent" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "microvm_blueprint.cli", "blueprint", "deploy", "--artifact",
                              str(tmp_path / "nope"), "--artifact-uri", "https://example.org/a"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("error: artifact") and "Traceback" not in missing.stderr
