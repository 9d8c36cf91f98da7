"""A damaged adapter folder is named in one line by every command that loads adapters, through the
real `plural` executable (issue 11, item 5): no SafetensorError or PEFT TypeError traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PLURAL = str(Path(sys.executable).with_name("plural"))


@pytest.fixture(scope="module")
def good_adapter(store, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model

    from plural.store.adapters import build_manifest, save_adapter
    from plural.store.models import load_model

    model, _, stored = load_model("tiny")
    torch.manual_seed(0)
    lora = dict(r=2, lora_alpha=4, target_modules=["q_proj"])
    return save_adapter(get_peft_model(model, LoraConfig(**lora)), tmp_path_factory.mktemp("a") / "good",
                        build_manifest(stored, "sft", lora))


@pytest.mark.parametrize("damage, says", [
    ("truncate", "adapter_model.safetensors: damaged or truncated safetensors file"),
    ("config_list", "adapter_config.json: must be a JSON object"),
])
def test_generate_names_a_damaged_adapter(good_adapter, tmp_path, damage, says):
    bad = shutil.copytree(good_adapter, tmp_path / "bad")
    if damage == "truncate":
        w = bad / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[:40])
    else:
        (bad / "adapter_config.json").write_text(json.dumps([1, 2]))
    r = subprocess.run([PLURAL, "generate", "--model", "tiny", "--adapter", str(bad), "hi"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert says in " ".join(r.stderr.split())
