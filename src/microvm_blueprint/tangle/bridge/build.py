"""Generate the gRPC stubs of blueprint-sdk's manager bridge from ``../shared``'s ``bridge.proto``.

    python -m microvm_blueprint.tangle.bridge.build          # rewrite bridge_pb2.py, .pyi, bridge_pb2_grpc.py
    python -m microvm_blueprint.tangle.bridge.build --check  # exit 1 if they differ from what the proto gives

The proto is tangle-network/blueprint's ``crates/manager/bridge/proto/bridge.proto`` (MIT), kept in
``../shared/tangle/blueprint-manager`` (``MICROVM_SHARED_DIR`` points elsewhere); it is not copied
into this repository. The stubs are committed (generated code: a user's machine has no ``../shared``)
and made with grpcio-tools pinned in pyproject.toml's ``dev`` extra, so the output is the same everywhere.
The one edit after protoc: the service module imports the messages relatively (protoc writes
``import bridge_pb2``, which only works with the folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]
OUTPUTS = ("bridge_pb2.py", "bridge_pb2.pyi", "bridge_pb2_grpc.py")
HEADER = "# Generated from ../shared/tangle/blueprint-manager/bridge.proto by python -m microvm_blueprint.tangle.bridge.build\n"


def proto_path() -> Path:
    base = Path(os.environ.get("MICROVM_SHARED_DIR", REPO.parent / "shared"))
    return base / "tangle" / "blueprint-manager" / "bridge.proto"


def generate(proto: Path) -> dict[str, str]:
    """The three files' text as protoc (grpcio-tools) writes them for ``proto``, import fixed."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        raise SystemExit("grpcio-tools is required: pip install -e '.[dev]'") from None
    if not proto.is_file():
        raise SystemExit(f"{proto} not found (set MICROVM_SHARED_DIR to the folder holding tangle/)")
    includes = Path(grpc_tools.__file__).resolve().parent / "_proto"  # google/protobuf/empty.proto
    with tempfile.TemporaryDirectory() as out:
        code = protoc.main([
            "grpc_tools.protoc", f"-I{proto.parent}", f"-I{includes}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", str(proto),
        ])
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        texts = {name: (Path(out) / name).read_text() for name in OUTPUTS}
    fixed = texts["bridge_pb2_grpc.py"].replace("\nimport bridge_pb2 as ", "\nfrom . import bridge_pb2 as ")
    if fixed == texts["bridge_pb2_grpc.py"]:
        raise SystemExit("protoc's service module no longer imports `bridge_pb2` as expected: check build.py")
    texts["bridge_pb2_grpc.py"] = fixed
    return {name: HEADER + text for name, text in texts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--proto", type=Path, default=None, help="bridge.proto (default: ../shared's)")
    args = parser.parse_args(argv)
    texts = generate(args.proto or proto_path())
    if args.check:
        stale = [n for n, t in texts.items() if not (HERE / n).is_file() or (HERE / n).read_text() != t]
        if stale:
            print(f"stale: {', '.join(stale)}: run python -m microvm_blueprint.tangle.bridge.build", file=sys.stderr)
            return 1
        print("bridge stubs are up to date")
        return 0
    for name, text in texts.items():
        (HERE / name).write_text(text)
    print(f"wrote {', '.join(OUTPUTS)} in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
