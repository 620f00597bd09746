"""The store's published ports: recorded with the VM, never colliding, released at destroy."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from microvm_blueprint.runtime.errors import QuotaExceeded
from microvm_blueprint.runtime.model import NetworkMode, Origin, PortMapping, VmSpec, VmStatus
from microvm_blueprint.runtime.ports import tcp_port_free
from microvm_blueprint.runtime.store import Store

HOST = "127.0.0.1"


def _free(host: str, port: int) -> bool:
    return True


def _add(store: Store, vm_id: str, ports: tuple[int, ...], rng: tuple[int, int] = (41000, 41009)) -> None:
    store.reserve_network(vm_id, NetworkMode.USER, ports, host=HOST, port_range=rng, is_free=_free)
    store.insert_vm(vm_id, VmStatus.CREATED, VmSpec(ports=ports), "/nowhere", None, Origin(), "create")


def test_two_vms_never_share_a_host_port(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    _add(store, "a", (22, 80))
    _add(store, "b", (22, 80))
    a, b = store.network("a"), store.network("b")
    assert [p.guest_port for p in a.ports] == [22, 80] == [p.guest_port for p in b.ports]
    host_ports = [p.host_port for p in a.ports + b.ports]
    assert len(set(host_ports)) == 4 and all(41000 <= p <= 41009 for p in host_ports)
    assert a.mode is NetworkMode.USER and a.to_json()["guest_ip"] == "10.0.2.15"


def test_ports_survive_a_restart_and_show_in_views(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    _add(store, "a", (22,))
    before = store.network("a")
    store.close()
    again = Store(path)
    assert again.network("a") == before
    view = again.vm_view("a")
    assert view is not None and view.network == before
    listed = again.vm_views()
    assert listed[0].network == before
    assert view.to_json()["network"]["ports"] == [p.to_json() for p in before.ports]


def test_a_port_something_else_listens_on_is_skipped(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert not tcp_port_free(HOST, taken)
        with pytest.raises(QuotaExceeded):  # the only port in range is someone else's
            store.reserve_network("a", NetworkMode.USER, (22,), host=HOST, port_range=(taken, taken),
                                  is_free=tcp_port_free)
    assert tcp_port_free(HOST, taken)  # once they let go, it can be had
    net = store.reserve_network("a", NetworkMode.USER, (22,), host=HOST, port_range=(taken, taken),
                                is_free=tcp_port_free)
    assert net.ports == (PortMapping(22, HOST, taken),)


def test_a_full_range_is_a_clear_quota_error_and_takes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    _add(store, "a", (22, 80), rng=(41000, 41002))
    with pytest.raises(QuotaExceeded, match="no free host port left in 41000-41002"):
        store.reserve_network("b", NetworkMode.USER, (22, 80), host=HOST, port_range=(41000, 41002),
                              is_free=_free)
    assert store.network("b").ports == ()
    assert len(store.network("a").ports) == 2


def test_destroy_releases_ports_and_a_new_vm_can_take_them(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    _add(store, "a", (22,), rng=(41000, 41000))
    held = store.network("a").ports
    assert held == (PortMapping(22, HOST, 41000),)
    store.update_vm("a", VmStatus.DESTROYED, Origin(), "destroy", handle=None)
    assert store.network("a").ports == () and store.network("a").mode is NetworkMode.USER
    _add(store, "b", (22,), rng=(41000, 41000))
    assert store.network("b").ports == held


def test_a_reservation_without_a_vm_is_an_orphan_dropped_at_start(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    store.reserve_network("ghost", NetworkMode.USER, (22,), host=HOST, port_range=(41000, 41000), is_free=_free)
    _add(store, "a", (), rng=(41000, 41000))
    assert store.drop_orphan_networks() == 1
    assert store.network("ghost").ports == ()
    _add(store, "b", (22,), rng=(41000, 41000))  # the port is free again
    assert store.network("b").ports[0].host_port == 41000


def test_a_schema_2_store_opens_and_its_networks_read_as_deny_until_recorded(tmp_path: Path) -> None:
    """Schema 2 had no ``networks.egress``: the rows already there get NULL (not recorded), read as
    deny, and listed for reconciliation to record (from the VM's live rules where it can read them)."""
    import sqlite3

    path = tmp_path / "s.sqlite3"
    store = Store(path)
    _add(store, "old", (22,))
    store.close()
    with sqlite3.connect(path) as conn:  # back to schema 2: the table without the column
        conn.execute("ALTER TABLE networks DROP COLUMN egress")
        conn.execute("UPDATE meta SET value='2' WHERE key='schema'")
    store = Store(path)
    assert store._read("SELECT value FROM meta WHERE key='schema'") == [("3",)]
    assert store.network("old").egress is False and store.network("old").ports[0].guest_port == 22
    assert store.vm_view("old").network.to_json()["egress"] == "deny"  # type: ignore[union-attr]
    assert store.unrecorded_egress() == {"old"}
    store.record_egress("old", True)
    assert store.unrecorded_egress() == set()
    assert store.vm_view("old").network.to_json()["egress"] == "allow"  # type: ignore[union-attr]
    store.record_egress("old", False)  # a recorded policy is never overwritten
    assert store.network("old").egress is True
    store.reserve_network("new", NetworkMode.USER, (), host=HOST, port_range=(41000, 41009), is_free=_free,
                          egress=True)
    assert store.network("new").egress is True and store.unrecorded_egress() == set()
