"""Fixtures for the sharing tests.

- `home`: a PLURAL_HOME of the test's own (keys, adapters) whose `models` is the session store's,
  so the provenance's base (the tiny model) is in the store.
- `real_adapters`: two real PEFT LoRA adapters on the tiny model (different seeds), made once.
- `registry`: CNCF distribution (`/usr/bin/docker-registry`) on 127.0.0.1 with a temporary
  config and storage, started per module and stopped by PID.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .helpers import free_port, make_adapter, plural

@pytest.fixture(scope="session")
def real_adapters(store, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("share_adapters")
    return {name: make_adapter("tiny", root / name, seed=i + 1) for i, name in enumerate(["support", "legal"])}


@pytest.fixture
def home(store, tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    (h / "models").symlink_to(Path(store) / "models", target_is_directory=True)
    monkeypatch.setenv("PLURAL_HOME", str(h))
    return h


@pytest.fixture
def adapters(real_adapters, tmp_path) -> dict[str, Path]:
    """Fresh copies of the real adapters, for the test to sign, tamper with, push."""
    out = {}
    for name, src in real_adapters.items():
        out[name] = tmp_path / "work" / name
        shutil.copytree(src, out[name])
    return out


@pytest.fixture
def signer(home, tmp_path) -> Path:
    """A key `acme` in the test's home; returns its public PEM."""
    pub = tmp_path / "acme.pub.pem"
    plural("keys", "new", "acme", "--out", pub, check=True)
    return pub


@dataclass
class RegistryProc:
    host: str
    root: Path  # the registry's storage, to tamper with as an attacker holding the server would
    proc: subprocess.Popen

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"


def start_registry(d: Path, auth: str = "") -> RegistryProc:
    exe = Path("/usr/bin/docker-registry")
    assert exe.is_file(), "CNCF distribution is missing: make test installs it (apt-get install docker-registry)"
    port = free_port()
    (d / "config.yml").write_text(
        "version: 0.1\n"
        "log: {level: error}\n"
        f"storage: {{filesystem: {{rootdirectory: {d / 'data'}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n" + auth
    )
    log = open(d / "registry.log", "wb")
    proc = subprocess.Popen([str(exe), "serve", str(d / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    host = f"127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            if httpx.get(f"http://{host}/v2/", timeout=1).status_code in (200, 401):
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (d / "registry.log").read_text()
        assert time.time() < deadline, "registry did not start"
        time.sleep(0.1)
    return RegistryProc(host=host, root=d / "data", proc=proc)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> RegistryProc:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    stop(reg.proc)


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory) -> RegistryProc:
    """A registry that wants Basic credentials (htpasswd, bcrypt): user `alice`, password `s3cret`."""
    import bcrypt

    d = tmp_path_factory.mktemp("auth_registry")
    (d / "htpasswd").write_text("alice:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode() + "\n")
    reg = start_registry(d, f"auth: {{htpasswd: {{realm: plural-test, path: {d / 'htpasswd'}}}}}\n")
    yield reg
    stop(reg.proc)
