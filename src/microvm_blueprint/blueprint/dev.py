"""``microvm-blueprint dev``: a local chain, the dev contract, an operator and its query API, until Ctrl-C.

It records what it started (RPC URL, contract, service id, a funded customer key, the query API) in
``<dev dir>/dev.json`` so that ``jobs submit`` and ``vms`` find them without flags: :func:`recorded`.
Importing this module is cheap (the customer CLI reads :func:`recorded`); the operator, the devnet
and the image builder are imported by :func:`run_dev` only.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, MicrovmBlueprintError

if TYPE_CHECKING:
    from .settings import ProviderKind

PROVIDERS = ("auto", "in-memory", "qemu")


def default_dir() -> Path:
    """Where ``dev`` keeps its chain, operator data and ``dev.json`` (``MICROVM_DEV_DIR``, default ``.devnet``)."""
    return Path(os.environ.get("MICROVM_DEV_DIR", ".devnet"))


def recorded() -> dict[str, Any]:
    """What a running ``dev`` wrote about itself (RPC URL, contract, ...), or nothing."""
    try:
        data = json.loads((default_dir() / "dev.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


async def run_dev(
    data_dir: Path,
    *,
    provider: str,
    rpc_port: int,
    api_addr: str,
    block_time: float | None,
    on_operator: Callable[[Callable[[], None]], None],
) -> None:
    """Start anvil, deploy the dev contract, run an operator against it until it stops.

    ``provider``: one of :data:`PROVIDERS`. ``on_operator`` is given the operator's ``stop`` once it
    exists (the CLI binds it to SIGINT/SIGTERM). Each run starts a fresh chain: yesterday's VMs
    belong to yesterday's chain, so ``<data_dir>/run`` is emptied first, but only when an earlier
    ``dev`` made it (:func:`claim_run_dir`). Refused before anything is touched: a ``--rpc-port``
    that already has something listening (a chain left by a killed ``dev`` would otherwise be used
    as if it were new), a ``run`` folder or ``dev.json`` that ``dev`` did not make."""
    from ..tangle.devnet import ANVIL_KEYS, Anvil, deploy_dev_tangle, port_in_use
    from ..tangle.environment import BlueprintEnvironment
    from ..tangle.keystore import import_key
    from .operator import Operator
    from .settings import OperatorSettings, parse_addr

    data = data_dir.resolve()
    run_dir = data / "run"
    if port_in_use(rpc_port):
        raise ConfigError(
            f"--rpc-port {rpc_port}: something already listens on 127.0.0.1:{rpc_port} (a chain left by an "
            f"earlier dev?): stop it, or choose another port with --rpc-port"
        )
    _check_record(data / "dev.json")
    claim_run_dir(run_dir)
    kind = _provider(provider)
    host, port = parse_addr(api_addr, "--api-addr")
    ssh_key = ssh_public_key(data)
    print(f"dev: starting anvil on 127.0.0.1:{rpc_port} ...", flush=True)
    async with Anvil(port=rpc_port, block_time=block_time, log_dir=run_dir) as chain:
        deployment = await deploy_dev_tangle(chain.rpc_url)
        keystore = run_dir / "keystore"
        import_key(keystore, ANVIL_KEYS[1])
        env = BlueprintEnvironment.load(
            {
                "HTTP_RPC_URL": chain.rpc_url, "WS_RPC_URL": chain.ws_url, "DATA_DIR": str(run_dir / "operator"),
                "KEYSTORE_URI": str(keystore), "BLUEPRINT_ID": str(deployment.blueprint_id),
                "SERVICE_ID": str(deployment.service_id), "TANGLE_CONTRACT": deployment.contract,
                "FROM_BLOCK": str(deployment.activation_block),
                "STATUS_REGISTRY_CONTRACT": deployment.status_registry,  # heartbeats, checked as on Tangle
                "HEARTBEAT_INTERVAL_SECS": os.environ.get("HEARTBEAT_INTERVAL_SECS", "300"),
            }
        )
        settings = OperatorSettings.from_env(
            # the console is open in dev (MICROVM_PUBLIC_CONSOLE=false still closes it)
            {"MICROVM_PUBLIC_CONSOLE": "true", **os.environ, "MICROVM_PROVIDER": kind.value}, env.data_dir,
            api_host=host, api_port=port,
            stop_vms_on_exit=True,
        )
        operator = Operator.assemble(env, settings)
        api_url = f"http://{host}:{port}"
        (data / "dev.json").write_text(json.dumps({**deployment.to_json(), "api_url": api_url}, indent=1))
        on_operator(operator.stop)
        print(
            f"dev: chain      {chain.rpc_url}  (Tangle dev contract {deployment.contract}, "
            f"service {deployment.service_id})\n"
            f"dev: query API  {api_url}\n"
            f"dev: heartbeat  every {os.environ.get('HEARTBEAT_INTERVAL_SECS', '300')} s to the status registry "
            f"{deployment.status_registry} (isOnline(0, operator))\n"
            f"dev: provider   {kind.value}\n"
            f"dev: try        .venv/bin/microvm-blueprint jobs submit create_vm vm-1\n"
            f"                .venv/bin/microvm-blueprint jobs submit start_vm vm-1\n"
            f"                .venv/bin/microvm-blueprint vms list\n"
            f"{ssh_hint(ssh_key, settings.network.mode.value, kind)}"
            f"dev: Ctrl-C stops everything.",
            flush=True,
        )
        await operator.run()


#: The file ``dev`` puts in the ``run`` folder it makes: only a folder holding it is ever emptied.
RUN_MARK = ".made-by-microvm-blueprint-dev"


def claim_run_dir(run_dir: Path) -> None:
    """Make ``run_dir`` an empty folder of this run, removing only what an earlier ``dev`` made.

    A folder holding :data:`RUN_MARK` was made by ``dev``: its contents go (the mark stays). A missing
    or empty folder is made or taken, and marked. Anything else (a non-empty folder without the
    mark, a file) is refused with :class:`ConfigError`, untouched."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder: move it away or choose another --data-dir")
    mark = run_dir / RUN_MARK
    if run_dir.is_dir():
        if mark.is_file():
            for entry in run_dir.iterdir():
                if entry == mark:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        elif any(run_dir.iterdir()):
            raise ConfigError(
                f"{run_dir} exists and was not made by dev (no {RUN_MARK} in it): "
                f"move it away or choose another --data-dir"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    mark.write_text("made by `microvm-blueprint dev`, which empties this folder when it starts again\n")


def _check_record(path: Path) -> None:
    """``dev.json`` is rewritten each run: refuse when the file there is not one ``dev`` wrote."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not path.is_file() or not isinstance(data, dict) or not {"rpc_url", "contract", "api_url"} <= data.keys():
        raise ConfigError(f"{path} exists and was not written by dev: move it away or choose another --data-dir")


def _provider(choice: str) -> ProviderKind:
    from .settings import ProviderKind

    if choice == "in-memory":
        return ProviderKind.IN_MEMORY
    if choice == "qemu":
        _ensure_image(required=True)
        return ProviderKind.QEMU
    if choice != "auto":
        raise ConfigError(f"--provider must be one of {', '.join(PROVIDERS)}, not {choice!r}")
    if shutil.which(os.environ.get("MICROVM_QEMU_BIN", "qemu-system-x86_64")) and _ensure_image(required=False):
        print("dev: QEMU found: VMs are real QEMU microvm guests", flush=True)
        return ProviderKind.QEMU
    print("dev: QEMU or its image unavailable: using the in-memory provider", flush=True)
    return ProviderKind.IN_MEMORY


def _image_built(name: str) -> bool:
    try:
        from ..runtime import images

        images.resolve_image(name, images.default_cache_dir())
        return True
    except (ImportError, MicrovmBlueprintError):
        return False


def _ensure_image(*, required: bool) -> bool:
    try:
        from ..runtime import images

        cache = images.default_cache_dir()
        try:
            images.resolve_image("default", cache)
            return True
        except MicrovmBlueprintError:
            print("dev: building the default guest image (first use) ...", flush=True)
            images.build_image("default", cache_dir=cache, progress=lambda line: print(f"  {line}", flush=True))
            return True
    except (ImportError, MicrovmBlueprintError) as exc:
        if required:
            raise ConfigError(f"--provider qemu: cannot use QEMU: {exc}") from exc
        print(f"dev: no guest image ({exc})", flush=True)
        return False


SSH_VM = "ssh-1"
CLI = ".venv/bin/microvm-blueprint"


def ssh_public_key(data_dir: Path) -> tuple[Path, Path | None] | None:
    """The public key ``dev`` suggests for a VM you can SSH into, and the private key ``vms ssh`` needs
    (``None``: ssh finds it itself). The user's own ``~/.ssh/id_*.pub`` if there is one (ed25519 first),
    else ``<dev dir>/ssh/id_ed25519``, made once with ``ssh-keygen`` and kept across runs. ``None``
    when there is neither and no ``ssh-keygen``."""
    home_keys = sorted((Path.home() / ".ssh").glob("id_*.pub"), key=lambda p: (p.name != "id_ed25519.pub", p.name))
    if home_keys:
        return home_keys[0], None
    private = data_dir / "ssh" / "id_ed25519"
    public = private.with_name(private.name + ".pub")
    if public.is_file() and private.is_file():
        return public, private
    if shutil.which("ssh-keygen") is None:
        print("dev: no ~/.ssh/id_*.pub and no ssh-keygen (openssh-client): no SSH key to suggest", flush=True)
        return None
    if public.exists() or private.exists() or public.is_symlink() or private.is_symlink():  # never ours to remove
        print(f"dev: {_shown(private)} or its .pub exists without the other: no SSH key to suggest", flush=True)
        return None
    private.parent.mkdir(parents=True, exist_ok=True)
    argv = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "microvm-blueprint dev", "-f", str(private)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:  # run() has killed and reaped it
        print("dev: ssh-keygen did not finish in 30 s: no SSH key to suggest", flush=True)
        return None
    if done.returncode != 0 or not public.is_file():
        print(f"dev: ssh-keygen failed ({(done.stderr or done.stdout).strip()[:200]}): no SSH key to suggest", flush=True)
        return None
    print(f"dev: made an SSH key for your VMs: {_shown(private)} (no ~/.ssh/id_*.pub found)", flush=True)
    return public, private


def _shown(path: Path) -> str:
    """``path`` as a user would type it: relative to the working directory or ``~/``, shell-quoted."""
    path = path.absolute()
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        try:
            return prefix + shlex.quote(str(path.relative_to(base)))
        except ValueError:
            continue
    return shlex.quote(str(path))


def ssh_hint(key: tuple[Path, Path | None] | None, network: str, kind: ProviderKind) -> str:
    """The banner's lines on creating a VM you can SSH into (empty without a key or a network)."""
    from .settings import ProviderKind

    if key is None:
        return ""
    if network == "none":
        return "dev: ssh      MICROVM_NETWORK=none: no published ports, so no SSH into VMs\n"
    public, private = key
    identity = f"--identity {_shown(private)} " if private is not None else ""
    commands = [
        f"{CLI} jobs submit create_vm_with_config {SSH_VM} 1 512 0 debian --ssh-key {_shown(public)} --port 22",
        f"{CLI} jobs submit start_vm {SSH_VM}",
        f"{CLI} vms ssh {identity}{SSH_VM}    # ... {SSH_VM} -- uname -a: one command",
    ]
    if kind is ProviderKind.QEMU and not _image_built("debian"):
        commands.insert(0, f"{CLI} image build debian    # once, a few minutes")
    elif kind is not ProviderKind.QEMU:
        commands.append("(in-memory VMs record their ports, but no guest answers on them: use --provider qemu)")
    lines = [("dev: ssh" if i == 0 else "").ljust(16) + c for i, c in enumerate(commands)]
    return "\n".join(lines) + "\n"
