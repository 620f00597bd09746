"""Run every benchmark (or the ones named): `python -m bench [pipeline] [lifecycle] [query] [density] [cli] [idle]
[backlog] [events] [guest] [build] [network]`."""

from __future__ import annotations

import asyncio
import logging
import sys

from . import backlog, cli, events, guest, idle, network, pipeline, query, vmm

BENCHES = {
    "pipeline": pipeline.run,
    "lifecycle": vmm.lifecycle,
    "query": query.run,
    "density": vmm.density,
    "cli": cli.run,
    "idle": idle.run,
    "backlog": backlog.run,
    "events": events.run,
    "guest": guest.boot,
    "build": guest.build,
    "network": network.run,
}


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    names = sys.argv[1:] or list(BENCHES)
    for name in names:
        if name not in BENCHES:
            print(f"unknown benchmark {name!r}; known: {', '.join(BENCHES)}", file=sys.stderr)
            return 2
        asyncio.run(BENCHES[name]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
