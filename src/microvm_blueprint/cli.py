"""``microvm-blueprint``: a thin CLI. Each command builds its settings here and passes them down.

Any :class:`~microvm_blueprint.errors.MicrovmBlueprintError` ends the command with one line on
stderr and exit code 1; no traceback for expected failures.

Each command imports what it needs when it runs (``--help`` and the customer's ``jobs submit``
start in a fraction of the operator's import time; ``python -m bench cli_startup`` measures it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from .blueprint import dev
from .errors import MicrovmBlueprintError

if TYPE_CHECKING:
    from .blueprint.jobs import JobDef

DEFAULT_API_URL = "http://127.0.0.1:3000"


class CliError(MicrovmBlueprintError):
    """A command-line usage or client-side failure."""


def _api_url(args: argparse.Namespace) -> str:
    return str(args.api_url or os.environ.get("MICROVM_API_URL") or dev.recorded().get("api_url") or DEFAULT_API_URL)


def _http_get(url: str) -> Any:
    import httpx

    try:
        r = httpx.get(url, timeout=10)
    except httpx.HTTPError as exc:
        raise CliError(f"query API at {url} is unreachable: {exc}") from exc
    try:
        body = r.json()
    except ValueError:
        body = r.text
    if r.status_code != 200:
        message = body.get("error") if isinstance(body, dict) else body
        raise CliError(f"{r.status_code}: {message}")
    return body


# ---- vms -------------------------------------------------------------------------------------


def cmd_vms(args: argparse.Namespace) -> int:
    base = _api_url(args)
    if args.vms_cmd == "list":
        vms = _http_get(f"{base}/vms")
        if args.json:
            print(json.dumps(vms, indent=2))
        else:
            print(f"{'VM':32} {'STATUS':10} {'VCPU':>4} {'MEM':>6}  SNAPSHOTS")
            for vm in vms:
                spec = vm.get("spec", {})
                print(
                    f"{vm['vm_id'][:32]:32} {vm['status']:10} {spec.get('vcpus', ''):>4} "
                    f"{spec.get('mem_mib', ''):>6}  {', '.join(vm['snapshots'])}"
                )
        return 0
    if args.vms_cmd == "get":
        print(json.dumps(_http_get(f"{base}/vms/{quote(args.vm_id, safe='')}"), indent=2))
        return 0
    if args.vms_cmd == "console":
        from .blueprint.client import read_console
        from .tangle.environment import Secret

        key_text = _customer_key_text(args.key_file)
        text = read_console(base, args.vm_id, args.tail, Secret(key_text) if key_text else None)
        sys.stdout.write(text if args.raw else escape_control(text))
        return 0
    if args.vms_cmd == "watch":
        return _vms_watch(base, args)
    if args.vms_cmd == "ssh":
        view = _http_get(f"{base}/vms/{quote(args.vm_id, safe='')}")
        argv = ssh_argv(view, base, identity=args.identity, command=args.command)
        if shutil.which(argv[0]) is None:
            raise CliError(f"{argv[0]} not found on PATH: install openssh-client")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(argv[0], argv)  # replaces this process: ssh owns the terminal, its exit code is ours
    raise CliError(f"unknown vms command {args.vms_cmd!r}")


#: bidirectional-text controls: shown escaped too (they reorder what the terminal shows)
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def escape_control(text: str) -> str:
    """The guest's console as plain text for a terminal: CR LF becomes LF; every other control character
    (C0 but LF and TAB, DEL, C1, bidi controls), which would let the guest move the cursor, retitle the
    window or rewrite what was shown, is printed as an escape (``\\x1b``, ``\\u202e``)."""
    import unicodedata

    out = []
    for ch in text.replace("\r\n", "\n"):
        if ch in "\n\t" or (unicodedata.category(ch) != "Cc" and ch not in _BIDI):
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


def _customer_key_text(key_file: str | None) -> str:
    """The customer's key as ``jobs submit`` finds it: ``--key-file``, else CUSTOMER_KEY, else dev.json."""
    if key_file:
        return Path(key_file).read_text().strip()
    return os.environ.get("CUSTOMER_KEY") or str(dev.recorded().get("customer_key") or "")


