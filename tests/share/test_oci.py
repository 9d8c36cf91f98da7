"""Push and pull adapters through a real CNCF distribution registry on 127.0.0.1, and the attacks
on that path: each refused, with nothing installed in the store."""

from __future__ import annotations

import base64
import json
import socket
import threading

import httpx
import pytest

from plural.share.oci import MAX_MANIFEST_BYTES, OCI_MANIFEST

from .helpers import plural
from .test_sign_verify import flip_bit


def sign_and_push(ad, registry, repo_tag: str, version: str = "1") -> str:
    plural("adapters", "sign", ad, "--key", "acme", "--version", version, check=True)
    plural("adapters", "push", ad, f"{registry.host}/{repo_tag}", "--insecure", check=True)
    return f"{registry.host}/{repo_tag}"


def get_manifest(registry, repo: str, ref: str) -> dict:
    r = httpx.get(registry.url(f"/v2/{repo}/manifests/{ref}"), headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200, r.text
    return r.json()


def put_manifest(registry, repo: str, tag: str, body: bytes) -> None:
    r = httpx.put(registry.url(f"/v2/{repo}/manifests/{tag}"), content=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, r.text


def installed(home) -> list[str]:
    """Every entry in the store's adapters folder, hidden temporary folders included."""
    d = home / "adapters"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_push_pull_roundtrip_with_trust(home, signer, adapters, registry, tiny_model):
    ad = adapters["support"]
    ref = sign_and_push(ad, registry, "acme/support:v1", version="2")
    man = get_manifest(registry, "acme/support", "v1")
    # CNCF ModelPack media types; the base named by its fingerprint.
    assert man["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert man["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    layers = {l["annotations"]["org.cncf.model.filepath"]: l for l in man["layers"]}
    assert set(layers) == {"adapter_config.json", "adapter_model.safetensors", "plural.json", "model.sig", "provenance.sig"}
    assert layers["adapter_model.safetensors"]["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"
    assert layers["model.sig"]["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    base_fp = json.loads((ad / "plural.json").read_text())["base"]["fingerprint"]
    assert man["annotations"]["dev.plural.base.fingerprint"] == base_fp
    cfg = httpx.get(registry.url(f"/v2/acme/support/blobs/{man['config']['digest']}")).json()
    assert cfg["modelfs"]["type"] == "layers" and cfg["descriptor"]["name"] == "support"
    # Pushing again is idempotent: same content, same manifest digest.
    plural("adapters", "push", ad, ref, "--insecure", check=True)
    assert get_manifest(registry, "acme/support", "v1") == man

    r = plural("adapters", "pull", ref, "--insecure", "--trust", signer, "--min-version", "2", check=True)
    assert "signed by acme" in r.stdout
    got = home / "adapters" / "support"
    for f in layers:
        assert (got / f).read_bytes() == (ad / f).read_bytes()
    # The pulled adapter is a plain PEFT adapter for the tiny base.
    from plural.store.adapters import attach_adapter
    from plural.store.models import load_model

    model, _, base = load_model(tiny_model)
    assert attach_adapter(model, "support", base=base).peft_config["default"].r == 4
    # By digest, into another name.
    digest = httpx.head(registry.url("/v2/acme/support/manifests/v1"), headers={"Accept": OCI_MANIFEST}).headers["docker-content-digest"]
    plural("adapters", "pull", f"{registry.host}/acme/support@{digest}", "--insecure", "--name", "support2", "--trust", signer, check=True)
    # An existing name is not overwritten without --force.
    assert "already exists" in plural("adapters", "pull", ref, "--insecure", check=False).stderr


def unique_weights(ad, n: int = 16) -> None:
    """Give the adapter weights no other test pushes (the registry shares blobs across repositories)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(ad / "adapter_model.safetensors")
    tensors["base_model.model.padding.lora_A.weight"] = torch.randn(n, n)
    save_file(tensors, ad / "adapter_model.safetensors")


def test_tampered_blob_in_registry_is_refused(home, signer, adapters, registry):
    ad = adapters["support"]
    unique_weights(ad)
    ref = sign_and_push(ad, registry, "acme/tamper:v1")
    layer = next(l for l in get_manifest(registry, "acme/tamper", "v1")["layers"]
                 if l["annotations"]["org.cncf.model.filepath"] == "adapter_model.safetensors")
    flip_bit(registry.blob_file(layer["digest"]))  # the registry's disk, as an attacker holding it would
    err = plural("adapters", "pull", ref, "--insecure", check=False).stderr  # refused even without --trust
    assert "adapter_model.safetensors: blob digest mismatch" in err
    assert installed(home) == []


def test_manifest_pointing_at_another_adapters_blob_is_refused(home, signer, adapters, registry):
    sign_and_push(adapters["support"], registry, "acme/mix:support")
    sign_and_push(adapters["legal"], registry, "acme/mix:legal")
    man = get_manifest(registry, "acme/mix", "support")
    other = {l["annotations"]["org.cncf.model.filepath"]: l for l in get_manifest(registry, "acme/mix", "legal")["layers"]}
    man["layers"] = [other["adapter_model.safetensors"] if l["annotations"]["org.cncf.model.filepath"] == "adapter_model.safetensors" else l
                     for l in man["layers"]]
    put_manifest(registry, "acme/mix", "mixed", json.dumps(man).encode())
    err = plural("adapters", "pull", f"{registry.host}/acme/mix:mixed", "--insecure", "--trust", signer, check=False).stderr
    assert "changed since signing: adapter_model.safetensors" in err
    assert installed(home) == []


def test_rollback_to_older_signed_version_is_refused(home, signer, adapters, registry):
    ad = adapters["support"]
    sign_and_push(ad, registry, "acme/roll:v1", version="1")
    v1 = get_manifest(registry, "acme/roll", "v1")
    sign_and_push(ad, registry, "acme/roll:latest", version="2")
    plural("adapters", "pull", f"{registry.host}/acme/roll:latest", "--insecure", "--trust", signer, "--min-version", "2", "--name", "r2", check=True)
    # The attacker moves `latest` back to the old, validly signed version 1.
    put_manifest(registry, "acme/roll", "latest", json.dumps(v1).encode())
    err = plural("adapters", "pull", f"{registry.host}/acme/roll:latest", "--insecure", "--trust", signer, "--min-version", "2", check=False).stderr
    assert "signed version 1 of 'support' is older than --min-version 2" in err
    assert installed(home) == ["r2"]
    assert "--min-version needs --trust" in plural("adapters", "pull", f"{registry.host}/acme/roll:latest", "--insecure", "--min-version", "2", check=False).stderr


def test_huge_manifest_is_refused(home, signer, adapters, registry):
    sign_and_push(adapters["support"], registry, "acme/huge:v1")
    man = get_manifest(registry, "acme/huge", "v1")
    man["annotations"]["padding"] = "x" * (MAX_MANIFEST_BYTES + 10)
    put_manifest(registry, "acme/huge", "big", json.dumps(man).encode())
    err = plural("adapters", "pull", f"{registry.host}/acme/huge:big", "--insecure", check=False).stderr
    assert "manifest of" in err and "refused (at most 1048576)" in err
    assert installed(home) == []


@pytest.mark.parametrize("evil", ["../../evil.json", "/etc/passwd", "sub/adapter_config.json", ".."])
def test_path_traversal_in_file_names_is_refused(home, signer, adapters, registry, tmp_path, evil):
    sign_and_push(adapters["support"], registry, "acme/trav:v1")
    man = get_manifest(registry, "acme/trav", "v1")
    man["layers"][0]["annotations"]["org.cncf.model.filepath"] = evil
    put_manifest(registry, "acme/trav", "evil", json.dumps(man).encode())
    err = plural("adapters", "pull", f"{registry.host}/acme/trav:evil", "--insecure", check=False).stderr
    assert "is not allowed" in err
    assert installed(home) == [] and not (home / "evil.json").exists() and not (tmp_path / "evil.json").exists()


def test_not_an_adapter_and_bad_references(home, registry):
    assert "no such manifest" in plural("adapters", "pull", f"{registry.host}/acme/none:v1", "--insecure", check=False).stderr
    assert "expected HOST" in plural("adapters", "pull", "justaname", check=False).stderr
    assert "repository" in plural("adapters", "pull", f"{registry.host}/Upper/Case:v1", check=False).stderr
    assert "ConnectError" in plural("adapters", "pull", "127.0.0.1:1/acme/x:v1", "--insecure", check=False).stderr


def test_registry_credentials_from_docker_config(home, signer, adapters, auth_registry, tmp_path, monkeypatch):
    ad = adapters["support"]
    plural("adapters", "sign", ad, "--key", "acme", check=True)
    ref = f"{auth_registry.host}/acme/private:v1"
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nodocker"))
    err = plural("adapters", "push", ad, ref, "--insecure", check=False).stderr
    assert "HTTP 401" in err and "config.json" in err
    cfg = tmp_path / "docker"
    cfg.mkdir()
    auth = base64.b64encode(b"alice:s3cret").decode()
    (cfg / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
    plural("adapters", "push", ad, ref, "--insecure", check=True)
    plural("adapters", "pull", ref, "--insecure", "--trust", signer, check=True)
    assert installed(home) == ["private"]
    (cfg / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": base64.b64encode(b"alice:wrong").decode()}}}))
    assert "HTTP 401" in plural("adapters", "pull", ref, "--insecure", "--name", "p2", check=False).stderr


class CuttingProxy:
    """A TCP relay to the registry that closes the client's connection after `limit` bytes of
    responses: a network failure in the middle of a pull."""

    def __init__(self, upstream: str, limit: int, stall: bool = False) -> None:
        host, port = upstream.split(":")
        self.upstream, self.limit, self.stall = (host, int(port)), limit, stall
        self.stalled = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, up, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, client, self.limit), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: limit - sent])
                    if self.stall:  # hold the connection open, sending nothing more
                        self.stalled.set()
                        self.sock.close()
                        threading.Event().wait(120)
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_interrupted_pull_installs_nothing(home, signer, adapters, registry):
    ad = adapters["support"]
    unique_weights(ad, 1024)  # a weights file of 4 MB, so that the cut falls inside its blob
    sign_and_push(ad, registry, "acme/cut:v1")
    proxy = CuttingProxy(registry.host, limit=2 << 20)
    try:
        err = plural("adapters", "pull", f"{proxy.host}/acme/cut:v1", "--insecure", "--trust", signer, check=False).stderr
    finally:
        proxy.close()
    assert "RemoteProtocolError" in err and "(nothing was installed)" in err
    assert installed(home) == []
    # The same pull straight from the registry then succeeds.
    plural("adapters", "pull", f"{registry.host}/acme/cut:v1", "--insecure", "--trust", signer, check=True)
    assert installed(home) == ["cut"]


def test_pull_killed_midway_installs_nothing(home, signer, adapters, registry):
    """SIGKILL while a blob streams: no cleanup code runs, and still no adapter appears."""
    import os
    import signal
    import subprocess
    import time

    from .helpers import PLURAL

    ad = adapters["support"]
    unique_weights(ad, 1024)
    sign_and_push(ad, registry, "acme/kill:v1")
    proxy = CuttingProxy(registry.host, limit=2 << 20, stall=True)
    proc = subprocess.Popen([PLURAL, "adapters", "pull", f"{proxy.host}/acme/kill:v1", "--insecure", "--trust", str(signer)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert proxy.stalled.wait(60), "the pull never reached the weights blob"
        deadline = time.time() + 10
        while not any(n.startswith(".kill.tmp-") for n in installed(home)):
            assert time.time() < deadline, installed(home)
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [n for n in installed(home) if not n.startswith(".")] == []
    assert "not found" in plural("adapters", "show", "kill", check=False).stderr
    assert "no adapters" in plural("adapters", "list", check=True).stdout
    plural("adapters", "pull", f"{registry.host}/acme/kill:v1", "--insecure", "--trust", signer, check=True)
    assert "kill" in installed(home)
