"""Named crash points for crash tests (DESIGN.md §7 "Crash tests").

``MICROVM_CRASH_AT=name[,name...]`` makes the process exit abruptly (``os._exit(86)``, no cleanup,
like ``kill -9``) the first time it reaches a listed point; ``MICROVM_CRASH_AFTER=N`` lets the
point pass N times first. Unset in production, so each check is one dictionary lookup.
"""

from __future__ import annotations

import os
import sys

EXIT_CODE = 86

_points = frozenset(p.strip() for p in os.environ.get("MICROVM_CRASH_AT", "").split(",") if p.strip())
_after = int(os.environ.get("MICROVM_CRASH_AFTER", "0") or 0)
_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Exit now if ``name`` is armed (see module doc)."""
    if name not in _points:
        return
    count = _seen.get(name, 0)
    _seen[name] = count + 1
    if count >= _after:
        sys.stderr.write(f"crash point {name!r} reached: exiting\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