SSH_PORT = 22


def ssh_argv(view: Any, api_url: str, *, identity: str | None, command: Sequence[str]) -> list[str]:
    """The ``ssh`` command line for ``vms ssh``: root at the host port that publishes the VM's guest port 22.

    ``view`` is ``GET /vms/{id}``. A VM published on an unspecified address (``0.0.0.0``, ``::``) is
    reached at the query API's host. ``HostKeyAlias`` names the VM (its id and creation time), not the
    host port: ports are reused once a VM is destroyed, and every VM has host keys of its own, so keys
    remembered per port would soon be "changed" keys. ``--`` ends ssh's options, so a command like
    ``ls -l`` reaches the guest whole."""
    if not isinstance(view, dict) or not isinstance(view.get("vm_id"), str):
        raise CliError("the query API answered something that is not a VM")
    vm_id = view["vm_id"]
    status = view.get("status")
    if status != "running":
        hint = f": start it first (jobs submit start_vm {vm_id})" if status in ("created", "stopped") else ""
        raise CliError(f"vm {vm_id!r} is {status}, not running{hint}")
    network = view.get("network") or {}
    ports = [p for p in network.get("ports") or [] if isinstance(p, dict) and p.get("guest_port") == SSH_PORT]
    if not ports:
        published = ", ".join(str(p.get("guest_port")) for p in network.get("ports") or []) or "none"
        raise CliError(
            f"vm {vm_id!r} has no published guest port {SSH_PORT} (network {network.get('mode', 'none')}, "
            f"published ports: {published}); create it with create_vm_with_config ... --port {SSH_PORT}"
        )
    host, host_port = str(ports[0]["host"]), int(ports[0]["host_port"])
    if host in ("", "0.0.0.0", "::"):
        host = urlsplit(api_url).hostname or "127.0.0.1"
    alias = hashlib.sha256(f"{vm_id}\0{view.get('created_at')}".encode()).hexdigest()[:24]
    argv = ["ssh", "-p", str(host_port), "-o", "StrictHostKeyChecking=accept-new", "-o", f"HostKeyAlias=microvm-{alias}"]
    if identity is not None:
        if not Path(identity).expanduser().is_file():
            raise CliError(f"--identity {identity}: no such file")
        argv += ["-i", str(Path(identity).expanduser())]
    return [*argv, "--", f"root@{host}", *command]


def _vms_watch(base: str, args: argparse.Namespace) -> int:
    """``vms watch VM``: its lifecycle events as they happen (``GET /events``), or with ``--until S``
    wait for that status (``GET /vms/{id}/wait``); nothing polls."""
    import time

    from .blueprint.client import iter_events, wait_vm

    if args.until:
        vm = wait_vm(base, args.vm_id, args.until, args.timeout)
        print(f"{vm['vm_id']} is {vm['status']}")
        return 0
    _http_get(f"{base}/vms/{quote(args.vm_id, safe='')}")  # an unknown VM is an error, not a silent wait
    for ev in iter_events(base, args.vm_id, last=args.last):
        at = time.strftime("%H:%M:%S", time.localtime(ev["at"]))
        by = f" call {ev['call_id']}" if ev["call_id"] is not None else ""
        print(f"{at} {ev['vm_id']} {ev['action']} -> {ev['status']}{by}", flush=True)
    return 0


# ---- image -----------------------------------------------------------------------------------


