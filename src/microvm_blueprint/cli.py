"""``microvm-blueprint``: a thin CLI. Each command builds its settings here and passes them down.

Any :class:`~microvm_blueprint.errors.MicrovmBlueprintError` ends the command with one line on
stderr and exit code 1; no traceback for expected failures.

Each command imports what it needs when it runs (``--help`` and the customer's ``jobs submit``
start in a fraction of the operator's import time; ``python -m bench cli_startup`` measures it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .blueprint import dev
from .errors import MicrovmBlueprintError

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
        import httpx

        r = httpx.get(f"{base}/vms/{quote(args.vm_id, safe='')}/console", params={"tail": args.tail}, timeout=10)
        if r.status_code != 200:
            raise CliError(f"{r.status_code}: {r.text}")
        sys.stdout.write(r.text)
        return 0
    if args.vms_cmd == "watch":
        return _vms_watch(base, args)
    raise CliError(f"unknown vms command {args.vms_cmd!r}")


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
    from .blueprint.operator import Operator
    from .blueprint.settings import OperatorSettings, parse_addr
    from .tangle.environment import BlueprintEnvironment

    env = BlueprintEnvironment.load(
        os.environ,
        http_rpc_url=args.http_rpc_url, ws_rpc_url=args.ws_rpc_url, keystore_uri=args.keystore_uri,
        data_dir=args.data_dir, chain=args.chain, protocol=args.protocol, test_mode=args.test_mode,
        dry_run=args.dry_run, from_block=args.from_block,
    )
    overrides: dict[str, object] = {}
    if args.api_addr:
        overrides["api_host"], overrides["api_port"] = parse_addr(args.api_addr, "--api-addr")
    settings = OperatorSettings.from_env(os.environ, env.data_dir, **overrides)
    operator = Operator.assemble(env, settings)
    _install_signals(operator.stop)
    await operator.run()
    return 0


# ---- jobs submit -----------------------------------------------------------------------------


async def cmd_jobs_submit(args: argparse.Namespace) -> int:
    from .blueprint.client import TangleCustomer, encode_job_args, resolve_job
    from .tangle.environment import Secret

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
    job = resolve_job(args.job)
    inputs = encode_job_args(job, args.args)
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

    run = sub.add_parser("run", help="run the operator (producer, jobs, consumer, query API)")
    run.add_argument("--http-rpc-url", default=None)
    run.add_argument("--ws-rpc-url", default=None)
    run.add_argument("--keystore-uri", default=None)
    run.add_argument("--data-dir", default=None)
    run.add_argument("--chain", default=None)
    run.add_argument("--protocol", default=None)
    run.add_argument("--test-mode", action="store_true", default=None)
    run.add_argument("--dry-run", action="store_true", default=None)
    run.add_argument("--from-block", type=int, default=None)
    run.add_argument("--api-addr", default=None, help="query API HOST:PORT (MICROVM_API_ADDR, default 127.0.0.1:3000)")

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

    vms = sub.add_parser("vms", help="ask the query API about VMs")
    vsub = vms.add_subparsers(dest="vms_cmd", required=True)
    vl = vsub.add_parser("list")
    vl.add_argument("--json", action="store_true")
    vg = vsub.add_parser("get")
    vg.add_argument("vm_id")
    vc = vsub.add_parser("console")
    vc.add_argument("vm_id")
    vc.add_argument("--tail", type=int, default=4096)
    vw = vsub.add_parser("watch", help="print a VM's lifecycle events as they happen (Ctrl-C ends)")
    vw.add_argument("vm_id")
    vw.add_argument("--last", type=int, default=10, help="past events to print first (default 10)")
    vw.add_argument("--until", choices=["created", "running", "stopped", "destroyed", "failed"], default=None,
                    help="instead: wait until the VM is in this status, print it and exit")
    vw.add_argument("--timeout", type=float, default=60.0, help="seconds --until waits (default 60)")
    for v in (vl, vg, vc, vw):
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
