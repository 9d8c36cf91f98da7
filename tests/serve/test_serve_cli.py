"""`plural serve` options that fail before any model loads, and value profiles as system prompts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from plural.cli.serve import profile_prompts
from plural.errors import PluralError
from plural.serve.settings import load_settings

PLURAL = str(Path(sys.executable).with_name("plural"))
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "values"


def run(*args, cwd=None):
    return subprocess.run([PLURAL, "serve", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_public_bind_without_keys_is_refused():
    r = run("--host", "0.0.0.0")
    assert r.returncode == 1 and "without API keys the server binds 127.0.0.1 only" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_flags_and_config_are_named(tmp_path):
    r = run("--adapter", "legal")
    assert r.returncode == 1 and "--adapter 'legal': expected NAME=PATH" in r.stderr
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("max_batch: 4\nmax_bach: 8\n")
    r = run("--config", str(cfg))
    assert r.returncode == 1 and "max_bach: unknown key" in r.stderr


def test_settings_merge_cli_over_file(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("port: 9000\nsystem_prompts: {a: from-file, b: kept}\n")
    s = load_settings(cfg, port=None, system_prompts={"a": "from-cli"})
    assert s.port == 9000 and s.system_prompts == {"a": "from-cli", "b": "kept"}
    with pytest.raises(PluralError, match="binds 127.0.0.1 only"):
        load_settings(None, host="10.0.0.1").check_binding()
    load_settings(None, host="10.0.0.1", api_keys=[{"key": "sk-12345678", "tenant": "t"}]).check_binding()


def test_profile_becomes_the_models_system_prompt():
    from plural.values.profile import load_profile

    path = EXAMPLES / "es-consumer.yaml"
    prompts = profile_prompts({"clara": str(path)})
    assert prompts == {"clara": load_profile(path).system_prompt()}
    assert "Telecom Clara" in prompts["clara"]
