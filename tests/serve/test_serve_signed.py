"""`plural serve --require-signed` (issue 16, item 3), peers pulling over `/v2` (item 5) and the
adapter digest in `/v1/models` (item 6), against a real server process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server import Server

PLURAL = str(Path(sys.executable).with_name("plural"))
ADMIN_KEY, SHARE_KEY = "adm-signed-0001", "sh-peer-key-0001"


def plural(*args, env=None):
    return subprocess.run([PLURAL, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def signed(store, tiny_adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signed")
    pub = tmp / "acme.pem"
    r = plural("keys", "new", "acme-serve-test", "--out", pub)
    assert r.returncode == 0, r.stderr
    good = shutil.copytree(tiny_adapters["qv4"], tmp / "good")
    r = plural("adapters", "sign", good, "--key", "acme-serve-test", "--name", "good", "--version", "1")
    assert r.returncode == 0, r.stderr
    allowed = tmp / "allowed"
    allowed.mkdir()
    return tmp, pub, good, allowed


def test_unsigned_adapter_at_start_is_refused(signed, tiny_adapters):
    tmp, pub, good, _ = signed
    cfg = tmp / "start.yaml"
    cfg.write_text(f"model: tiny\nrequire_signed: {pub}\nadapters: {{plain: {tiny_adapters['all8']}}}\n")
    r = subprocess.run([PLURAL, "serve", "--config", str(cfg), "--port", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--require-signed" in r.stderr and "refused" in r.stderr


def test_signed_serving_peers_and_digest(store, signed, tiny_adapters, tmp_path):
    tmp, pub, good, allowed = signed
    settings = {"model": "tiny", "require_signed": str(pub), "adapters": {"good": str(good)}, "adapter_dirs": [str(allowed)],
                "admin_key": ADMIN_KEY, "dtype": "float32", "max_model_len": 128,
                "share": {"keys": [SHARE_KEY], "adapters": {"acme/good:v1": "good"}}}
    srv = Server(tmp_path, settings).wait_ready()
    try:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        # The admin API refuses an unsigned adapter and takes a signed one.
        unsigned = shutil.copytree(tiny_adapters["rs2"], allowed / "unsigned")
        r = httpx.post(srv.url + "/admin/adapters", json={"name": "u", "path": str(unsigned)}, headers=admin)
        assert r.status_code == 400 and "refused" in r.json()["error"]["message"], r.text
        copy = shutil.copytree(good, allowed / "copy")
        r = httpx.post(srv.url + "/admin/adapters", json={"name": "copy", "path": str(copy)}, headers=admin)
        assert r.status_code == 200, r.text
        # A bit flipped after signing: refused.
        flipped = shutil.copytree(good, allowed / "flipped")
        w = flipped / "adapter_model.safetensors"
        data = bytearray(w.read_bytes())
        data[-1] ^= 1
        w.write_bytes(bytes(data))
        r = httpx.post(srv.url + "/admin/adapters", json={"name": "f", "path": str(flipped)}, headers=admin)
        assert r.status_code == 400, r.text

        from plural.share.signing import adapter_digest

        cards = {m["id"]: m for m in httpx.get(srv.url + "/v1/models").json()["data"]}
        assert cards["good"]["plural"]["digest"] == adapter_digest(good)
        assert cards["good"]["plural"]["signer"] and cards["copy"]["plural"]["version"] == "1"
        assert "plural" not in cards["tiny"]

        # Another organisation pulls the shared adapter straight from this server.
        home = tmp_path / "peer_home"  # the peer's own store, which has the same base
        (home / "models").mkdir(parents=True)
        (home / "models" / "tiny").symlink_to(Path(store) / "models" / "tiny")
        r = plural("adapters", "pull", f"http://127.0.0.1:{srv.port}/acme/good:v1", "--token", SHARE_KEY, "--trust", pub,
                   env={"PLURAL_HOME": str(home)})
        assert r.returncode == 0, r.stderr
        pulled = next(p for p in (home / "adapters").iterdir() if not p.name.startswith("."))
        for f in good.iterdir():
            assert (pulled / f.name).read_bytes() == f.read_bytes()
        assert httpx.get(srv.url + "/v2/acme/good/tags/list").status_code == 401
    finally:
        srv.stop()
