"""The debian guest's config reader (runs under python3-minimal, which has no json): checked here on the
exact files the config drive carries."""

from __future__ import annotations

import json

import pytest

from microvm_blueprint.runtime import guestinit
from microvm_blueprint.runtime.configdrive import GuestConfig, GuestNetwork

from .test_access import key
from .test_configdrive import TRICKY_COMMENT


def test_the_small_json_reader_reads_every_config_drive_file() -> None:
    cfg = GuestConfig.make("i-1", "web-1", [key(), key("ssh-rsa", comment=TRICKY_COMMENT)], GuestNetwork.user())
    for name, data in cfg.files().items():
        text = data.decode()
        body = text.split("\n", 1)[1] if text.startswith("#cloud-config") else text
        assert guestinit.parse_json(body) == json.loads(body), name


@pytest.mark.parametrize("doc", [
    {"a": [1, -2.5, 3e2, True, False, None, "x\"y\\z\n\u00e9\u2028"], "b": {}, "c": [], "d": {"e": [{}]}},
    [], "plain", 0,
])
def test_the_small_json_reader_agrees_with_json(doc: object) -> None:
    for text in (json.dumps(doc), json.dumps(doc, indent=2), json.dumps(doc, ensure_ascii=False)):
        assert guestinit.parse_json(text) == doc


@pytest.mark.parametrize("bad", ["{", "[1,]", "{\"a\" 1}", "{1: 2}", "[1] x", "tru", "'a'"])
def test_the_small_json_reader_refuses_what_json_refuses(bad: str) -> None:
    with pytest.raises((ValueError, IndexError)):
        json.loads(bad)
    with pytest.raises((ValueError, IndexError)):
        guestinit.parse_json(bad)


def test_hand_made_yaml_falls_back_to_simple_lines() -> None:
    doc = guestinit.parse_simple_yaml("instance-id: iid-local01\nlocal-hostname: 'box'\n"
                                      "ssh_authorized_keys:\n  - ssh-ed25519 AAAA a\n  - \"ssh-rsa BBBB b\"\n")
    assert doc == {"instance-id": "iid-local01", "local-hostname": "box",
                   "ssh_authorized_keys": ["ssh-ed25519 AAAA a", "ssh-rsa BBBB b"]}


def test_the_guest_rechecks_keys() -> None:
    assert guestinit._KEY.fullmatch(key())
    assert guestinit._KEY.fullmatch(key("sk-ecdsa-sha2-nistp256@openssh.com", comment=TRICKY_COMMENT))
    assert not guestinit._KEY.fullmatch('command="sh" ' + key())
    assert not guestinit._KEY.fullmatch(key() + "\n" + key())