def cmd_image(args: argparse.Namespace) -> int:
    from .runtime import images

    cache = Path(args.image_dir) if args.image_dir else images.default_cache_dir()
    if args.image_cmd == "build":
        name = args.image_name or args.name
        manifest = images.build_image(name, cache_dir=cache, progress=lambda line: print(f"  {line}", flush=True))
        print(f"image {name!r} ready: {manifest.root}")
        return 0
    if args.image_cmd == "import":
        manifest = images.import_image(
            args.image_name, kernel=Path(args.kernel), rootfs=Path(args.rootfs),
            initrd=Path(args.initrd) if args.initrd else None, cmdline=args.cmdline,
            ready_line=args.ready_line, cache_dir=cache, progress=lambda line: print(f"  {line}", flush=True))
        print(f"image {manifest.name!r} imported: {manifest.root}")
        return 0
    if args.image_cmd == "list":
        for m in images.list_images(cache):
            print(f"{m.name:16} {m.root}")
        return 0
    raise CliError(f"unknown image command {args.image_cmd!r}")


# ---- jobs list -------------------------------------------------------------------------------


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from .blueprint.jobs import JOBS

    for job in JOBS:
        print(f"{job.index}  {job.signature:80}  {job.summary}")
    return 0


# ---- keys ------------------------------------------------------------------------------------


def cmd_keys(args: argparse.Namespace) -> int:
    from .tangle import keystore

    root = Path(args.keystore_uri)
    if args.keys_cmd == "create":
        key = keystore.generate_key(root)
        print(f"created operator key {key.address} in {root}/Ecdsa")
    elif args.keys_cmd == "import":
        text = Path(args.secret_file).read_text() if args.secret_file else sys.stdin.readline()
        key = keystore.import_key(root, text)
        print(f"imported key {key.address} into {root}/Ecdsa")
    else:
        key = keystore.load_operator_key(root)
        print(key.address)
    return 0


# ---- run -------------------------------------------------------------------------------------


def _install_signals(stop: Callable[[], None]) -> None:
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


async def cmd_run(args: argparse.Namespace) -> int:
    from . import logs
    from .blueprint.operator import Operator
    from .blueprint.settings import OperatorSettings, parse_addr
    from .tangle.environment import BlueprintEnvironment, log_level_for

    env = BlueprintEnvironment.load(
        os.environ,
        http_rpc_url=args.http_rpc_url, ws_rpc_url=args.ws_rpc_url, keystore_uri=args.keystore_uri,
        data_dir=args.data_dir, chain=args.chain, protocol=args.protocol, test_mode=args.test_mode,
        dry_run=args.dry_run, from_block=args.from_block, pretty=args.pretty, verbose=args.verbose,
        keystore_password=args.keystore_password, bridge_socket_path=args.bridge_socket_path,
        bootnodes=args.bootnodes,
    )
    if env.pretty or env.verbose:  # blueprint-sdk's logging flags, as its manager passes them
        logs.configure(log_level_for(env.verbose) or args.log_level, json_lines=False if env.pretty else args.log_json)
    if env.keystore_password is not None:
        logging.getLogger(__name__).info("--keystore-password/KEYSTORE_PASSWORD given: not used (the keystore "
                                         "holds plain keys, blueprint-sdk's filesystem layout)")
    if env.registration_only:
        from .tangle.registration import write_registration_inputs

        path = write_registration_inputs(env.registration_output_path or env.data_dir / "registration_inputs.bin")
        print(f"registration inputs (none: 0 bytes) written to {path}", flush=True)
        return 0
    overrides: dict[str, object] = {}
    if args.api_addr:
        overrides["api_host"], overrides["api_port"] = parse_addr(args.api_addr, "--api-addr")
    settings = OperatorSettings.from_env(os.environ, env.data_dir, **overrides)
    operator = Operator.assemble(env, settings)
    _install_signals(operator.stop)
    await operator.run()
    return 0


# ---- register --------------------------------------------------------------------------------


