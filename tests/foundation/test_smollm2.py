"""Integration on the real SmolLM2-135M-Instruct: generate, train a few steps, save, reload."""

from __future__ import annotations

import json

import pytest
import torch

from plural.generation import generate, load_for_inference
from plural.store.models import get_model, load_model

pytestmark = pytest.mark.integration


def test_generate_uses_template_and_stops_at_end_of_turn(smollm2):
    model, tok, _ = load_model(smollm2)
    out = generate(model, tok, ["What is the capital of France? Answer in one sentence."], max_new_tokens=48)[0]
    assert "Paris" in out
    # it stopped by itself: the answer is shorter than the token budget and ends the turn
    ids = tok(out, add_special_tokens=False)["input_ids"]
    assert len(ids) < 48


def test_train_save_reload_identical(tmp_path, smollm2):
    """A few steps on the Velora data: loss falls; plain PEFT reloads the adapter to identical logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from plural import tune
    from plural.cli.tune import load_tune_config

    # 16 training and 4 held-out examples of the demo's data: the 8 steps see each once, and the
    # end-of-run losses (base and adapter, train and held-out) stay cheap
    support = __import__("pathlib").Path("examples/support")
    for name, n in (("train.jsonl", 16), ("eval.jsonl", 4)):
        (tmp_path / name).write_text("".join((support / name).read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    cfg = load_tune_config(support / "tune.yaml", [
        f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}",
        "data.max_length=256", "train.max_steps=8", "train.batch_size=2", "train.lr=2e-3",
        "train.save_every=0", "train.warmup_ratio=0", "train.precision=fp32", "data.replay=0", f"output={tmp_path / 'run'}",
    ])
    adapter = tune.run(cfg)
    hist = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first, last = sum(h["loss"] for h in hist[:2]) / 2, sum(h["loss"] for h in hist[-2:]) / 2
    assert last < first * 0.8, hist

    # plain PEFT, no plural code: base from its store folder + the adapter folder
    base = AutoModelForCausalLM.from_pretrained(get_model(smollm2).path, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(adapter)).eval()
    ours, tok, _ = load_for_inference(smollm2, adapter)
    ids = tok("Velora here! Our workshop", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = plain(ids).logits, ours(ids).logits
        with ours.disable_adapter():
            c = ours(ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-3  # the adapter changes the model
