"""Preflight and network helpers on this machine's loopback (the multi-host tests use real
nodes: tests/multihost)."""

from __future__ import annotations

import copy
import socket

import pytest

from distml.config import parse_config
from distml.distributed import network, preflight
from distml.distributed.launch import node_shape, parse_rdzv_conf
from distml.errors import DistmlError
from tests.helpers.configs import TINY


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


LOOPBACK = network.Route("127.0.0.1", "127.0.0.1", "127.0.0.1", "lo")


def test_the_route_to_an_address_names_the_interface_holding_ours():
    route = network.route_to("127.0.0.1", 1)
    assert route.own_addr == "127.0.0.1"
    assert route.interface == network.local_addresses()["127.0.0.1"]
    assert route.master_is_here


def test_a_master_on_loopback_is_refused_for_several_nodes():
    with pytest.raises(preflight.PreflightError,
                       match=r"resolves to the loopback address 127\.0\.0\.1 on this node"):
        preflight.check_route("localhost", 29500, what="the master")


@pytest.mark.parametrize("endpoint", ["10.0.0.1", "10.0.0.1:", ":29500", "h:99999", "h:x"])
def test_a_malformed_endpoint_names_the_form(endpoint):
    with pytest.raises(DistmlError, match=rf"--rdzv-endpoint='{endpoint}' is not HOST:PORT"):
        preflight.parse_endpoint(endpoint)


def test_ipv6_endpoints_parse():
    assert preflight.parse_endpoint("[fd00::1]:29500") == ("fd00::1", 29500)


def test_a_closed_port_fails_after_the_wait():
    port = _closed_port()
    with pytest.raises(preflight.PreflightError,
                       match=rf"nothing listens on the master 127\.0\.0\.1:{port}.* for 0\.3 s"):
        preflight.wait_for_port(LOOPBACK, port, what="the master", seconds=0.3)


def test_an_open_port_passes_and_a_used_one_is_refused_to_its_server():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        preflight.wait_for_port(LOOPBACK, port, what="the master", seconds=0.3)
        with pytest.raises(preflight.PreflightError, match=rf"port {port} .* already in use"):
            preflight.check_port(LOOPBACK, port, serves=True, what="the master")


def test_the_serving_node_holds_its_port_open_until_released():
    port = _closed_port()
    node = preflight.Prepared(LOOPBACK, port, preflight.check_port(
        LOOPBACK, port, serves=True, what="the master"))
    preflight.wait_for_port(LOOPBACK, port, what="the master", seconds=0.3)  # the others
    node.release()
    with pytest.raises(preflight.PreflightError, match="nothing listens"):
        preflight.wait_for_port(LOOPBACK, port, what="the master", seconds=0.1)


def test_the_interface_is_set_unless_the_user_chose_one(monkeypatch):
    # set, then deleted: monkeypatch restores (removes) what the call below writes
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "unset")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    assert network.set_collective_interface(LOOPBACK) == {"GLOO_SOCKET_IFNAME": "lo"}
    assert network.os.environ["NCCL_SOCKET_IFNAME"] == "ib0"


@pytest.mark.parametrize(
    ("env", "across"),
    [({}, False),
     ({"MASTER_ADDR": "127.0.0.1", "GROUP_WORLD_SIZE": "1"}, False),  # torchrun, one node
     ({"MASTER_ADDR": "127.0.0.1", "GROUP_WORLD_SIZE": "2"}, True),
     ({"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, True),
     ({"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}, False)],  # by hand, on loopback
)
def test_a_job_across_nodes_is_told_by_its_environment(monkeypatch, env, across):
    for k in ("MASTER_ADDR", "GROUP_WORLD_SIZE", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert preflight.launched_across_nodes() is across


def _config(*, candidate_world: int | None = None, **train):
    raw = copy.deepcopy(TINY)
    raw["train"].update(parallel={"strategy": "ddp", "world_size": 4}, **train)
    if candidate_world:
        raw["train"]["candidates"][1]["parallel"] = {"world_size": candidate_world}
    return parse_config(raw)


def test_node_shape_divides_the_world_over_the_nodes():
    assert node_shape(_config(max_restarts=2), None, num_nodes=2) == (2, 2, 2)
    with pytest.raises(DistmlError, match=r"world_size=4 does not divide over 3 nodes"):
        node_shape(_config(), None, num_nodes=3)


def test_node_shape_refuses_candidates_of_different_world_sizes():
    cfg = _config(candidate_world=2)
    with pytest.raises(DistmlError, match=r"different train.parallel.world_size values \[2, 4\]"):
        node_shape(cfg, None, num_nodes=2)
    assert node_shape(cfg, ["cnn"], num_nodes=2) == (2, 1, 0)


def test_rdzv_conf_parses_as_torchrun_takes_it():
    assert parse_rdzv_conf("") == {}
    assert parse_rdzv_conf("keep_alive_interval=1, join_timeout=60") == {
        "keep_alive_interval": "1", "join_timeout": "60"}
    with pytest.raises(DistmlError, match=r"'join_timeout' is not KEY=VALUE"):
        parse_rdzv_conf("join_timeout")
