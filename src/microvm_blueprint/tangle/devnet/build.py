"""Rebuild ``DevTangle.json`` from ``DevTangle.sol`` with solc-js (npm ``solc``, pinned in package.json).

    python -m microvm_blueprint.tangle.devnet.build          # rewrite the artifact
    python -m microvm_blueprint.tangle.devnet.build --check  # exit 1 if the artifact is stale

Deterministic: fixed compiler, optimizer settings and evmVersion ``cancun``; no metadata hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "DevTangle.sol"
ARTIFACT = HERE / "DevTangle.json"
REPO = HERE.parents[3]

SETTINGS: dict[str, Any] = {
    "optimizer": {"enabled": True, "runs": 200},
    "evmVersion": "cancun",
    "metadata": {"bytecodeHash": "none", "appendCBOR": False},
    "outputSelection": {"*": {"DevTangle": ["abi", "evm.bytecode.object"]}},
}

_NODE_COMPILE = """
const solc = require('solc');
let input = '';
process.stdin.on('data', d => input += d);
process.stdin.on('end', () => {
  process.stdout.write(JSON.stringify({version: solc.version(), output: JSON.parse(solc.compile(input))}));
});
"""


def compile_contract() -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node is required to compile the dev contract (apt-get install nodejs)")
    if not (REPO / "node_modules" / "solc").is_dir():
        raise SystemExit("npm package solc missing: run `npm ci` in the repository root")
    source = SOURCE.read_text()
    request = {"language": "Solidity", "sources": {"DevTangle.sol": {"content": source}}, "settings": SETTINGS}
    proc = subprocess.run(
        [node, "-e", _NODE_COMPILE], input=json.dumps(request), capture_output=True, text=True, cwd=REPO,
        timeout=300, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"solc-js failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    errors = [e for e in result["output"].get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise SystemExit("compile errors:\n" + "\n".join(e["formattedMessage"] for e in errors))
    contract = result["output"]["contracts"]["DevTangle.sol"]["DevTangle"]
    return {
        "contractName": "DevTangle",
        "compiler": f"solc-js {result['version']}",
        "settings": {k: v for k, v in SETTINGS.items() if k != "outputSelection"},
        "sourceSha256": hashlib.sha256(source.encode()).hexdigest(),
        "abi": contract["abi"],
        "bytecode": "0x" + contract["evm"]["bytecode"]["object"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    artifact = compile_contract()
    text = json.dumps(artifact, indent=1, sort_keys=True) + "\n"
    if args.check:
        if not ARTIFACT.exists() or ARTIFACT.read_text() != text:
            print("DevTangle.json is stale: run python -m microvm_blueprint.tangle.devnet.build", file=sys.stderr)
            return 1
        print("DevTangle.json is up to date")
        return 0
    ARTIFACT.write_text(text)
    print(f"wrote {ARTIFACT} ({len(artifact['bytecode']) // 2 - 1} bytes of bytecode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
