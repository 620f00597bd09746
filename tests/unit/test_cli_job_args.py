"""`jobs submit`'s arguments: list arguments (job 8's `string[]` keys and `uint16[]` ports) encode as the
operator decodes them, and every bad argument is one clear line before anything is looked up or sent."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from microvm_blueprint import cli
from microvm_blueprint.blueprint.client import ClientError, encode_job_args
from microvm_blueprint.blueprint.jobs import JOBS, JOBS_BY_NAME
from microvm_blueprint.tangle.abi import decode_args

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFNGMa6e5RyWvtnugA0FwZ1M6BZasAb9bkLLhGTcR/y3 test@example"
JOB8 = JOBS_BY_NAME["create_vm_with_config"]


def _rsa_key(comment: str = "rsa@host") -> str:
    blob = len(b"ssh-rsa").to_bytes(4, "big") + b"ssh-rsa" + bytes(range(64))
    return f"ssh-rsa {base64.b64encode(blob).decode()} {comment}"


def test_job_8_round_trips_through_the_operators_decoder() -> None:
    raw = encode_job_args(JOB8, ["vm-1", "2", "512", "2048", "debian", [KEY, _rsa_key()], ["22", "8080", "65535"]])
    assert decode_args(JOB8.arg_types, raw) == ("vm-1", 2, 512, 2048, "debian", (KEY, _rsa_key()), (22, 8080, 65535))


def test_empty_lists_round_trip() -> None:
    raw = encode_job_args(JOB8, ["vm-1", "1", "256", "0", "", [], []])
    assert decode_args(JOB8.arg_types, raw) == ("vm-1", 1, 256, 0, "", (), ())


def test_every_job_of_the_table_can_be_encoded() -> None:
    samples = {"string": "x", "uint32": "7", "string[]": [KEY], "uint16[]": ["22"]}
    for job in JOBS:
        values = [samples[t] for t in job.arg_types]
        decoded = decode_args(job.arg_types, encode_job_args(job, values))
        assert len(decoded) == len(job.arg_types), job.name


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["vm-1", "1", "256", "0", "", [], ["22", "65536"]], "ports[1] 65536 does not fit in a uint16 (at most 65535)"),
        (["vm-1", "1", "256", "0", "", [], ["-1"]], "ports[0] must be an unsigned integer, not '-1'"),
        (["vm-1", "4294967296", "256", "0", "", [], []], "vcpus 4294967296 does not fit in a uint32 (at most 4294967295)"),
        # "²".isdigit() is true and int("²") raises: this was a traceback
        (["vm-1", "²", "256", "0", "", [], []], "vcpus must be an unsigned integer, not '²'"),
        (["vm-1", "1", "256", "0", "", KEY, []], "ssh_authorized_keys is a list (string[]), not one value"),
        (["vm-1", ["1"], "256", "0", "", [], []], "vcpus is one value (uint32), not a list"),
        (["vm-1"], "create_vm_with_config takes 7 argument(s)"),
    ],
)
def test_encoding_errors_name_the_argument(values: list[str | list[str]], message: str) -> None:
    with pytest.raises(ClientError) as err:
        encode_job_args(JOB8, values)
    assert str(err.value).startswith(message)


@pytest.fixture
def no_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No chain settings anywhere: an argument error must come before the settings are even looked for
    (else the error would be `missing --rpc-url...`), let alone a transaction."""
    monkeypatch.setenv("MICROVM_DEV_DIR", str(tmp_path / "no-devnet"))
    for name in ("HTTP_RPC_URL", "TANGLE_CONTRACT", "SERVICE_ID", "CUSTOMER_KEY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def submit(*extra: str) -> list[str]:
    return ["jobs", "submit", "create_vm_with_config", "vm-1", "1", "512", "0", "debian", *extra]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_the_settings_check_comes_after_the_arguments(no_chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = no_chain / "id.pub"
    good.write_text(f"# my keys\n\n{KEY}\n  {_rsa_key()}  \n")
    assert run(submit("--ssh-key", str(good), "--port", "22", "--port", "8080"), capsys).startswith(
        "error: missing --rpc-url/HTTP_RPC_URL"
    )


def test_a_missing_key_file(no_chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = no_chain / "nope.pub"
    assert run(submit("--ssh-key", str(missing)), capsys) == f"error: --ssh-key {missing}: no such file"


def test_a_directory_an_empty_file_and_a_binary_file(no_chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(submit("--ssh-key", str(no_chain)), capsys) == (
        f"error: --ssh-key {no_chain} is a directory, not a public key file"
    )
    empty = no_chain / "empty.pub"
    empty.write_text("\n# only a comment\n   \n")
    assert run(submit("--ssh-key", str(empty)), capsys) == f"error: --ssh-key {empty} holds no key"
    binary = no_chain / "bin.pub"
    binary.write_bytes(b"\xff\xfe\x00ssh")
    assert run(submit("--ssh-key", str(binary)), capsys) == f"error: --ssh-key {binary} is not a text file of public keys"


def test_a_private_key_is_never_sent(no_chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    private = no_chain / "id_ed25519"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n")
    assert run(submit("--ssh-key", str(private)), capsys) == (
        f"error: --ssh-key {private} is a private key: give the public key (its .pub file); nothing was sent"
    )


def test_a_bad_key_line_is_named_by_file_and_line(no_chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = no_chain / "keys.pub"
    keys.write_text(f"{KEY}\n\nssh-dss AAAAB3NzaC1kc3M= old@host\n")
    err = run(submit("--ssh-key", str(keys)), capsys)
    assert err.startswith(f"error: --ssh-key {keys} line 3 has an unknown key type 'ssh-dss'"), err


def test_too_many_keys_across_files(no_chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    many = no_chain / "many.pub"
    many.write_text("\n".join([KEY] * 9) + "\n")
    assert run(submit("--ssh-key", str(many), "--ssh-key", str(many)), capsys) == (
        "error: 18 SSH keys given, more than the maximum of 16"
    )


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        (["0"], "--port '0' is not a port number (1-65535)"),
        (["65536"], "--port '65536' is not a port number (1-65535)"),
        (["ssh"], "--port 'ssh' is not a port number (1-65535)"),
        (["-22"], "--port '-22' is not a port number (1-65535)"),
        (["22", "80", "022"], "--port 22 is given twice"),
        ([str(p) for p in range(1000, 1017)], "17 ports given, more than the maximum of 16"),
    ],
)
def test_bad_ports(no_chain: Path, capsys: pytest.CaptureFixture[str], ports: list[str], message: str) -> None:
    assert run(submit(*[f"--port={p}" for p in ports]), capsys) == f"error: {message}"


def test_list_options_belong_to_job_8_and_positional_counts(no_chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["jobs", "submit", "create_vm", "vm-1", "--port", "22"], capsys) == (
        "error: --port is for create_vm_with_config, not create_vm"
    )
    err = run(["jobs", "submit", "create_vm_with_config", "vm-1", "1", "512"], capsys)
    assert err.startswith(
        "error: create_vm_with_config takes 5 argument(s) (VM_ID VCPUS MEM_MIB DISK_MIB IMAGE "
        "[--ssh-key ...] [--port ...]): create_vm_with_config(string vm_id"
    ), err


def test_key_file_paths_expand_the_home_directory(no_chain: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(no_chain))
    (no_chain / "k.pub").write_text(KEY + "\n")
    assert cli.read_ssh_keys("~/k.pub") == [KEY]
