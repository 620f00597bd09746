"""Our ABI subset and the dev contract agree with the real Tangle ABI (../shared/tangle) at test time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from microvm_blueprint.tangle import contracts
from microvm_blueprint.tangle.devnet import ARTIFACT, REPO

Fragment = dict[str, Any]  # one ABI item, as JSON


def _sig(item: Fragment) -> str:
    def t(i: Fragment) -> str:
        if i["type"].startswith("tuple"):
            return "(" + ",".join(t(c) for c in i["components"]) + ")" + str(i["type"])[5:]
        return str(i["type"])

    return f"{item['name']}({','.join(t(i) for i in item.get('inputs', []))})"


@pytest.fixture(scope="module")
def real_abi(shared: Path) -> list[Fragment]:
    path = shared / "tangle" / "tangle-operator-abi.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _index(abi: list[Fragment]) -> dict[tuple[str, str], Fragment]:
    return {(i["type"], _sig(i)): i for i in abi if i["type"] in ("function", "event", "error")}


def test_our_fragments_match_the_real_abi(real_abi: list[Fragment]) -> None:
    real = _index(real_abi)
    for item in contracts.TANGLE_ABI:
        key = (item["type"], _sig(item))
        assert key in real, f"{key} is not in the real ABI"
        if item["type"] == "event":
            assert [i.get("indexed") for i in item["inputs"]] == [i.get("indexed") for i in real[key]["inputs"]]
        if item["type"] == "function":
            assert _sig({"name": "", "inputs": item["outputs"]}) == _sig({"name": "", "inputs": real[key]["outputs"]})
    assert contracts.TOPIC_JOB_SUBMITTED == "0xde37cc48d21778e1c9a075c4e41c5aff6918c3ea6151221f0af3ce8121a29db5"
    assert contracts.selector(contracts.SUBMIT_RESULT) == "0x2d07e655"
    assert contracts.selector(contracts.SUBMIT_RESULTS) == "0xaacdba9f"
    expected = {"JobAlreadyCompleted": "0x0a55512f", "ResultAlreadySubmitted": "0xb7e7fcee",
                "OperatorNotInService": "0x783482e9", "NotPermittedCaller": "0xd5dd5b44",
                "JobCallNotFound": "0x96c6ebfc", "InvalidJobIndex": "0x1370bcad"}
    for name, sel in expected.items():
        assert contracts.selector(contracts.ERRORS[name]) == sel


def test_dev_contract_speaks_the_real_interface(real_abi: list[Fragment]) -> None:
    dev = _index(json.loads(ARTIFACT.read_text())["abi"])
    real = _index(real_abi)
    for key in [("function", _sig(contracts.SUBMIT_JOB)), ("function", _sig(contracts.SUBMIT_RESULT)),
                ("function", _sig(contracts.SUBMIT_RESULTS)), ("function", _sig(contracts.GET_JOB_CALL)),
                ("function", _sig(contracts.IS_OPERATOR_REGISTERED)), ("function", _sig(contracts.REGISTER_OPERATOR)),
                ("function", _sig(contracts.GET_SERVICE)),
                *[("event", _sig(e)) for e in (contracts.JOB_SUBMITTED, contracts.JOB_SUBMITTED_FROM_QUOTE,
                                               contracts.JOB_RESULT_SUBMITTED, contracts.JOB_COMPLETED,
                                               contracts.SERVICE_ACTIVATED)],
                *[("error", _sig(e)) for n, e in contracts.ERRORS.items() if n != "ServiceNotActive"]]:
        assert key in dev, f"the dev contract lacks {key}"
        assert key in real
        if key[0] == "event":
            assert [i.get("indexed") for i in dev[key]["inputs"]] == [i.get("indexed") for i in real[key]["inputs"]]


def test_committed_artifact_matches_a_fresh_compile() -> None:
    if shutil.which("node") is None or not (REPO / "node_modules" / "solc").is_dir():
        pytest.skip("node + npm package solc are needed to recompile (npm ci)")
    proc = subprocess.run([sys.executable, "-m", "microvm_blueprint.tangle.devnet.build", "--check"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr


def test_topics_and_selectors_equal_those_of_the_real_abi(real_abi: list[Fragment]) -> None:
    """Every topic0 and selector we use, recomputed from the real ABI's own fragments."""
    from eth_typing import ABIEvent, ABIFunction
    from eth_utils import event_abi_to_log_topic, function_abi_to_4byte_selector, keccak

    real = _index(real_abi)
    ours = {(i["type"], _sig(i)): i for i in contracts.TANGLE_ABI}
    for key, item in ours.items():
        theirs = real[key]
        if key[0] == "event":
            assert contracts.topic(item) == "0x" + event_abi_to_log_topic(cast("ABIEvent", theirs)).hex()
        elif key[0] == "function":
            assert contracts.selector(item) == "0x" + function_abi_to_4byte_selector(cast("ABIFunction", theirs)).hex()
        else:
            assert contracts.selector(item) == "0x" + keccak(text=_sig(theirs))[:4].hex()
    by_name = {i["name"]: i for i in real_abi if i["type"] == "event"}
    for name, constant in [("JobSubmitted", contracts.TOPIC_JOB_SUBMITTED),
                           ("JobSubmittedFromQuote", contracts.TOPIC_JOB_SUBMITTED_FROM_QUOTE),
                           ("JobResultSubmitted", contracts.TOPIC_JOB_RESULT_SUBMITTED),
                           ("JobCompleted", contracts.TOPIC_JOB_COMPLETED),
                           ("ServiceActivated", contracts.TOPIC_SERVICE_ACTIVATED)]:
        assert constant == "0x" + event_abi_to_log_topic(cast("ABIEvent", by_name[name])).hex()
    # every custom error the real contract declares is classified by name
    real_errors = {_sig(i) for i in real_abi if i["type"] == "error"}
    assert {_sig(e) for e in {**contracts.ERRORS, **contracts.OTHER_ERRORS}.values()} == real_errors
    assert set(contracts.ERROR_BY_SELECTOR.values()) == {i["name"] for i in real_abi if i["type"] == "error"}
    assert contracts.ALREADY_DONE <= set(contracts.ERROR_BY_SELECTOR.values())
    assert contracts.PERMANENT <= set(contracts.ERROR_BY_SELECTOR.values())
    assert not contracts.ALREADY_DONE & contracts.PERMANENT


def test_status_registry_fragments_match_the_real_abi(shared: Path) -> None:
    path = shared / "tangle" / "operator-status-registry-abi.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    raw = json.loads(path.read_text())
    real = _index(raw["abi"] if isinstance(raw, dict) else raw)
    for item in contracts.STATUS_REGISTRY_ABI:
        key = (item["type"], _sig(item))
        assert key in real, f"{key} is not in the real registry ABI"
        if item["type"] == "function":
            assert _sig({"name": "", "inputs": item["outputs"]}) == _sig({"name": "", "inputs": real[key]["outputs"]})
    assert contracts.selector(contracts.SUBMIT_HEARTBEAT) == "0x2bf4d6a7"
    for name in contracts.STATUS_REGISTRY_ERRORS:
        assert contracts.REVERT_NAMES[contracts.selector(contracts.STATUS_REGISTRY_ERRORS[name])] == name
