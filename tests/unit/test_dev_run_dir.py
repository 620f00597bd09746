"""``dev``'s run folder: emptied only when an earlier ``dev`` made it (issue 13, item 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from microvm_blueprint.blueprint.dev import RUN_MARK, _check_record, claim_run_dir
from microvm_blueprint.errors import ConfigError


def test_a_missing_or_empty_folder_is_made_and_marked(tmp_path: Path) -> None:
    for run in (tmp_path / "a" / "run", tmp_path / "empty"):
        if run.name == "empty":
            run.mkdir()
        claim_run_dir(run)
        assert [p.name for p in run.iterdir()] == [RUN_MARK]


def test_a_marked_folder_is_emptied_without_following_links_out_of_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "kept.txt").write_text("not dev's\n")
    run = tmp_path / "run"
    claim_run_dir(run)
    (run / "operator" / "vms").mkdir(parents=True)
    (run / "anvil.log").write_text("old\n")
    (run / "link-to-dir").symlink_to(outside)
    (run / "link-to-file").symlink_to(outside / "sub" / "kept.txt")
    claim_run_dir(run)
    assert [p.name for p in run.iterdir()] == [RUN_MARK]
    assert (outside / "sub" / "kept.txt").read_text() == "not dev's\n"


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_folder_or_file_dev_did_not_make_is_refused_untouched(tmp_path: Path, kind: str) -> None:
    run = tmp_path / "run"
    if kind == "folder":
        run.mkdir()
        (run / "results.csv").write_text("1,2\n")
    else:
        run.write_text("a file named run\n")
    with pytest.raises(ConfigError, match="choose another --data-dir") as refused:
        claim_run_dir(run)
    assert "\n" not in str(refused.value)
    if kind == "folder":
        assert [p.name for p in run.iterdir()] == ["results.csv"]
    else:
        assert run.read_text() == "a file named run\n"


def test_dev_json_is_rewritten_only_when_dev_wrote_it(tmp_path: Path) -> None:
    record = tmp_path / "dev.json"
    _check_record(record)  # none yet
    record.write_text(json.dumps({"rpc_url": "http://127.0.0.1:8545", "contract": "0x00", "api_url": "http://x"}))
    _check_record(record)
    record.write_text('{"my": "settings"}')
    with pytest.raises(ConfigError, match="was not written by dev"):
        _check_record(record)
