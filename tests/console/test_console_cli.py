"""`plural console` as a real process: the stored models made for the base, the runs folder, the
page's address; and its one-line errors."""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest
from console_site import ADMIN_KEY, write_runs
from server import PLURAL, free_port

pytestmark = pytest.mark.e2e


def test_plural_console_serves_stored_adapters_and_runs(console_server):
    """The session's server is `plural console --config serve.yaml` in a folder holding ./runs."""
    out = console_server.output()
    assert f"console http://127.0.0.1:{console_server.port}/console" in out and "1 stored adapter(s)" in out
    page = httpx.get(console_server.url + "/console")
    assert page.status_code == 200 and "<title>plural console</title>" in page.text
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    # the config's adapters, plus the stored one made for tiny; not the one made for another base
    assert [m["id"] for m in httpx.get(console_server.url + "/v1/models", headers=admin).json()["data"]] == \
        ["tiny", "acme-support", "beta-legal", "support"]
    listed = httpx.get(console_server.url + "/console/api/runs", headers=admin).json()
    assert listed["runs_dir"] == str(console_server.runs)
    assert {r["id"] for r in listed["runs"]} == {"support-sft", "legal-dpo", "consortium"}


def test_keyless_server_shows_runs_to_every_caller(tiny_model, tmp_path):
    """Without API keys (a loopback-only server, `plural console`'s default) runs need no key, as /metrics."""
    from fastapi.testclient import TestClient

    from plural.serve.app import create_app
    from plural.serve.settings import ServeSettings

    write_runs(tmp_path / "runs")
    app = create_app(ServeSettings(model=tiny_model, runs_dir=str(tmp_path / "runs"), max_batch=1))
    c = TestClient(app)
    assert c.get("/console/api/whoami").json() == {"tenant": "local", "admin": False, "runs": True,
                                                     "runs_dir": str(tmp_path / "runs"), "base": "tiny"}
    assert len(c.get("/console/api/runs").json()["runs"]) == 3
    assert c.get("/console/api/auth").json() == {"keys_required": False}


def test_plural_console_unknown_model_is_one_line(store, tmp_path):
    r = subprocess.run([PLURAL, "console", "--model", "no-such-model", "--port", str(free_port())],
                       capture_output=True, text=True, env={**os.environ, "PLURAL_HOME": str(store)}, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error:") and "no-such-model" in lines[-1], r.stderr


def test_bad_runs_dir_setting_names_the_key(tmp_path):
    from plural.errors import PluralError
    from plural.serve.settings import load_settings

    cfg = tmp_path / "serve.yaml"
    cfg.write_text("runs_dir: [1, 2]\n")
    with pytest.raises(PluralError, match="runs_dir"):
        load_settings(cfg)
