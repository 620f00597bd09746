"""Shared fixtures: repository paths and the read-only reference material in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    return Path(os.environ.get("MICROVM_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not path.is_dir():
        pytest.skip(f"reference material not found at {path} (set MICROVM_SHARED_DIR)")
    return path


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Expose each phase's report on the item (fixtures use it to keep evidence of failures)."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