async def cmd_register(args: argparse.Namespace) -> int:
    from .tangle.environment import BlueprintEnvironment
    from .tangle.keystore import load_operator_key
    from .tangle.registration import register_operator
    from .tangle.rpc import JsonRpc

    env = BlueprintEnvironment.load(
        os.environ, require_service=False, require_data_dir=False, http_rpc_url=args.http_rpc_url,
        keystore_uri=args.keystore_uri, blueprint_id=args.blueprint_id, tangle_contract=args.tangle_contract,
    )
    key = load_operator_key(env.keystore_uri)
    rpc = JsonRpc(env.http_rpc_url, timeout=30)
    try:
        done = await register_operator(rpc, env.tangle_contract, env.blueprint_id, key, args.rpc_address)
    finally:
        await rpc.aclose()
    if done.already:
        print(f"operator {done.operator} is already registered for blueprint {done.blueprint_id}")
    else:
        print(f"registered operator {done.operator} for blueprint {done.blueprint_id} (tx {done.tx_hash})")
    return 0


def _rpc_address(text: str) -> str:
    from urllib.parse import urlparse

    try:
        parsed = urlparse(text)
        ok = parsed.scheme in ("http", "https", "ws", "wss") and bool(parsed.hostname) and (parsed.port or 1) > 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s)/ws(s) URL")
    return text


# ---- blueprint deploy ------------------------------------------------------------------------


async def cmd_blueprint_deploy(args: argparse.Namespace) -> int:
    """``blueprint deploy``: this blueprint's definition (blueprint/definition.py, from the job table)
    sent with ``createBlueprint``, signed by the keystore's key (the blueprint's owner)."""
    from eth_utils import is_address

    from .blueprint.definition import blueprint_definition, native_source
    from .tangle.definition import Arch, create_blueprint, create_blueprint_data
    from .tangle.keystore import load_operator_key
    from .tangle.rpc import JsonRpc

    source = native_source(Path(args.artifact), args.artifact_uri, entrypoint=args.entrypoint,
                           arch=Arch[args.arch.upper()] if args.arch else None)
    definition = blueprint_definition([source], metadata_uri=args.metadata_uri, schemas_on_chain=args.schemas_on_chain)
    if args.dry_run:
        jobs = ", ".join(f"{i} {j.name}" for i, j in enumerate(definition.jobs))
        print(f"definition: {len(definition.jobs)} jobs ({jobs}); metadata hash 0x{definition.metadata_hash.hex()}; "
              f"artifact sha256 {source.binaries[0].sha256.hex()}; createBlueprint calldata "
              f"{len(create_blueprint_data(definition))} bytes (dry run: nothing sent)")
        return 0
    contract = args.tangle_contract or os.environ.get("TANGLE_CONTRACT") or ""
    if not is_address(contract):
        raise CliError(f"--tangle-contract/TANGLE_CONTRACT {contract!r} is not an address" if contract
                       else "--tangle-contract/TANGLE_CONTRACT is required")
    key = load_operator_key(Path(args.keystore_uri or os.environ.get("KEYSTORE_URI") or "./keystore"))
    rpc = JsonRpc(args.http_rpc_url or os.environ.get("HTTP_RPC_URL") or "http://127.0.0.1:9944", timeout=30)
    try:
        created = await create_blueprint(rpc, contract, key, definition)
    finally:
        await rpc.aclose()
    print(f"created blueprint {created.blueprint_id} owned by {key.address} (tx {created.tx_hash}): "
          f"BLUEPRINT_ID={created.blueprint_id}")
    return 0


# ---- jobs submit -----------------------------------------------------------------------------

#: list arguments of a job and the repeatable option that fills each one
LIST_OPTIONS = {"ssh_authorized_keys": "--ssh-key", "ports": "--port"}
_DIGITS = re.compile(r"[0-9]+")


