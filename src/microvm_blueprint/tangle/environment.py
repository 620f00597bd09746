"""BlueprintEnvironment: the operator's chain settings, from env vars and ``run`` flags (DESIGN.md §3).

Built once at the entry point. A missing or malformed value raises :class:`ConfigError` whose one
line names the variable. Secrets never live here (the key is read from the keystore).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlparse

from eth_utils import is_address, is_checksum_address, to_checksum_address

from ..envparse import Env, parse_duration
from .errors import ConfigError

T = TypeVar("T")


class Secret(Generic[T]):
    """Wraps a secret so ``repr``/``str``/logging never show it. ``reveal()`` gives it back."""

    __slots__ = ("_value",)

    def __init__(self, value: T) -> None:
        self._value = value

    def reveal(self) -> T:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _url(name: str, raw: str, schemes: tuple[str, ...]) -> str:
    try:
        parsed = urlparse(raw.strip())
        port_ok = parsed.port is None or parsed.port > 0  # .port raises on a malformed port
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a {'/'.join(schemes)} URL") from None
    if parsed.scheme not in schemes or not parsed.hostname or not port_ok:
        raise ConfigError(f"{name}={raw!r} is not a {'/'.join(schemes)} URL")
    return raw.strip()


def _uint(name: str, raw: str, bits: int = 64) -> int:
    text = raw.strip()
    try:
        if not text.isascii():  # int() would read other scripts' digits
            raise ValueError(text)
        value = int(text, 0)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an unsigned integer") from None
    if not 0 <= value < 2**bits:
        raise ConfigError(f"{name}={raw!r} is out of range for uint{bits}")
    return value


def _address(name: str, raw: str) -> str:
    text = raw.strip()
    if not is_address(text) or not text.startswith("0x"):
        raise ConfigError(f"{name}={raw!r} is not an EVM address (0x + 40 hex digits)")
    digits = text[2:]
    if digits != digits.lower() and digits != digits.upper() and not is_checksum_address(text):
        raise ConfigError(f"{name}={raw!r} is not an EVM address: its mixed-case checksum is wrong (a typo?)")
    if int(text, 16) == 0:
        raise ConfigError(f"{name}={raw!r} is the zero address")
    return to_checksum_address(raw.strip())


def _path(name: str, raw: str) -> Path:
    """A filesystem path; ``file://`` URIs (as blueprint-sdk writes KEYSTORE_URI) are accepted."""
    text = raw.strip()
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise ConfigError(f"{name}={raw!r}: only filesystem paths and file:// URIs are supported")
    if not text or "\x00" in text:
        raise ConfigError(f"{name}={raw!r} is not a usable path")
    return Path(text)


#: ``load``'s keyword overrides (the ``run`` flags), by the attribute they set.
FLAG_NAMES = frozenset(
    {
        "http_rpc_url", "ws_rpc_url", "keystore_uri", "data_dir", "chain", "protocol", "test_mode", "dry_run",
        "blueprint_id", "service_id", "tangle_contract", "staking_contract", "status_registry_contract",
        "from_block", "max_getlogs_range", "poll_interval", "confirmations",
        "pretty", "verbose", "keystore_password", "bridge_socket_path", "bootnodes",
    }
)

#: blueprint-sdk's ``SupportedChains`` (``CHAIN`` / ``--chain``), as its manager writes them.
CHAINS = ("local_testnet", "local_mainnet", "testnet", "mainnet")
#: ``PROTOCOL`` / ``--protocol`` values meaning Tangle (``tangle-evm`` is blueprint-sdk's alias).
PROTOCOLS = {"tangle": "tangle", "tangle-evm": "tangle"}
#: Where registration inputs go when ``REGISTRATION_OUTPUT_PATH`` is not set (blueprint-sdk's default).
REGISTRATION_FILE = "registration_inputs.bin"


def log_level_for(verbose: int) -> str | None:
    """The log level ``-v`` repeated ``verbose`` times asks for, as blueprint-sdk's manager reads it
    (1 WARNING, 2 INFO, 3+ DEBUG); ``None`` without ``-v`` (then ``--log-level``/``LOG_LEVEL``)."""
    if verbose <= 0:
        return None
    return {1: "WARNING", 2: "INFO"}.get(verbose, "DEBUG")


