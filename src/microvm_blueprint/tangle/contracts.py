"""The subset of the Tangle contract ABI an operator and a customer use, written in this project.

``tests/unit/test_tangle_contracts.py`` checks every fragment, topic and selector here against the
real tnt-core ABI in ``../shared/tangle`` at test time.
"""

from __future__ import annotations

from typing import Any

from eth_utils import event_abi_to_log_topic, function_abi_to_4byte_selector, keccak


def _in(name: str, typ: str, indexed: bool | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "type": typ}
    if indexed is not None:
        out["indexed"] = indexed
    return out


def _fn(name: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], mut: str) -> dict[str, Any]:
    return {"type": "function", "name": name, "inputs": inputs, "outputs": outputs, "stateMutability": mut}


def _ev(name: str, inputs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "event", "name": name, "inputs": inputs, "anonymous": False}


def _err(name: str, *types: str) -> dict[str, Any]:
    return {"type": "error", "name": name, "inputs": [_in(f"a{i}", t) for i, t in enumerate(types)]}


JOB_CALL_TUPLE = {
    "name": "",
    "type": "tuple",
    "components": [
        _in("jobIndex", "uint8"),
        _in("caller", "address"),
        _in("createdAt", "uint64"),
        _in("resultCount", "uint32"),
        _in("completed", "bool"),
        _in("isRFQ", "bool"),
        _in("payment", "uint256"),
    ],
}

#: tnt-core's ``Types.Service`` (``getService``); ``owner`` may act on every VM of the service (DESIGN.md §9)
SERVICE_TUPLE = {
    "name": "",
    "type": "tuple",
    "components": [
        _in("blueprintId", "uint64"), _in("owner", "address"), _in("createdAt", "uint64"), _in("ttl", "uint64"),
        _in("terminatedAt", "uint64"), _in("lastPaymentAt", "uint64"), _in("operatorCount", "uint32"),
        _in("minOperators", "uint32"), _in("maxOperators", "uint32"), _in("membership", "uint8"),
        _in("pricing", "uint8"), _in("status", "uint8"), _in("confidentiality", "uint8"),
    ],
}

SUBMIT_JOB = _fn(
    "submitJob",
    [_in("serviceId", "uint64"), _in("jobIndex", "uint8"), _in("inputs", "bytes")],
    [_in("", "uint64")],
    "payable",
)
SUBMIT_RESULT = _fn(
    "submitResult", [_in("serviceId", "uint64"), _in("callId", "uint64"), _in("result", "bytes")], [], "nonpayable"
)
SUBMIT_RESULTS = _fn(
    "submitResults",
    [_in("serviceId", "uint64"), _in("callIds", "uint64[]"), _in("results", "bytes[]")],
    [],
    "nonpayable",
)
GET_JOB_CALL = _fn("getJobCall", [_in("serviceId", "uint64"), _in("callId", "uint64")], [JOB_CALL_TUPLE], "view")
IS_OPERATOR_REGISTERED = _fn(
    "isOperatorRegistered", [_in("blueprintId", "uint64"), _in("operator", "address")], [_in("", "bool")], "view"
)
REGISTER_OPERATOR = _fn(
    "registerOperator",
    [_in("blueprintId", "uint64"), _in("ecdsaPublicKey", "bytes"), _in("rpcAddress", "string")],
    [],
    "nonpayable",
)
GET_SERVICE = _fn("getService", [_in("serviceId", "uint64")], [SERVICE_TUPLE], "view")
IS_SERVICE_OPERATOR = _fn(
    "isServiceOperator", [_in("serviceId", "uint64"), _in("operator", "address")], [_in("", "bool")], "view"
)

JOB_SUBMITTED = _ev(
    "JobSubmitted",
    [
        _in("serviceId", "uint64", True),
        _in("callId", "uint64", True),
        _in("jobIndex", "uint8", False),
        _in("caller", "address", False),
        _in("inputs", "bytes", False),
    ],
)
JOB_SUBMITTED_FROM_QUOTE = _ev(
    "JobSubmittedFromQuote",
    [
        _in("serviceId", "uint64", True),
        _in("callId", "uint64", True),
        _in("jobIndex", "uint8", False),
        _in("caller", "address", False),
        _in("quotedOperators", "address[]", False),
        _in("totalPrice", "uint256", False),
        _in("inputs", "bytes", False),
    ],
)
JOB_RESULT_SUBMITTED = _ev(
    "JobResultSubmitted",
    [
        _in("serviceId", "uint64", True),
        _in("callId", "uint64", True),
        _in("operator", "address", True),
        _in("result", "bytes", False),
    ],
)
JOB_COMPLETED = _ev("JobCompleted", [_in("serviceId", "uint64", True), _in("callId", "uint64", True)])
SERVICE_ACTIVATED = _ev(
    "ServiceActivated",
    [
        _in("serviceId", "uint64", True),
        _in("requestId", "uint64", True),
        _in("blueprintId", "uint64", True),
        _in("confidentiality", "uint8", False),
    ],
)

