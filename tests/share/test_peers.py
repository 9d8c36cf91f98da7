"""The OCI read routes (a plural server as a peer), mounted on a bare FastAPI app served by
uvicorn on 127.0.0.1, pulled from by the real `plural` executable."""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import pytest

from plural.share.oci import OCI_MANIFEST, build_artifact

from .helpers import free_port, plural

KEY = "share-key-123"


@pytest.fixture
def peer(home, signer, adapters):
    import uvicorn
    from fastapi import FastAPI

    from plural.share.oci_routes import PeerShare, SharedAdapter, oci_router

    plural("adapters", "sign", adapters["support"], "--key", "acme", "--version", "3", check=True)
    share = PeerShare(adapters=[SharedAdapter("acme/support", "v1", adapters["support"])], authorize=lambda key: key == KEY)
    app = FastAPI()
    app.include_router(oci_router(share))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and t.is_alive(), "peer did not start"
        time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)


def test_pull_from_peer_with_key_and_trust(home, signer, adapters, peer):
    r = plural("adapters", "pull", f"http://{peer}/acme/support:v1", "--token", KEY, "--trust", signer, "--min-version", "3", check=True)
    assert "signed by acme (version 3)" in r.stdout
    got = home / "adapters" / "support"
    for f in adapters["support"].iterdir():
        assert (got / f.name).read_bytes() == f.read_bytes()
    # The peer serves exactly the artifact a registry push sends.
    h = {"Authorization": f"Bearer {KEY}", "Accept": OCI_MANIFEST}
    m = httpx.get(f"http://{peer}/v2/acme/support/manifests/v1", headers=h)
    art = build_artifact(adapters["support"])
    assert m.content == art.manifest and m.headers["docker-content-digest"] == art.digest
    assert httpx.get(f"http://{peer}/v2/acme/support/manifests/{art.digest}", headers=h).content == art.manifest
    assert httpx.get(f"http://{peer}/v2/acme/support/tags/list", headers=h).json() == {"name": "acme/support", "tags": ["v1"]}


def test_peer_refuses_without_key(home, peer):
    err = plural("adapters", "pull", f"http://{peer}/acme/support:v1", check=False).stderr
    assert "HTTP 401" in err and "--token" in err
    err = plural("adapters", "pull", f"http://{peer}/acme/support:v1", "--token", "wrong", check=False).stderr
    assert "HTTP 401" in err
    r = httpx.get(f"http://{peer}/v2/")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert not (home / "adapters").exists() or not any((home / "adapters").iterdir())


def test_peer_key_from_docker_config(home, signer, peer, tmp_path, monkeypatch):
    cfg = tmp_path / "docker"
    cfg.mkdir()
    auth = base64.b64encode(f"anyone:{KEY}".encode()).decode()
    (cfg / "config.json").write_text(json.dumps({"auths": {peer: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
    plural("adapters", "pull", f"http://{peer}/acme/support:v1", "--trust", signer, check=True)


def test_peer_shares_only_what_it_was_told(home, adapters, peer):
    h = {"Authorization": f"Bearer {KEY}"}
    assert "no such manifest" in plural("adapters", "pull", f"http://{peer}/acme/legal:v1", "--token", KEY, check=False).stderr
    assert "no such manifest" in plural("adapters", "pull", f"http://{peer}/acme/support:v2", "--token", KEY, check=False).stderr
    # A blob of an adapter that is not shared, and a shared blob asked for under another name.
    other = build_artifact(adapters["legal"])
    legal_weights = next(d for d, p in other.blobs.items() if p.name == "adapter_model.safetensors")
    assert httpx.get(f"http://{peer}/v2/acme/support/blobs/{legal_weights}", headers=h).status_code == 404
    mine = next(iter(build_artifact(adapters["support"]).blobs))
    assert httpx.get(f"http://{peer}/v2/acme/legal/blobs/{mine}", headers=h).status_code == 404
    assert httpx.get(f"http://{peer}/v2/acme/support/blobs/{mine}", headers=h).status_code == 200
    assert httpx.get(f"http://{peer}/v2/acme/support/blobs/..%2F..%2Fetc%2Fpasswd", headers=h).status_code in (400, 404)