@dataclass(frozen=True)
class BlueprintEnvironment:
    http_rpc_url: str
    data_dir: Path
    keystore_uri: Path
    blueprint_id: int
    service_id: int | None
    tangle_contract: str
    ws_rpc_url: str | None = None
    chain: str | None = None
    protocol: str = "tangle"
    test_mode: bool = False
    dry_run: bool = False
    staking_contract: str | None = None
    status_registry_contract: str | None = None
    from_block: int | None = None
    max_getlogs_range: int = 1000
    poll_interval: float = 1.0
    confirmations: int = 0
    #: how long the first result waiting for a transaction waits for company (consumer.LINGER)
    result_linger: float = 0.05
    #: QoS heartbeat period in seconds (HEARTBEAT_INTERVAL_SECS; 0 = off); sent with +-10 % jitter
    heartbeat_interval: float = 300.0
    #: human log lines (``--pretty``/``PRETTY``) and the ``-v`` count (:func:`log_level_for`)
    pretty: bool = False
    verbose: int = 0
    #: accepted for blueprint-sdk compatibility; this keystore is not encrypted, so it is not used
    keystore_password: Secret[str] | None = None
    #: the blueprint manager's gRPC socket (``BRIDGE_SOCKET_PATH``); ``None``: no manager
    bridge_socket_path: Path | None = None
    #: libp2p bootnodes (``BOOTNODES``): accepted, unused (this blueprint has no p2p network)
    bootnodes: tuple[str, ...] = ()
    #: ``REGISTRATION_MODE_ON`` / ``REGISTRATION_CAPTURE_ONLY``: write the registration inputs and exit
    registration_mode: bool = False
    registration_capture_only: bool = False
    registration_output_path: Path | None = None

    @property
    def registration_only(self) -> bool:
        """``run`` only writes its registration inputs and exits (the manager registers)."""
        return self.registration_mode or self.registration_capture_only

    @classmethod
    def load(
        cls, env: Mapping[str, str], *, require_service: bool = True, require_data_dir: bool = True, **flags: Any
    ) -> BlueprintEnvironment:
        """Build from ``env`` with ``flags`` (CLI values, ``None`` = not given) taking precedence.

        ``require_service=False`` is for commands other than ``run`` (SERVICE_ID may then be absent);
        ``require_data_dir=False`` for those that keep no state (``register``: DATA_DIR then defaults to ``.``).
        Raises :class:`ConfigError` with one line naming the offending variable.
        """
        unknown = set(flags) - FLAG_NAMES
        if unknown:
            raise TypeError(f"unknown BlueprintEnvironment setting(s): {', '.join(sorted(unknown))}")

        def get(name: str, flag: str | None = None) -> str | None:
            if flag is not None and flags.get(flag) is not None:
                return str(flags[flag])
            value = env.get(name)
            return value if value not in (None, "") else None

        http = _url("HTTP_RPC_URL", get("HTTP_RPC_URL", "http_rpc_url") or "http://127.0.0.1:9944", ("http", "https"))
        ws_raw = get("WS_RPC_URL", "ws_rpc_url")
        ws = _url("WS_RPC_URL", ws_raw, ("ws", "wss")) if ws_raw else None
        data_dir = get("DATA_DIR", "data_dir")
        if (not data_dir or not data_dir.strip()) and not require_data_dir:
            data_dir = "."
        if not data_dir or not data_dir.strip():
            raise ConfigError("DATA_DIR is required (env DATA_DIR or --data-dir)")
        protocol_raw = get("PROTOCOL", "protocol") or "tangle"
        protocol = PROTOCOLS.get(protocol_raw.strip().lower())
        if protocol is None:
            raise ConfigError(f"PROTOCOL={protocol_raw!r} is not supported (only 'tangle'), or its alias 'tangle-evm'")
        chain = get("CHAIN", "chain")
        if chain is not None:
            chain = chain.strip().lower()
            if chain not in CHAINS:
                raise ConfigError(f"CHAIN={chain!r} is not one of {', '.join(CHAINS)}")
        bridge = get("BRIDGE_SOCKET_PATH", "bridge_socket_path")
        password = get("KEYSTORE_PASSWORD", "keystore_password")
        boot_flag = flags.get("bootnodes")
        boot_raw = " ".join(boot_flag) if isinstance(boot_flag, list | tuple) else (get("BOOTNODES") or "")
        registration_out = get("REGISTRATION_OUTPUT_PATH")
        verbose = flags.get("verbose") or 0
        if not isinstance(verbose, int) or verbose < 0:
            raise ConfigError(f"-v count {verbose!r} is not a count")
        reader = Env(env)
        blueprint = get("BLUEPRINT_ID", "blueprint_id")
        if blueprint is None:
            raise ConfigError("BLUEPRINT_ID is required")
        service_raw = get("SERVICE_ID", "service_id")
        if service_raw is None and require_service:
            raise ConfigError("SERVICE_ID is required for run")
        tangle = get("TANGLE_CONTRACT", "tangle_contract")
        if tangle is None:
            raise ConfigError("TANGLE_CONTRACT is required")
        staking = get("STAKING_CONTRACT", "staking_contract")
        registry = get("STATUS_REGISTRY_CONTRACT", "status_registry_contract")
        from_block = get("FROM_BLOCK", "from_block")
        max_range = _uint("MAX_GETLOGS_RANGE", get("MAX_GETLOGS_RANGE", "max_getlogs_range") or "1000", 32)
        if max_range < 1:
            raise ConfigError("MAX_GETLOGS_RANGE must be at least 1")
        poll = parse_duration("POLL_INTERVAL", get("POLL_INTERVAL", "poll_interval") or "1.0", 0.01, 3600)
        linger = parse_duration("RESULT_LINGER", env.get("RESULT_LINGER") or "0.05", 0.0, 60)
        heartbeat = Env(env).duration("HEARTBEAT_INTERVAL_SECS", 300.0, 0.0, 86400.0)
        if 0 < heartbeat < 1:
            raise ConfigError(f"HEARTBEAT_INTERVAL_SECS={env.get('HEARTBEAT_INTERVAL_SECS')!r} must be 0 (off) or "
                              "at least 1 second")
        flag_bool = {k: flags.get(k) for k in ("test_mode", "dry_run", "pretty")}
        data_path = _path("DATA_DIR", data_dir)
        return cls(
            http_rpc_url=http,
            ws_rpc_url=ws,
            data_dir=data_path,
            keystore_uri=_path("KEYSTORE_URI", get("KEYSTORE_URI", "keystore_uri") or "./keystore"),
            blueprint_id=_uint("BLUEPRINT_ID", blueprint),
            service_id=_uint("SERVICE_ID", service_raw) if service_raw is not None else None,
            tangle_contract=_address("TANGLE_CONTRACT", tangle),
            chain=chain,
            protocol=protocol,
            test_mode=bool(flag_bool["test_mode"]) or reader.boolean("TEST_MODE", False),
            dry_run=bool(flag_bool["dry_run"]) or reader.boolean("DRY_RUN", False),
            staking_contract=_address("STAKING_CONTRACT", staking) if staking else None,
            status_registry_contract=_address("STATUS_REGISTRY_CONTRACT", registry) if registry else None,
            from_block=_uint("FROM_BLOCK", from_block) if from_block is not None else None,
            max_getlogs_range=max_range,
            poll_interval=poll,
            result_linger=linger,
            heartbeat_interval=heartbeat,
            confirmations=_uint("CONFIRMATIONS", get("CONFIRMATIONS", "confirmations") or "0", 16),
            pretty=bool(flag_bool["pretty"]) or reader.boolean("PRETTY", False),
            verbose=verbose,
            keystore_password=Secret(password) if password is not None else None,
            bridge_socket_path=_path("BRIDGE_SOCKET_PATH", bridge) if bridge else None,
            bootnodes=tuple(boot_raw.replace(",", " ").split()),
            registration_mode=reader.boolean("REGISTRATION_MODE_ON", False),
            registration_capture_only=reader.boolean("REGISTRATION_CAPTURE_ONLY", False),
            registration_output_path=(
                _path("REGISTRATION_OUTPUT_PATH", registration_out) if registration_out else data_path / REGISTRATION_FILE
            ),
        )
