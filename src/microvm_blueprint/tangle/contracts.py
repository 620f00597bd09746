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

# ---- blueprint definition and the service request flow (DESIGN.md §3; tangle/definition.py) ----


def _tuple(name: str, *components: dict[str, Any], array: bool = False) -> dict[str, Any]:
    return {"name": name, "type": "tuple[]" if array else "tuple", "components": list(components)}


_S = "string"
BLUEPRINT_DEFINITION_TUPLE = _tuple(
    "definition",
    _in("metadataUri", _S), _in("metadataHash", "bytes32"), _in("manager", "address"),
    _in("masterManagerRevision", "uint32"), _in("hasConfig", "bool"),
    _tuple("config", _in("membership", "uint8"), _in("pricing", "uint8"), _in("minOperators", "uint32"),
           _in("maxOperators", "uint32"), _in("subscriptionRate", "uint256"), _in("subscriptionInterval", "uint64"),
           _in("eventRate", "uint256")),
    _tuple("metadata", *[_in(n, _S) for n in ("name", "description", "author", "category", "codeRepository",
                                               "logo", "website", "license", "profilingData")]),
    _tuple("jobs", _in("name", _S), _in("description", _S), _in("metadataUri", _S), _in("paramsSchema", "bytes"),
           _in("resultSchema", "bytes"), array=True),
    _in("registrationSchema", "bytes"), _in("requestSchema", "bytes"),
    _tuple("sources", _in("kind", "uint8"),
           _tuple("container", _in("registry", _S), _in("image", _S), _in("tag", _S)),
           _tuple("wasm", _in("runtime", "uint8"), _in("fetcher", "uint8"), _in("artifactUri", _S),
                  _in("entrypoint", _S)),
           _tuple("native", _in("fetcher", "uint8"), _in("artifactUri", _S), _in("entrypoint", _S)),
           _tuple("testing", _in("cargoPackage", _S), _in("cargoBin", _S), _in("basePath", _S)),
           _tuple("binaries", _in("arch", "uint8"), _in("os", "uint8"), _in("name", _S), _in("sha256", "bytes32"),
                  array=True),
           array=True),
    _in("supportedMemberships", "uint8[]"),
)
CREATE_BLUEPRINT = _fn("createBlueprint", [BLUEPRINT_DEFINITION_TUPLE], [_in("blueprintId", "uint64")], "nonpayable")
GET_BLUEPRINT_DEFINITION = _fn(
    "getBlueprintDefinition", [_in("blueprintId", "uint64")], [{**BLUEPRINT_DEFINITION_TUPLE, "name": "definition"}],
    "view",
)
REQUEST_SERVICE = _fn(
    "requestService",
    [_in("blueprintId", "uint64"), _in("operators", "address[]"), _in("config", "bytes"),
     _in("permittedCallers", "address[]"), _in("ttl", "uint64"), _in("paymentToken", "address"),
     _in("paymentAmount", "uint256"), _in("confidentiality", "uint8")],
    [_in("requestId", "uint64")],
    "payable",
)
APPROVE_SERVICE = _fn(
    "approveService",
    [_tuple("params", _in("requestId", "uint64"),
            _tuple("securityCommitments", _tuple("asset", _in("kind", "uint8"), _in("token", "address")),
                   _in("exposureBps", "uint16"), array=True),
            _in("blsPubkey", "uint256[4]"), _in("blsPopSignature", "uint256[2]"),
            _tuple("teeCommitments", _in("backend", "uint8"), _in("expectedMeasurement", "bytes32"),
                   _in("nonceBinding", "bytes32"), _in("expiresAt", "uint64"), array=True))],
    [],
    "nonpayable",
)
BLUEPRINT_CREATED = _ev(
    "BlueprintCreated",
    [_in("blueprintId", "uint64", True), _in("owner", "address", True), _in("manager", "address", False),
     _in("metadataUri", "string", False), _in("metadataHash", "bytes32", False)],
)
SERVICE_REQUESTED = _ev(
    "ServiceRequested",
    [_in("requestId", "uint64", True), _in("blueprintId", "uint64", True), _in("requester", "address", True),
     _in("confidentiality", "uint8", False)],
)
#: Reverts of createBlueprint / requestService / approveService / job schemas (tnt-core Errors.sol)
BLUEPRINT_ERRORS = {
    "InvalidState": _err("InvalidState"),
    "BlueprintNotFound": _err("BlueprintNotFound", "uint64"),
    "BlueprintNotActive": _err("BlueprintNotActive", "uint64"),
    "BlueprintMetadataRequired": _err("BlueprintMetadataRequired"),
    "BlueprintMetadataHashRequired": _err("BlueprintMetadataHashRequired"),
    "BlueprintMembershipRequired": _err("BlueprintMembershipRequired"),
    "BlueprintSourcesRequired": _err("BlueprintSourcesRequired"),
    "BlueprintBinaryRequired": _err("BlueprintBinaryRequired"),
    "BlueprintBinaryHashRequired": _err("BlueprintBinaryHashRequired"),
    "MBSMRegistryNotSet": _err("MBSMRegistryNotSet"),
    "MasterManagerUnavailable": _err("MasterManagerUnavailable"),
    "InvalidRevision": _err("InvalidRevision", "uint32"),  # the MBSM registry's, bubbled up
    "EnforcedPause": _err("EnforcedPause"),
    "SchemaValidationFailed": _err("SchemaValidationFailed", "uint8", "uint64", "uint64", "uint256"),
    "InvalidSchemaVersion": _err("InvalidSchemaVersion", "uint8", "uint8"),
    "NoOperators": _err("NoOperators"),
    "InsufficientStake": _err("InsufficientStake", "address", "uint256", "uint256"),
    "ServiceRequestNotFound": _err("ServiceRequestNotFound", "uint64"),
    "ServiceRequestAlreadyProcessed": _err("ServiceRequestAlreadyProcessed", "uint64"),
    "AlreadyApproved": _err("AlreadyApproved", "uint64", "address"),
    "TTLBelowMinimum": _err("TTLBelowMinimum", "uint64", "uint64"),
    "TTLAboveMaximum": _err("TTLAboveMaximum", "uint64", "uint64"),
    "SecurityCommitmentsRequired": _err("SecurityCommitmentsRequired", "uint64"),
    "TokenNotAllowed": _err("TokenNotAllowed", "address"),
}

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


def selector_bytes(fragment: dict[str, Any]) -> bytes:
    """:func:`selector` as the 4 bytes calldata starts with."""
    return bytes.fromhex(selector(fragment)[2:])


TOPIC_JOB_SUBMITTED = topic(JOB_SUBMITTED)
TOPIC_JOB_SUBMITTED_FROM_QUOTE = topic(JOB_SUBMITTED_FROM_QUOTE)
TOPIC_JOB_RESULT_SUBMITTED = topic(JOB_RESULT_SUBMITTED)
TOPIC_JOB_COMPLETED = topic(JOB_COMPLETED)
TOPIC_SERVICE_ACTIVATED = topic(SERVICE_ACTIVATED)

ERROR_BY_SELECTOR: dict[str, str] = {selector(e): name for name, e in {**ERRORS, **OTHER_ERRORS}.items()}
#: every custom error a revert is named by: the Tangle contract's and the status registry's
REVERT_NAMES: dict[str, str] = {
    **ERROR_BY_SELECTOR, **{selector(e): name for name, e in STATUS_REGISTRY_ERRORS.items()},
    **{selector(e): name for name, e in BLUEPRINT_ERRORS.items()},
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
