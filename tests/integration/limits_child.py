"""A query API in a process of its own with a small open-file limit (tests/integration/test_query_limits.py).

argv: NOFILE. Prints ``port <n>`` once listening. Reads commands on stdin: ``hog`` opens files until the
process has no file handle left (as VMMs and the chain would), ``free`` closes them; each answers ``ok <n>``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import sys
import tempfile
from pathlib import Path

from microvm_blueprint.blueprint.query import QueryApp
from microvm_blueprint.blueprint.server import QueryServer
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.store import Store


async def main(nofile: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    tmp = Path(tempfile.mkdtemp())
    life = Lifecycle(InMemoryDriver(), Store(tmp / "s.sqlite3"), state_dir=tmp / "state")
    server = QueryServer(QueryApp(life, None), "127.0.0.1", 0)
    ready = asyncio.Event()
    task = asyncio.create_task(server.run(ready))
    await ready.wait()
    print(f"port {server.bound_port}", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    hogged: list[int] = []
    while line := (await reader.readline()).decode().strip():
        if line == "hog":
            try:
                while True:
                    hogged.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                pass
        elif line == "free":
            for fd in hogged:
                os.close(fd)
            hogged.clear()
        print(f"ok {len(hogged)}", flush=True)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
