"""`dev`'s SSH suggestion: the user's own `~/.ssh/id_*.pub` first, else a key made once under the dev dir."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from microvm_blueprint.blueprint import dev
from microvm_blueprint.blueprint.settings import ProviderKind


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # as `make dev` runs: in the repository, not above ~/.ssh
    return tmp_path / "home"


def test_the_users_own_key_ed25519_first(home: Path, tmp_path: Path) -> None:
    (home / ".ssh").mkdir()
    for name in ("id_rsa.pub", "id_ed25519.pub", "id_ecdsa.pub"):
        (home / ".ssh" / name).write_text("ssh-... x\n")
    assert dev.ssh_public_key(tmp_path / "work" / "devnet") == (home / ".ssh" / "id_ed25519.pub", None)
    assert not (tmp_path / "work" / "devnet").exists()  # nothing generated
    hint = dev.ssh_hint((home / ".ssh" / "id_ed25519.pub", None), "user", ProviderKind.IN_MEMORY)
    assert "--ssh-key ~/.ssh/id_ed25519.pub --port 22" in hint and "--identity" not in hint


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) is not installed")
def test_a_key_is_made_once_under_the_dev_dir(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    got = dev.ssh_public_key(tmp_path / "work" / "devnet")
    private = tmp_path / "work" / "devnet" / "ssh" / "id_ed25519"
    assert got == (private.with_name("id_ed25519.pub"), private)
    assert private.with_name("id_ed25519.pub").read_text().startswith("ssh-ed25519 ")
    assert "dev: made an SSH key for your VMs: devnet/ssh/id_ed25519" in capsys.readouterr().out
    first = private.read_bytes()
    assert dev.ssh_public_key(tmp_path / "work" / "devnet") == got and private.read_bytes() == first  # kept, not remade
    hint = dev.ssh_hint(got, "user", ProviderKind.IN_MEMORY)
    assert "--ssh-key devnet/ssh/id_ed25519.pub" in hint and "vms ssh --identity devnet/ssh/id_ed25519 ssh-1" in hint


def test_no_network_no_ssh_lines(home: Path) -> None:
    assert "no published ports" in dev.ssh_hint((home / "k.pub", None), "none", ProviderKind.QEMU)
    assert dev.ssh_hint(None, "user", ProviderKind.QEMU) == ""
