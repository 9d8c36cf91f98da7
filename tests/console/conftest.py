"""Fixtures for the console tests: one real `plural serve` process on the tiny model with two
tenants' adapters and a runs folder holding the awkward cases (a log line half-written, a run
without checkpoints, a federated run with DP, a current and an older eval report), and headless
Chromium (Debian's /usr/bin/chromium) driven by Playwright, with every request and console
message recorded.

Set PLURAL_CONSOLE_SCREENSHOTS=DIR to save a PNG of each view there (docs/console.md's images).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

SERVE_TESTS = Path(__file__).resolve().parents[1] / "serve"
sys.path.insert(0, str(SERVE_TESTS))
from server import PLURAL, Server, free_port  # noqa: E402  (tests/serve/server.py: start and stop by PID)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from console_site import ACME_KEY, ADMIN_KEY, ARGS, BETA_KEY, CHROMIUM, SYSTEM_ACME, Watched, write_runs  # noqa: E402,F401


def _serve_fixtures():
    """tests/serve/conftest.py's make_adapter (random non-zero LoRA B), loaded under its own name."""
    spec = importlib.util.spec_from_file_location("serve_test_fixtures", SERVE_TESTS / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def describe(adapter: Path, data: Path) -> None:
    """Give an adapter's manifest what `plural tune` records: its data file's sha256 and metrics."""
    import json

    from plural.store.adapters import MANIFEST, sha256_file
    from plural.store.paths import write_json_atomic

    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}\n')
    man = json.loads((adapter / MANIFEST).read_text())
    man.update(method="sft", data=[{"path": str(data), "sha256": sha256_file(data)}],
               metrics={"train_loss": 1.234, "eval_loss": 1.456, "steps": 40})
    write_json_atomic(adapter / MANIFEST, man)


class ConsoleProcess(Server):
    """`plural console` (not `plural serve`) as the real process under test, in `cwd` (its ./runs)
    and with its own PLURAL_HOME; started, waited for and stopped by PID as tests/serve does."""

    def __init__(self, tmp: Path, settings: dict, cwd: Path, home: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp / "serve.yaml"
        cfg.write_text(yaml.safe_dump(settings))
        self.log = open(tmp / "server.log", "w+")
        cmd = [PLURAL, "console", "--config", str(cfg), "--port", str(self.port)]
        env = {**os.environ, "PLURAL_HOME": str(home), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT, env=env)


def console_home(store: Path, root: Path, stored: Path) -> Path:
    """A store of its own (the session's models, linked) with two stored adapters: `support`, made
    for `tiny`, and `foreign`, whose manifest names another base (so `plural console` leaves it out)."""
    import json
    import shutil

    home = root / "home"
    (home / "adapters").mkdir(parents=True)
    (home / "models").symlink_to(store / "models")
    for name in ("support", "foreign"):
        shutil.copytree(stored, home / "adapters" / name)
    man = json.loads((home / "adapters" / "foreign" / "plural.json").read_text())
    man["base"]["name"] = "some-other-model"
    (home / "adapters" / "foreign" / "plural.json").write_text(json.dumps(man))
    return home


def sign(adapter: Path, home: Path) -> None:
    """A real OpenSSF Model Signing signature (plural adapters sign), with a key made in a home of its own."""
    from plural.share.keys import new_key
    from plural.share.signing import sign_adapter

    old = os.environ.get("PLURAL_HOME")
    os.environ["PLURAL_HOME"] = str(home)
    try:
        new_key("beta-release")
        sign_adapter(adapter, "beta-release")
    finally:
        if old is None:
            os.environ.pop("PLURAL_HOME", None)
        else:
            os.environ["PLURAL_HOME"] = old


@pytest.fixture(scope="session")
def console_server(store, tmp_path_factory):
    fx = _serve_fixtures()
    root = tmp_path_factory.mktemp("console")
    a = fx.make_adapter("tiny", root / "adapters" / "acme-support", seed=1, **fx.ADAPTER_SPECS["qv4"])
    b = fx.make_adapter("tiny", root / "adapters" / "beta-legal", seed=2, **fx.ADAPTER_SPECS["rs2"])
    describe(a, root / "data" / "acme-train.jsonl")
    sign(b, root / "signer-home")
    runs = write_runs(root / "runs")  # found as ./runs of the console's working directory
    settings = {
        "model": "tiny", "adapters": {"acme-support": str(a), "beta-legal": str(b)}, "adapter_dirs": [str(root / "adapters")],
        "admin_key": ADMIN_KEY, "max_batch": 4,
        "api_keys": [{"key": ACME_KEY, "tenant": "acme", "models": ["tiny", "acme-support"]},
                     {"key": BETA_KEY, "tenant": "beta", "models": ["tiny", "beta-legal"]}],
        "system_prompts": {"acme-support": SYSTEM_ACME},
    }
    srv = ConsoleProcess(root, settings, cwd=root, home=console_home(store, root, a)).wait_ready()
    srv.runs = runs
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    assert os.access(CHROMIUM, os.X_OK), "Debian's chromium is missing: apt-get install -y chromium (make test does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def watched(browser, console_server):
    origin = console_server.url
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    page = ctx.new_page()
    w = Watched(page, origin)

    def gate(route):
        url = route.request.url
        w.requests.append(url)
        parts = urlsplit(url)
        if f"{parts.scheme}://{parts.netloc}" == origin or parts.scheme in ("data", "about", "blob"):
            route.continue_()
        else:  # the console must work offline: anything else is recorded and refused
            w.outside.append(url)
            route.abort()

    ctx.route("**/*", gate)
    page.on("console", lambda m: w.errors.append(f"console.{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: w.errors.append(f"pageerror: {e}"))
    yield w
    ctx.close()
    assert w.outside == [], f"requests outside {origin}: {w.outside}"
    assert w.unexpected() == [], w.errors
