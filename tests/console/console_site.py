"""The console tests' site: keys, the runs folder they read, and a watched browser page."""

from __future__ import annotations

import json
import os
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ADMIN_KEY = "adm-console-0123456789"
ACME_KEY = "sk-acme-0123456789"
BETA_KEY = "sk-beta-0123456789"
SYSTEM_ACME = "You answer as ACME's support desk, briefly and politely."


def write_runs(root: Path) -> Path:
    """A runs folder as plural tune / federate / eval leave it, with the bad cases the console must show."""
    from plural.evaluate.report import write_report

    # A training run being written: complete steps, then a line cut short; no checkpoints yet.
    live = root / "support-sft"
    live.mkdir(parents=True)
    (live / "config.yaml").write_text("method: sft\nmodel: tiny\noutput: runs/support-sft\ntrain:\n  lr: 0.0002\n  eval_every: 2\n")
    lines = [json.dumps({"step": s, "loss": round(2.5 - 0.2 * s, 4), "lr": 2e-4, "tokens": 512, "input_tokens": 600,
                         **({"eval_loss": round(2.6 - 0.15 * s, 4)} if s % 2 == 0 else {})}) for s in range(1, 7)]
    (live / "log.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 7, "loss": 1.0')

    # A finished run with checkpoints and its adapter.
    done = root / "legal-dpo"
    (done / "checkpoints" / "step-0000002").mkdir(parents=True)
    (done / "checkpoints" / "step-0000002" / "state.json").write_text('{"step": 2, "history": [], "world_size": 1}')
    (done / "adapter").mkdir()
    (done / "config.yaml").write_text("method: dpo\nmodel: tiny\n")
    (done / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.7 - 0.1 * s}) + "\n" for s in (1, 2, 3)))

    # A federated run with differential privacy, two rounds (the records federate/server.py writes).
    fed = root / "consortium"
    (fed / "checkpoints" / "round-0002").mkdir(parents=True)
    (fed / "checkpoints" / "round-0002" / "state.json").write_text('{"round": 2}')
    (fed / "config.yaml").write_text("model: tiny\nrounds: 3\nstrategy: exact\n")
    recs = []
    for rnd, eps in ((1, 1.25), (2, 1.9)):
        nodes = [{"node": 10 + i, "org": org, "tokens": 1000 * (i + 1), "train_loss": 2.0 - 0.1 * rnd - 0.05 * i,
                  "bytes_received": 40000, "bytes_sent": 41000, "eval_loss_global": 2.2 - 0.1 * rnd}
                 for i, org in enumerate(("clinic-a", "clinic-b"))]
        recs.append({"event": "round", "round": rnd, "rounds": 3, "lr": 1e-3, "nodes": nodes, "failed": [],
                     "seconds": 3.5, "privacy": {"epsilon": eps, "delta": 1e-5, "rdp_order": 8}})
    (fed / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    # An eval report in today's format (written by the real writer) ...
    metric = {"name": "accuracy", "higher_is_better": True,
              "values": {v: {"value": x, "lo": x - 0.05, "hi": x + 0.05, "n": 20} for v, x in (("base", 0.40), ("acme-support", 0.70))},
              "diffs": {"acme-support": {"value": 0.30, "lo": 0.12, "hi": 0.45, "n": 20, "significant": True, "better": True}}}
    bpb = {"name": "bits_per_byte", "higher_is_better": False,
           "values": {v: {"value": x, "lo": x - 0.1, "hi": x + 0.1, "n": 20} for v, x in (("base", 1.10), ("acme-support", 1.30))},
           "diffs": {"acme-support": {"value": 0.20, "lo": 0.05, "hi": 0.33, "n": 20, "significant": True, "better": False}}}
    report = {
        "plural_version": "0.1.0", "created": "2026-11-30T10:00:00Z", "model": {"name": "tiny", "fingerprint": "sha256:" + "0" * 64},
        "reference": "base",
        "variants": [{"name": "base", "adapter": None, "sha256": None, "method": None},
                     {"name": "acme-support", "adapter": "/srv/a", "sha256": "sha256:" + "1" * 64, "method": "sft"}],
        "bootstrap": {"resamples": 200, "seed": 0, "confidence": 0.95, "method": "percentile"}, "config": {},
        "seconds": {"load": 1.0, "total": 4.0},
        "suites": [
            {"name": "support-qa", "kind": "qa", "path": "support_qa.jsonl", "items": 20, "metrics": [metric],
             "samples": [{"prompt": "When does the shop open on Saturday?", "reference": "9", "outputs": {"base": "x", "acme-support": "9"}, "scores": {}}]},
            {"name": "multilingual", "kind": "perplexity", "path": "m.jsonl", "items": 20, "metrics": [bpb], "samples": []},
        ],
    }
    write_report(report, root / "support-sft" / "eval")
    # ... and one from an older plural: no version, no reference, metrics without differences.
    old = root / "old-eval"
    old.mkdir()
    (old / "report.json").write_text(json.dumps({"model": "tiny", "suites": [
        {"name": "support-qa", "metrics": [{"name": "accuracy", "values": {"base": 0.4}}]}]}))
    return root


class Watched:
    """A page with everything it asked for and everything it complained about."""

    def __init__(self, page, origin: str):
        self.page, self.origin = page, origin
        self.requests: list[str] = []
        self.outside: list[str] = []
        self.errors: list[str] = []
        self.expected: list[str] = []  # console messages a test provokes on purpose (Chromium logs every 4xx)

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(x in e for x in self.expected)]

    def open(self, key: str | None, view: str = "compare"):
        """Load the console, type the key into its form, go to a view."""
        self.page.goto(f"{self.origin}/console#/{view}")
        if key is not None:
            self.page.fill("#key-input", key)
            self.page.click("#key-form button")
        self.page.wait_for_selector("#who-text:not(:empty)")
        return self.page

    def shot(self, name: str) -> None:
        out = os.environ.get("PLURAL_CONSOLE_SCREENSHOTS")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(out) / f"console-{name}.png"), full_page=True)