ERRORS = {
    "JobAlreadyCompleted": _err("JobAlreadyCompleted", "uint64", "uint64"),
    "ResultAlreadySubmitted": _err("ResultAlreadySubmitted", "uint64", "uint64", "address"),
    "OperatorNotInService": _err("OperatorNotInService", "uint64", "address"),
    "NotPermittedCaller": _err("NotPermittedCaller", "uint64", "address"),
    "JobCallNotFound": _err("JobCallNotFound", "uint64", "uint64"),
    "InvalidJobIndex": _err("InvalidJobIndex", "uint8"),
    "ServiceNotActive": _err("ServiceNotActive", "uint64"),
    "ServiceNotFound": _err("ServiceNotFound", "uint64"),
    "OperatorNotRegistered": _err("OperatorNotRegistered", "uint64", "address"),
    "OperatorAlreadyRegistered": _err("OperatorAlreadyRegistered", "uint64", "address"),
}
#: Further reverts of the real contract a result submission can meet (the dev contract need not raise them).
OTHER_ERRORS = {
    "OperatorNotActive": _err("OperatorNotActive", "address"),
    "ServiceExpired": _err("ServiceExpired", "uint64"),
    "AggregationRequired": _err("AggregationRequired", "uint64", "uint8"),
    "NotQuotedOperator": _err("NotQuotedOperator", "uint64", "uint64"),
    "LengthMismatch": _err("LengthMismatch"),
    "Unauthorized": _err("Unauthorized"),
}

# ---- OperatorStatusRegistry (QoS heartbeats, DESIGN.md §11) ----
SUBMIT_HEARTBEAT = _fn(
    "submitHeartbeat",
    [_in("serviceId", "uint64"), _in("blueprintId", "uint64"), _in("statusCode", "uint8"), _in("metrics", "bytes"),
     _in("timestamp", "uint64"), _in("signature", "bytes")],
    [],
    "nonpayable",
)
IS_ONLINE = _fn("isOnline", [_in("serviceId", "uint64"), _in("operator", "address")], [_in("", "bool")], "view")
GET_LAST_HEARTBEAT = _fn(
    "getLastHeartbeat", [_in("serviceId", "uint64"), _in("operator", "address")], [_in("", "uint256")], "view"
)
HEARTBEAT_TYPEHASH = _fn("HEARTBEAT_TYPEHASH", [], [_in("", "bytes32")], "view")
DOMAIN_SEPARATOR = _fn("DOMAIN_SEPARATOR", [], [_in("", "bytes32")], "view")
STATUS_REGISTRY_ERRORS = {
    "HeartbeatStale": _err("HeartbeatStale", "uint64", "uint64"),
    "HeartbeatFromFuture": _err("HeartbeatFromFuture", "uint64", "uint64"),
    "NotRegisteredOperator": _err("NotRegisteredOperator"),
    "InvalidSignature": _err("InvalidSignature"),
    "ECDSAInvalidSignature": _err("ECDSAInvalidSignature"),
    "ECDSAInvalidSignatureLength": _err("ECDSAInvalidSignatureLength", "uint256"),
    "OperatorSlashed": _err("OperatorSlashed"),
}
STATUS_REGISTRY_ABI: list[dict[str, Any]] = [
    SUBMIT_HEARTBEAT, IS_ONLINE, GET_LAST_HEARTBEAT, HEARTBEAT_TYPEHASH, DOMAIN_SEPARATOR,
    *STATUS_REGISTRY_ERRORS.values(),
]

TANGLE_ABI: list[dict[str, Any]] = [
    SUBMIT_JOB,
    SUBMIT_RESULT,
    SUBMIT_RESULTS,
    GET_JOB_CALL,
    IS_OPERATOR_REGISTERED,
    REGISTER_OPERATOR,
    IS_SERVICE_OPERATOR,
    GET_SERVICE,
    JOB_SUBMITTED,
    JOB_SUBMITTED_FROM_QUOTE,
    JOB_RESULT_SUBMITTED,
    JOB_COMPLETED,
    SERVICE_ACTIVATED,
    *ERRORS.values(),
    *OTHER_ERRORS.values(),
]


def topic(event: dict[str, Any]) -> str:
    return "0x" + event_abi_to_log_topic(event).hex()  # type: ignore[arg-type]


def selector(fragment: dict[str, Any]) -> str:
    if fragment["type"] == "error":
        sig = f"{fragment['name']}({','.join(i['type'] for i in fragment['inputs'])})"
        return "0x" + keccak(text=sig)[:4].hex()
    return "0x" + function_abi_to_4byte_selector(fragment).hex()  # type: ignore[arg-type]


TOPIC_JOB_SUBMITTED = topic(JOB_SUBMITTED)
TOPIC_JOB_SUBMITTED_FROM_QUOTE = topic(JOB_SUBMITTED_FROM_QUOTE)
TOPIC_JOB_RESULT_SUBMITTED = topic(JOB_RESULT_SUBMITTED)
TOPIC_JOB_COMPLETED = topic(JOB_COMPLETED)
TOPIC_SERVICE_ACTIVATED = topic(SERVICE_ACTIVATED)

ERROR_BY_SELECTOR: dict[str, str] = {selector(e): name for name, e in {**ERRORS, **OTHER_ERRORS}.items()}
#: every custom error a revert is named by: the Tangle contract's and the status registry's
REVERT_NAMES: dict[str, str] = {
    **ERROR_BY_SELECTOR, **{selector(e): name for name, e in STATUS_REGISTRY_ERRORS.items()}
}

#: Reverts that mean "the chain already has a result for this call": success for an operator.
ALREADY_DONE = frozenset({"JobAlreadyCompleted", "ResultAlreadySubmitted"})
#: Reverts that will never succeed on retry: log and drop.
PERMANENT = frozenset(
    {
        "OperatorNotInService", "JobCallNotFound", "NotPermittedCaller", "InvalidJobIndex", "ServiceNotFound",
        "ServiceExpired", "AggregationRequired", "NotQuotedOperator",
    }
)
