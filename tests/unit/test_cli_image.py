"""`microvm-blueprint image import|build|list`: the CLI's image subcommand."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm_blueprint import cli
from microvm_blueprint.runtime import images

from .test_images import _bzimage, _ext4, needs_mkfs


@needs_mkfs
def test_image_import_then_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kernel, rootfs = _bzimage(tmp_path / "vmlinuz"), _ext4(tmp_path / "root.ext4")
    cache = tmp_path / "cache"
    assert cli.main(["image", "import", "mine", "--kernel", str(kernel), "--rootfs", str(rootfs),
                     "--image-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "image 'mine' imported:" in out and "s] copying the kernel (bzImage)" in out
    assert images.resolve_image("mine", cache).recipe == "imported"
    assert cli.main(["image", "list", "--image-dir", str(cache)]) == 0
    assert capsys.readouterr().out.split()[0] == "mine"


def test_image_import_error_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["image", "import", "mine", "--kernel", str(tmp_path / "nope"), "--rootfs",
                     str(tmp_path / "r"), "--image-dir", str(tmp_path / "cache")])
    assert code == 1
    assert capsys.readouterr().err.strip() == f"error: kernel {tmp_path / 'nope'} does not exist"


def test_image_build_takes_the_name_as_an_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # stops before any download, after choosing the name
    assert cli.main(["image", "build", "../debian", "--image-dir", str(tmp_path)]) == 1
    assert "image name '../debian' must be a plain name" in capsys.readouterr().err
    assert cli.main(["image", "build", "--name", "../x", "--image-dir", str(tmp_path)]) == 1
    assert "image name '../x' must be a plain name" in capsys.readouterr().err
