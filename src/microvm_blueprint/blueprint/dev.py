"""``microvm-blueprint dev``: a local chain, the dev contract, an operator and its query API, until Ctrl-C.

It records what it started (RPC URL, contract, service id, a funded customer key, the query API) in
``<dev dir>/dev.json`` so that ``jobs submit`` and ``vms`` find them without flags: :func:`recorded`.
Importing this module is cheap (the customer CLI reads :func:`recorded`); the operator, the devnet
and the image builder are imported by :func:`run_dev` only.
"""

from __future__ import annotations

import json
import os
import shutil
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
    belong to yesterday's chain, so ``<data_dir>/run`` is wiped first."""
    from ..tangle.devnet import ANVIL_KEYS, Anvil, deploy_dev_tangle
    from ..tangle.environment import BlueprintEnvironment
    from ..tangle.keystore import import_key
    from .operator import Operator
    from .settings import OperatorSettings, parse_addr

    data = data_dir.resolve()
    run_dir = data / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    kind = _provider(provider)
    host, port = parse_addr(api_addr, "--api-addr")
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
            }
        )
        settings = OperatorSettings.from_env(
            {**os.environ, "MICROVM_PROVIDER": kind.value}, env.data_dir, api_host=host, api_port=port,
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
            f"dev: provider   {kind.value}\n"
            f"dev: try        .venv/bin/microvm-blueprint jobs submit create_vm vm-1\n"
            f"                .venv/bin/microvm-blueprint jobs submit start_vm vm-1\n"
            f"                .venv/bin/microvm-blueprint vms list\n"
            f"dev: Ctrl-C stops everything.",
            flush=True,
        )
        await operator.run()


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