def read_ssh_keys(path: str) -> list[str]:
    """The public keys in ``path``: one per non-empty line (``#`` lines are comments), each checked as
    job 8 will check it. A private key is refused here: the arguments of a job are public, on-chain."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"--ssh-key {path}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"--ssh-key {path} is a directory, not a public key file") from None
    except UnicodeDecodeError:
        raise CliError(f"--ssh-key {path} is not a text file of public keys") from None
    except OSError as exc:
        raise CliError(f"--ssh-key {path}: cannot read it: {exc.strerror or exc}") from None
    if "PRIVATE KEY" in text:
        raise CliError(f"--ssh-key {path} is a private key: give the public key (its .pub file); nothing was sent")
    from .runtime.access import validate_ssh_key

    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(validate_ssh_key(line, f"--ssh-key {path} line {number}"))
    if not keys:
        raise CliError(f"--ssh-key {path} holds no key")
    return keys


def parse_port(text: str) -> str:
    """One ``--port``: a guest port number 1-65535 (kept as text for :func:`encode_job_args`)."""
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise CliError(f"--port {text!r} is not a port number (1-65535)")
    return str(int(text))


def job_arguments(job: JobDef, positional: Sequence[str], ssh_key_files: Sequence[str],
                  ports: Sequence[str]) -> list[str | list[str]]:
    """The job's arguments from the command line: the positional ones in order, each list argument
    from its repeatable option (:data:`LIST_OPTIONS`). Every check here runs before anything is sent."""
    given = {"ssh_authorized_keys": (ssh_key_files, "--ssh-key"), "ports": (ports, "--port")}
    for name, (values, option) in given.items():
        if values and name not in job.arg_names:
            raise CliError(f"{option} is for create_vm_with_config, not {job.name}")
    scalars = [n for n, t in zip(job.arg_names, job.arg_types, strict=True) if not t.endswith("[]")]
    if len(positional) != len(scalars):
        options = " ".join(f"[{LIST_OPTIONS.get(n, n)} ...]" for n in job.arg_names if n not in scalars)
        raise CliError(f"{job.name} takes {len(scalars)} argument(s) ({' '.join(scalars).upper()}{' ' + options if options else ''}): "
                       f"{job.signature}")
    keys = [key for path in ssh_key_files for key in read_ssh_keys(path)]
    numbers = [parse_port(p) for p in ports]
    repeated = sorted({p for p in numbers if numbers.count(p) > 1}, key=int)
    if repeated:
        raise CliError(f"--port {repeated[0]} is given twice")
    from .runtime.access import MAX_KEYS, MAX_PORTS

    if len(keys) > MAX_KEYS:
        raise CliError(f"{len(keys)} SSH keys given, more than the maximum of {MAX_KEYS}")
    if len(numbers) > MAX_PORTS:
        raise CliError(f"{len(numbers)} ports given, more than the maximum of {MAX_PORTS}")
    lists: dict[str, list[str]] = {"ssh_authorized_keys": keys, "ports": numbers}
    out: list[str | list[str]] = []
    rest = iter(positional)
    for name, typ in zip(job.arg_names, job.arg_types, strict=True):
        out.append(lists.get(name, []) if typ.endswith("[]") else next(rest))
    return out



async def cmd_jobs_submit(args: argparse.Namespace) -> int:
    from .blueprint.client import TangleCustomer, encode_job_args, resolve_job
    from .tangle.environment import Secret

    job = resolve_job(args.job)  # every argument is checked before any setting is looked for or sent
    inputs = encode_job_args(job, job_arguments(job, args.args, args.ssh_key, args.port))
    recorded = dev.recorded()
    rpc_url = args.rpc_url or os.environ.get("HTTP_RPC_URL") or recorded.get("rpc_url")
    contract = args.contract or os.environ.get("TANGLE_CONTRACT") or recorded.get("contract")
    service = args.service_id if args.service_id is not None else os.environ.get("SERVICE_ID", recorded.get("service_id"))
    if args.key_file:
        key_text = Path(args.key_file).read_text().strip()
    else:
        key_text = os.environ.get("CUSTOMER_KEY") or recorded.get("customer_key") or ""
    missing = [n for n, v in (("--rpc-url/HTTP_RPC_URL", rpc_url), ("--contract/TANGLE_CONTRACT", contract),
                              ("--service-id/SERVICE_ID", service), ("--key-file/CUSTOMER_KEY", key_text)) if v in (None, "")]
    if missing:
        raise CliError(f"missing {', '.join(missing)} (or run `make dev` first, which records them)")
    customer = TangleCustomer(str(rpc_url), str(contract), int(str(service)), Secret(key_text))
    try:
        sub = await customer.submit(job, inputs)
        print(f"submitted {job.name} as call {sub.call_id} (tx {sub.tx_hash})", flush=True)
        if args.no_wait:
            return 0
        tty = sys.stderr.isatty()

        def progress(line: str) -> None:
            if tty:
                sys.stderr.write("\r" + line[:100].ljust(100))
                sys.stderr.flush()

        outcome = await customer.wait_result(sub, timeout=args.timeout, api_url=_api_url(args), progress=progress)
        if tty:
            sys.stderr.write("\r" + " " * 100 + "\r")
        if outcome.result is not None:
            print(f"result: {str(outcome.result).lower()} (tx {outcome.result_tx})")
            return 0
        status = outcome.job_status
        if status and status.get("status") == "failed":
            raise CliError(f"call {sub.call_id} failed: {status.get('error')}")
        if status:
            raise CliError(f"no result for call {sub.call_id} after {args.timeout:.0f}s; operator says: {status.get('status')}")
        raise CliError(f"no result for call {sub.call_id} after {args.timeout:.0f}s and the query API has no record of it")
    finally:
        await customer.aclose()


# ---- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="microvm-blueprint", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    p.add_argument("--log-json", action="store_true", default=None, help="JSON log lines even on a TTY")
    sub = p.add_subparsers(dest="cmd", required=True)

    # blueprint-sdk's `run` flags (each also read from the env var named in its help), so its manager can
    # launch this binary as it launches a Rust blueprint (DESIGN.md §11); unknown flags stay an error
    run = sub.add_parser("run", help="run the operator (producer, jobs, consumer, query API)")
    run.add_argument("--http-rpc-url", default=None, help="HTTP_RPC_URL (default http://127.0.0.1:9944)")
    run.add_argument("--ws-rpc-url", default=None, help="WS_RPC_URL")
    run.add_argument("-k", "--keystore-uri", default=None, help="KEYSTORE_URI (default ./keystore)")
    run.add_argument("-d", "--data-dir", default=None, help="DATA_DIR (required)")
    run.add_argument("--chain", default=None, help="CHAIN: local_testnet, local_mainnet, testnet or mainnet")
    run.add_argument("--protocol", default=None, help="PROTOCOL: tangle (alias tangle-evm)")
    run.add_argument("-t", "--test-mode", action="store_true", default=None, help="TEST_MODE: no manager bridge")
    run.add_argument("--dry-run", action="store_true", default=None, help="DRY_RUN: run jobs, send no transaction")
    run.add_argument("--pretty", action="store_true", default=None, help="PRETTY: human log lines, not JSON")
    run.add_argument("-v", "--verbose", action="count", default=0,
                     help="log level as blueprint-sdk counts it: -v WARNING, -vv INFO, -vvv DEBUG")
    run.add_argument("--keystore-password", default=None, help="KEYSTORE_PASSWORD: accepted, not used")
    run.add_argument("--bridge-socket-path", default=None, help="BRIDGE_SOCKET_PATH: the manager's gRPC socket")
    run.add_argument("--bootnodes", action="append", default=None, help="BOOTNODES: accepted, not used (no p2p)")
    run.add_argument("--from-block", type=int, default=None)
    run.add_argument("--api-addr", default=None, help="query API HOST:PORT (MICROVM_API_ADDR, default 127.0.0.1:3000)")

    reg = sub.add_parser("register", help="register the operator key for BLUEPRINT_ID (registerOperator)")
    reg.add_argument("--rpc-address", required=True, type=_rpc_address,
                     help="the operator's RPC address published on-chain (http(s)/ws(s) URL)")
    reg.add_argument("--http-rpc-url", default=None, help="HTTP_RPC_URL")
    reg.add_argument("-k", "--keystore-uri", default=None, help="KEYSTORE_URI (default ./keystore)")
    reg.add_argument("--blueprint-id", type=int, default=None, help="BLUEPRINT_ID")
    reg.add_argument("--tangle-contract", default=None, help="TANGLE_CONTRACT")

    bp = sub.add_parser("blueprint", help="this blueprint's definition on Tangle")
    bpd = bp.add_subparsers(dest="blueprint_cmd", required=True).add_parser(
        "deploy", help="create this blueprint on Tangle (createBlueprint) from the job table")
    bpd.add_argument("--artifact", required=True, metavar="FILE", help="the release artifact (its sha256 goes on-chain)")
    bpd.add_argument("--artifact-uri", required=True, metavar="URI", help="where the manager fetches it: http(s):// or ipfs://")
    bpd.add_argument("--entrypoint", default="microvm-blueprint", help="what the manager runs from the artifact")
    bpd.add_argument("--arch", choices=["amd64", "arm64"], default=None, help="the artifact's architecture (default: this host's)")
    bpd.add_argument("--metadata-uri", default=None, help="where the metadata document is (default: a data: URI of it)")
    bpd.add_argument("--schemas-on-chain", action="store_true",
                     help="store the TLV job schemas on-chain too (the contract then wants compact, not ABI, payloads)")
    bpd.add_argument("--http-rpc-url", default=None, help="HTTP_RPC_URL")
    bpd.add_argument("-k", "--keystore-uri", default=None, help="KEYSTORE_URI: its key signs and owns the blueprint")
    bpd.add_argument("--tangle-contract", default=None, help="TANGLE_CONTRACT")
    bpd.add_argument("--dry-run", action="store_true", help="print the definition's summary, send nothing")

    devp = sub.add_parser("dev", help="local chain + dev contract + operator + query API, until Ctrl-C")
    devp.add_argument("--data-dir", default=str(dev.default_dir()))
    devp.add_argument("--provider", choices=dev.PROVIDERS, default="auto")
    devp.add_argument("--rpc-port", type=int, default=8545)
    devp.add_argument("--api-addr", default="127.0.0.1:3000")
    devp.add_argument("--block-time", type=float, default=None, help="anvil block time (default: mine on demand)")

    jobs = sub.add_parser("jobs", help="customer client: submit jobs, list the job table")
    jsub = jobs.add_subparsers(dest="jobs_cmd", required=True)
    jsub.add_parser("list", help="the lifecycle jobs and their arguments")
    submit = jsub.add_parser("submit", help="submit a job as a customer and wait for its result")
    submit.add_argument("job", help="job name (create_vm ...) or index")
    submit.add_argument("args", nargs="*")
    submit.add_argument("--rpc-url", default=None, help="HTTP_RPC_URL")
    submit.add_argument("--contract", default=None, help="TANGLE_CONTRACT")
    submit.add_argument("--service-id", type=int, default=None, help="SERVICE_ID")
    submit.add_argument("--key-file", default=None, help="file holding the customer's hex private key")
    submit.add_argument("--api-url", default=None, help=f"query API (default {DEFAULT_API_URL})")
    submit.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the result")
    submit.add_argument("--no-wait", action="store_true")
    submit.add_argument("--ssh-key", action="append", default=[], metavar="FILE",
                        help="create_vm_with_config: public key file(s) for root, one key a line (repeatable)")
    submit.add_argument("--port", action="append", default=[], metavar="N",
                        help="create_vm_with_config: a guest port to publish (repeatable)")

    vms = sub.add_parser("vms", help="ask the query API about VMs")
    vsub = vms.add_subparsers(dest="vms_cmd", required=True)
    vl = vsub.add_parser("list")
    vl.add_argument("--json", action="store_true")
    vg = vsub.add_parser("get")
    vg.add_argument("vm_id")
    vc = vsub.add_parser("console")
    vc.add_argument("vm_id")
    vc.add_argument("--tail", type=int, default=4096)
    vc.add_argument("--raw", action="store_true", help="print the guest's control characters as they are "
                    "(by default they are shown escaped: \\x1b...)")
    vc.add_argument("--key-file", default=None, metavar="FILE",
                    help="the customer key that signs the read (default CUSTOMER_KEY, or the one `dev` recorded)")
    vs = vsub.add_parser("ssh", help="ssh as root into a running VM's published port 22",
                         usage="%(prog)s [--identity FILE] [--api-url URL] VM [-- CMD...]")
    vs.add_argument("--identity", "-i", default=None, metavar="FILE", help="private key for ssh -i")
    vs.add_argument("vm_id", metavar="VM")
    vs.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="run this instead of a shell")
    vw = vsub.add_parser("watch", help="print a VM's lifecycle events as they happen (Ctrl-C ends)")
    vw.add_argument("vm_id")
    vw.add_argument("--last", type=int, default=10, help="past events to print first (default 10)")
    vw.add_argument("--until", choices=["created", "running", "stopped", "destroyed", "failed"], default=None,
                    help="instead: wait until the VM is in this status, print it and exit")
    vw.add_argument("--timeout", type=float, default=60.0, help="seconds --until waits (default 60)")
    for v in (vl, vg, vc, vs, vw):
        v.add_argument("--api-url", default=None)

    keys = sub.add_parser("keys", help="operator keystore (blueprint-sdk layout)")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    for name, helptext in (("create", "generate a new ECDSA key"), ("import", "import a hex secret"),
                           ("show", "print the operator address")):
        k = ksub.add_parser(name, help=helptext)
        k.add_argument("--keystore-uri", default=os.environ.get("KEYSTORE_URI", "./keystore"))
        if name == "import":
            k.add_argument("--secret-file", default=None, help="file with the hex secret (default: stdin)")

    image = sub.add_parser("image", help="guest images built from Debian packages")
    isub = image.add_subparsers(dest="image_cmd", required=True)
    ib = isub.add_parser("build", help="build `default` (busybox) or `debian` (bookworm with SSH)")
    ib.add_argument("image_name", nargs="?", default=None, metavar="NAME")
    ib.add_argument("--name", default="default", help="same as NAME")
    ii = isub.add_parser("import", help="register your own kernel and ext4 root file system")
    ii.add_argument("image_name", metavar="NAME")
    ii.add_argument("--kernel", required=True, help="bzImage (or ELF vmlinux)")
    ii.add_argument("--rootfs", required=True, help="ext4 file system image")
    ii.add_argument("--initrd", default=None)
    ii.add_argument("--cmdline", default=None, help="kernel command line (default: root=/dev/vda on ttyS0)")
    ii.add_argument("--ready-line", default="MICROVM-READY", help="console line that means the guest is ready")
    il = isub.add_parser("list")
    for i in (ib, ii, il):
        i.add_argument("--image-dir", default=os.environ.get("MICROVM_IMAGE_DIR"))
    return p


async def cmd_dev(args: argparse.Namespace) -> int:
    await dev.run_dev(Path(args.data_dir), provider=args.provider, rpc_port=args.rpc_port, api_addr=args.api_addr,
                      block_time=args.block_time, on_operator=_install_signals)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import asyncio

    from . import logs

    logs.configure(args.log_level, json_lines=args.log_json)
    try:
        if args.cmd == "vms":
            return cmd_vms(args)
        if args.cmd == "image":
            return cmd_image(args)
        if args.cmd == "jobs" and args.jobs_cmd == "list":
            return cmd_jobs_list(args)
        if args.cmd == "keys":
            return cmd_keys(args)
        if args.cmd == "run":
            return asyncio.run(cmd_run(args))
        if args.cmd == "register":
            return asyncio.run(cmd_register(args))
        if args.cmd == "blueprint":
            return asyncio.run(cmd_blueprint_deploy(args))
        if args.cmd == "dev":
            return asyncio.run(cmd_dev(args))
        if args.cmd == "jobs":
            return asyncio.run(cmd_jobs_submit(args))
        raise CliError(f"unknown command {args.cmd!r}")
    except MicrovmBlueprintError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
