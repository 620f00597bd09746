// SPDX-License-Identifier: MIT
// DevTangle: the subset of the Tangle v2 contract (tnt-core) that a blueprint operator and its
// customers touch, for the embedded local chain. Same function signatures, events and custom
// errors as the deployed Tangle proxy; blueprints and services are set up with simple dev-only
// functions instead of the real request/approve flow. It is also the dev chain's status registry:
// submitHeartbeat checks the same EIP-712 signature as tnt-core's OperatorStatusRegistry.
pragma solidity 0.8.28;

contract DevTangle {
    struct JobCall {
        uint8 jobIndex;
        address caller;
        uint64 createdAt;
        uint32 resultCount;
        bool completed;
        bool isRFQ;
        uint256 payment;
    }

    struct Service {
        bool active;
        uint64 blueprintId;
        address owner;
        uint32 requiredResults;
    }

    /// The layout of tnt-core's `Types.Service`, as `getService` returns it (fields the dev chain does not
    /// model are zero; `status` 1 = active).
    struct ServiceInfo {
        uint64 blueprintId;
        address owner;
        uint64 createdAt;
        uint64 ttl;
        uint64 terminatedAt;
        uint64 lastPaymentAt;
        uint32 operatorCount;
        uint32 minOperators;
        uint32 maxOperators;
        uint8 membership;
        uint8 pricing;
        uint8 status;
        uint8 confidentiality;
    }

    event JobSubmitted(uint64 indexed serviceId, uint64 indexed callId, uint8 jobIndex, address caller, bytes inputs);
    event JobSubmittedFromQuote(
        uint64 indexed serviceId,
        uint64 indexed callId,
        uint8 jobIndex,
        address caller,
        address[] quotedOperators,
        uint256 totalPrice,
        bytes inputs
    );
    event JobResultSubmitted(uint64 indexed serviceId, uint64 indexed callId, address indexed operator, bytes result);
    event JobCompleted(uint64 indexed serviceId, uint64 indexed callId);
    event ServiceActivated(uint64 indexed serviceId, uint64 indexed requestId, uint64 indexed blueprintId, uint8 confidentiality);
    event OperatorRegistered(uint64 indexed blueprintId, address indexed operator, bytes ecdsaPublicKey, string rpcAddress);

    error JobAlreadyCompleted(uint64 serviceId, uint64 callId);
    error ResultAlreadySubmitted(uint64 serviceId, uint64 callId, address operator);
    error OperatorNotInService(uint64 serviceId, address operator);
    error NotPermittedCaller(uint64 serviceId, address caller);
    error ServiceNotFound(uint64 serviceId);
    error JobCallNotFound(uint64 serviceId, uint64 callId);
    error InvalidJobIndex(uint8 jobIndex);
    error LengthMismatch();
    error OperatorNotRegistered(uint64 blueprintId, address operator);
    error OperatorAlreadyRegistered(uint64 blueprintId, address operator);
    error Unauthorized();

    // keccak256("JobSubmitted(uint64,uint64,uint8,address,bytes)")
    bytes32 private constant JOB_SUBMITTED_TOPIC = 0xde37cc48d21778e1c9a075c4e41c5aff6918c3ea6151221f0af3ce8121a29db5;

    uint64 public blueprintCount;
    uint64 public serviceCount;
    mapping(uint64 => uint8) public blueprintJobCount;
    mapping(uint64 => address) public blueprintOwner;
    mapping(uint64 => Service) private services;
    mapping(uint64 => mapping(address => bool)) private registered;
    mapping(uint64 => mapping(address => bool)) private operatorsOf;
    mapping(uint64 => address[]) private operatorList;
    mapping(uint64 => mapping(address => bool)) private permitted;
    mapping(uint64 => uint64) private callCount;
    mapping(uint64 => mapping(uint64 => JobCall)) private calls;
    mapping(uint64 => mapping(uint64 => mapping(address => bool))) private answered;

    // ---- dev-only set-up ----

    function createBlueprint(uint8 jobCount) external returns (uint64 blueprintId) {
        blueprintId = blueprintCount++;
        blueprintJobCount[blueprintId] = jobCount;
        blueprintOwner[blueprintId] = msg.sender;
    }

    function registerOperator(uint64 blueprintId, bytes calldata ecdsaPublicKey, string calldata rpcAddress) external {
        if (registered[blueprintId][msg.sender]) revert OperatorAlreadyRegistered(blueprintId, msg.sender);
        registered[blueprintId][msg.sender] = true;
        emit OperatorRegistered(blueprintId, msg.sender, ecdsaPublicKey, rpcAddress);
    }

    function isOperatorRegistered(uint64 blueprintId, address operator) external view returns (bool) {
        return registered[blueprintId][operator];
    }

    function createService(
        uint64 blueprintId,
        address[] calldata operators,
        address[] calldata permittedCallers,
        uint32 requiredResults
    ) external returns (uint64 serviceId) {
        serviceId = serviceCount++;
        services[serviceId] = Service(true, blueprintId, msg.sender, requiredResults == 0 ? 1 : requiredResults);
        permitted[serviceId][msg.sender] = true;
        for (uint256 i = 0; i < operators.length; i++) {
            if (!registered[blueprintId][operators[i]]) revert OperatorNotRegistered(blueprintId, operators[i]);
            operatorsOf[serviceId][operators[i]] = true;
            operatorList[serviceId].push(operators[i]);
        }
        for (uint256 i = 0; i < permittedCallers.length; i++) {
            permitted[serviceId][permittedCallers[i]] = true;
        }
        emit ServiceActivated(serviceId, serviceId, blueprintId, 0);
    }

    function addPermittedCaller(uint64 serviceId, address caller) external {
        if (services[serviceId].owner != msg.sender) revert Unauthorized();
        permitted[serviceId][caller] = true;
    }

    function isPermittedCaller(uint64 serviceId, address caller) external view returns (bool) {
        return permitted[serviceId][caller];
    }

    function isServiceOperator(uint64 serviceId, address operator) external view returns (bool) {
        return operatorsOf[serviceId][operator];
    }

    /// Same signature and tuple as the real contract's: an operator reads the service owner from it
    /// (the caller that may act on every VM, DESIGN.md §9).
    function getService(uint64 serviceId) external view returns (ServiceInfo memory info) {
        Service storage s = services[serviceId];
        if (!s.active) revert ServiceNotFound(serviceId);
        uint32 count = uint32(operatorList[serviceId].length);
        info.blueprintId = s.blueprintId;
        info.owner = s.owner;
        info.operatorCount = count;
        info.minOperators = s.requiredResults;
        info.maxOperators = count;
        info.status = 1;
    }

    function getServiceOperators(uint64 serviceId) external view returns (address[] memory) {
        return operatorList[serviceId];
    }

    // ---- jobs ----

    function _newCall(uint64 serviceId, uint8 jobIndex, bool isRFQ) private returns (uint64 callId) {
        Service storage s = services[serviceId];
        if (!s.active) revert ServiceNotFound(serviceId);
        if (!permitted[serviceId][msg.sender]) revert NotPermittedCaller(serviceId, msg.sender);
        if (jobIndex >= blueprintJobCount[s.blueprintId]) revert InvalidJobIndex(jobIndex);
        callId = callCount[serviceId]++;
        calls[serviceId][callId] = JobCall(jobIndex, msg.sender, uint64(block.timestamp), 0, false, isRFQ, msg.value);
    }

    function submitJob(uint64 serviceId, uint8 jobIndex, bytes calldata inputs) external payable returns (uint64 callId) {
        callId = _newCall(serviceId, jobIndex, false);
        emit JobSubmitted(serviceId, callId, jobIndex, msg.sender, inputs);
    }

    /// Test-only: the published interface's layout (jobIndex indexed: 4 topics, data = (address, bytes)).
    function submitJobIndexedLayout(uint64 serviceId, uint8 jobIndex, bytes calldata inputs)
        external
        payable
        returns (uint64 callId)
    {
        callId = _newCall(serviceId, jobIndex, false);
        bytes memory data = abi.encode(msg.sender, inputs);
        bytes32 t0 = JOB_SUBMITTED_TOPIC;
        uint256 sid = serviceId;
        uint256 cid = callId;
        uint256 idx = jobIndex;
        assembly {
            log4(add(data, 32), mload(data), t0, sid, cid, idx)
        }
    }

    /// Test-only: a job call made through an RFQ quote.
    function submitJobFromQuote(
        uint64 serviceId,
        uint8 jobIndex,
        bytes calldata inputs,
        address[] calldata quotedOperators,
        uint256 totalPrice
    ) external payable returns (uint64 callId) {
        callId = _newCall(serviceId, jobIndex, true);
        emit JobSubmittedFromQuote(serviceId, callId, jobIndex, msg.sender, quotedOperators, totalPrice, inputs);
    }

    function _submit(uint64 serviceId, uint64 callId, bytes calldata result) private {
        Service storage s = services[serviceId];
        if (!s.active) revert ServiceNotFound(serviceId);
        if (!operatorsOf[serviceId][msg.sender]) revert OperatorNotInService(serviceId, msg.sender);
        JobCall storage c = calls[serviceId][callId];
        if (c.caller == address(0)) revert JobCallNotFound(serviceId, callId);
        if (c.completed) revert JobAlreadyCompleted(serviceId, callId);
        if (answered[serviceId][callId][msg.sender]) revert ResultAlreadySubmitted(serviceId, callId, msg.sender);
        answered[serviceId][callId][msg.sender] = true;
        c.resultCount += 1;
        emit JobResultSubmitted(serviceId, callId, msg.sender, result);
        if (c.resultCount >= s.requiredResults) {
            c.completed = true;
            emit JobCompleted(serviceId, callId);
        }
    }

    function submitResult(uint64 serviceId, uint64 callId, bytes calldata result) external {
        _submit(serviceId, callId, result);
    }

    function submitResults(uint64 serviceId, uint64[] calldata callIds, bytes[] calldata results) external {
        if (callIds.length != results.length) revert LengthMismatch();
        for (uint256 i = 0; i < callIds.length; i++) {
            _submit(serviceId, callIds[i], results[i]);
        }
    }

    function getJobCall(uint64 serviceId, uint64 callId) external view returns (JobCall memory) {
        return calls[serviceId][callId];
    }

    // ---- QoS heartbeats: tnt-core OperatorStatusRegistry's submitHeartbeat, same EIP-712 signature ----
    // The dev chain's STATUS_REGISTRY_CONTRACT is this contract (verifyingContract = its address).

    event HeartbeatReceived(
        uint64 indexed serviceId, uint64 indexed blueprintId, address indexed operator, uint8 statusCode, uint256 timestamp
    );

    error HeartbeatStale(uint64 signed, uint64 now_);
    error HeartbeatFromFuture(uint64 signed, uint64 now_);
    error NotRegisteredOperator();
    error InvalidSignature();
    error ECDSAInvalidSignature();
    error ECDSAInvalidSignatureLength(uint256 length);

    bytes32 public constant HEARTBEAT_TYPEHASH = keccak256(
        "Heartbeat(address operator,uint64 serviceId,uint64 blueprintId,uint8 statusCode,bytes32 metricsHash,uint64 timestamp)"
    );
    uint64 public constant HEARTBEAT_MAX_AGE = 5 minutes;
    /// online: a heartbeat within the last three default intervals (the SDK beats every 300 s)
    uint256 private constant ONLINE_WINDOW = 15 minutes;

    mapping(uint64 => mapping(address => uint256)) private lastHeartbeat;
    mapping(uint64 => mapping(address => uint8)) private lastStatus;

    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("OperatorStatusRegistry"),
                keccak256("1"),
                block.chainid,
                address(this)
            )
        );
    }

    function submitHeartbeat(
        uint64 serviceId,
        uint64 blueprintId,
        uint8 statusCode,
        bytes calldata metrics,
        uint64 timestamp,
        bytes calldata signature
    ) external {
        if (!operatorsOf[serviceId][msg.sender] || services[serviceId].blueprintId != blueprintId) {
            revert NotRegisteredOperator();
        }
        if (timestamp > block.timestamp) revert HeartbeatFromFuture(timestamp, uint64(block.timestamp));
        if (block.timestamp - timestamp > HEARTBEAT_MAX_AGE) revert HeartbeatStale(timestamp, uint64(block.timestamp));
        bytes32 structHash = keccak256(
            abi.encode(HEARTBEAT_TYPEHASH, msg.sender, serviceId, blueprintId, statusCode, keccak256(metrics), timestamp)
        );
        bytes32 digest = keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR(), structHash));
        if (_recover(digest, signature) != msg.sender) revert InvalidSignature();
        lastHeartbeat[serviceId][msg.sender] = block.timestamp;
        lastStatus[serviceId][msg.sender] = statusCode;
        emit HeartbeatReceived(serviceId, blueprintId, msg.sender, statusCode, block.timestamp);
    }

    function _recover(bytes32 digest, bytes calldata signature) private pure returns (address signer) {
        if (signature.length != 65) revert ECDSAInvalidSignatureLength(signature.length);
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        // as OpenZeppelin's ECDSA: low s only, v 27 or 28
        if (uint256(s) > 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0 || (v != 27 && v != 28)) {
            revert ECDSAInvalidSignature();
        }
        signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert ECDSAInvalidSignature();
    }

    function getLastHeartbeat(uint64 serviceId, address operator) external view returns (uint256) {
        return lastHeartbeat[serviceId][operator];
    }

    function getOperatorStatus(uint64 serviceId, address operator) external view returns (uint8) {
        return lastStatus[serviceId][operator];
    }

    function isOnline(uint64 serviceId, address operator) external view returns (bool) {
        uint256 last = lastHeartbeat[serviceId][operator];
        return last != 0 && block.timestamp - last <= ONLINE_WINDOW;
    }
}
