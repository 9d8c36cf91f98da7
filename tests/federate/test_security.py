"""TLS and SuperNode authentication on loopback, with real flower-superlink/supernode processes."""

from __future__ import annotations

import time

import pytest

from plural.federate.launcher import LocalFederation, online_nodes, wait_for_nodes
from plural.federate.security import make_node_key, make_tls, register_node

pytestmark = pytest.mark.e2e


def test_tls_and_supernode_auth_admit_only_registered_nodes(tmp_path):
    tls = make_tls(tmp_path / "tls", ["127.0.0.1", "localhost"])
    good_key, good_pub = make_node_key(tmp_path / "keys", "clinic")
    bad_key, _ = make_node_key(tmp_path / "keys", "intruder")
    for org in ("clinic", "intruder"):
        (tmp_path / org).mkdir()
        (tmp_path / org / "train.jsonl").write_text("")
    fed = LocalFederation(tmp_path / "flower", tls=tls, node_auth=True)
    try:
        fed.start_superlink()
        client = fed.client()  # Control API over TLS, verified with ca.pem
        assert register_node(client, good_pub, "clinic") > 0
        fed.start_node("clinic", tmp_path / "clinic", auth_key=good_key)
        fed.start_node("intruder", tmp_path / "intruder", auth_key=bad_key)
        wait_for_nodes(client, 1, 90, fed.alive)
        time.sleep(3)
        assert online_nodes(client) == 1
    finally:
        fed.stop()
    link_log = (tmp_path / "flower" / "logs" / "superlink.log").read_text()
    assert "insecure" not in link_log.lower()  # served over TLS only
    assert "No SuperNode found with the given public key" in link_log  # the intruder was refused
