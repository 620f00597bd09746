"""``run`` takes blueprint-sdk's flags and env vars (DESIGN.md §11), as its manager passes them, into the
one BlueprintEnvironment; unknown flags stay an error. ``register`` validates its RPC address."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm_blueprint.cli import build_parser
from microvm_blueprint.tangle.environment import BlueprintEnvironment, Secret, log_level_for
from microvm_blueprint.tangle.errors import ConfigError

TANGLE = "0x0165878A594ca255338adfa4d48449f69242Eb8F"
BASE = {"DATA_DIR": "/var/lib/op", "BLUEPRINT_ID": "0", "SERVICE_ID": "0", "TANGLE_CONTRACT": TANGLE}


def _load(argv: list[str], env: dict[str, str] | None = None) -> BlueprintEnvironment:
    a = build_parser().parse_args(["run", *argv])
    return BlueprintEnvironment.load(
        {**BASE, **(env or {})}, http_rpc_url=a.http_rpc_url, ws_rpc_url=a.ws_rpc_url, keystore_uri=a.keystore_uri,
        data_dir=a.data_dir, chain=a.chain, protocol=a.protocol, test_mode=a.test_mode, dry_run=a.dry_run,
        from_block=a.from_block, pretty=a.pretty, verbose=a.verbose, keystore_password=a.keystore_password,
        bridge_socket_path=a.bridge_socket_path, bootnodes=a.bootnodes,
    )


def test_the_managers_argv_parses() -> None:
    env = _load(["--test-mode", "--pretty", "-v", "-v", "--dry-run"])
    assert (env.test_mode, env.pretty, env.verbose, env.dry_run) == (True, True, 2, True)
    assert _load(["-vvv"]).verbose == 3 and _load(["-t"]).test_mode
    env = _load(["--keystore-password", "hunter2", "--bridge-socket-path", "/run/bp.sock", "--protocol", "tangle-evm",
                 "--chain", "local_testnet", "-k", "/ks", "-d", "/data", "--bootnodes", "/ip4/1.2.3.4/tcp/1"])
    assert env.keystore_password == Secret("hunter2") and "hunter2" not in repr(env)
    assert (env.bridge_socket_path, env.protocol, env.chain) == (Path("/run/bp.sock"), "tangle", "local_testnet")
    assert (env.keystore_uri, env.data_dir, env.bootnodes) == (Path("/ks"), Path("/data"), ("/ip4/1.2.3.4/tcp/1",))


def test_the_managers_env_is_read() -> None:
    env = _load([], {
        "PROTOCOL": "tangle-evm", "CHAIN": "mainnet", "BOOTNODES": " /ip4/1.1.1.1/tcp/9 /ip4/2.2.2.2/tcp/9",
        "BRIDGE_SOCKET_PATH": "/run/manager/bridge.sock", "KEYSTORE_PASSWORD": "pw", "PRETTY": "true",
        "TEST_MODE": "false",
    })
    assert (env.protocol, env.chain, env.pretty, env.test_mode) == ("tangle", "mainnet", True, False)
    assert env.bootnodes == ("/ip4/1.1.1.1/tcp/9", "/ip4/2.2.2.2/tcp/9")
    assert env.bridge_socket_path == Path("/run/manager/bridge.sock") and env.keystore_password == Secret("pw")
    # the manager sends BOOTNODES empty when it has none
    assert _load([], {"BOOTNODES": ""}).bootnodes == () and _load([]).bridge_socket_path is None
    # a flag wins over its env var
    assert _load(["--bridge-socket-path", "/flag.sock"], {"BRIDGE_SOCKET_PATH": "/env.sock"}).bridge_socket_path \
        == Path("/flag.sock")


@pytest.mark.parametrize("argv, env, message", [
    (["--chain", "devnet"], {}, "CHAIN='devnet' is not one of local_testnet, local_mainnet, testnet, mainnet"),
    ([], {"CHAIN": "kusama"}, "CHAIN='kusama' is not one of"),
    (["--protocol", "eigenlayer"], {}, "PROTOCOL='eigenlayer' is not supported (only 'tangle'), or its alias 'tangle-evm'"),
    ([], {"PRETTY": "very"}, "PRETTY='very' is not a boolean"),
    ([], {"REGISTRATION_MODE_ON": "yes please"}, "REGISTRATION_MODE_ON='yes please' is not a boolean"),
])
def test_bad_values_name_the_variable(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(argv, env)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_registration_mode_and_its_default_path() -> None:
    env = _load([], {"REGISTRATION_MODE_ON": "true"})
    assert env.registration_mode and env.registration_only
    assert env.registration_output_path == Path("/var/lib/op/registration_inputs.bin")
    env = _load([], {"REGISTRATION_CAPTURE_ONLY": "true", "REGISTRATION_OUTPUT_PATH": "/tmp/x/in.bin"})
    assert env.registration_only and env.registration_output_path == Path("/tmp/x/in.bin")
    assert not _load([]).registration_only


def test_verbosity_as_the_manager_counts_it() -> None:
    assert [log_level_for(n) for n in range(5)] == [None, "WARNING", "INFO", "DEBUG", "DEBUG"]


@pytest.mark.parametrize("argv", [["run", "--nope"], ["run", "--pretty", "--log-format", "x"], ["run", "--chain"]])
def test_unknown_or_incomplete_flags_stay_an_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err or "expected one argument" in err


def test_register_wants_a_url(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["register", "--rpc-address", "https://op.example:8443"])
    assert args.rpc_address == "https://op.example:8443"
    for bad in (["register"], ["register", "--rpc-address", "op.example"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)
    assert "is not an http(s)/ws(s) URL" in capsys.readouterr().err
