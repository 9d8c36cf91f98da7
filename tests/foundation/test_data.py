"""Record checks, chat rendering and loss masks, packing."""

from __future__ import annotations

import json

import pytest
import torch

from plural.data.chat import IGNORE, encode_chat, encode_text
from plural.data.check import check_file
from plural.data.packing import collate, pack
from plural.data.records import load_records, read_records
from plural.errors import PluralError
from plural.store.models import load_model, load_tokenizer

from .helpers import write_jsonl


def test_assistant_tokens_trained_with_end_of_turn(tiny_model):
    tok = load_tokenizer(tiny_model)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Bye."},
    ]
    e = encode_chat(tok, msgs)
    trained = tok.decode([t for t, l in zip(e.input_ids, e.labels) if l != IGNORE])
    assert trained == "Hello!<|im_end|>\nBye.<|im_end|>\n"
    # the prompt (system, user turns, assistant headers) carries no loss
    masked = tok.decode([t for t, l in zip(e.input_ids, e.labels) if l == IGNORE])
    assert "Hi there" in masked and "Be brief." in masked and "Hello" not in masked
    # the rendered ids are exactly the template's tokenization (what inference sees)
    ref = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert e.input_ids == list(ref)


def test_weight_zero_masks_a_turn(tiny_model):
    tok = load_tokenizer(tiny_model)
    msgs = [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "first answer", "weight": 0},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "second answer"},
    ]
    e = encode_chat(tok, msgs)
    assert tok.decode([t for t, l in zip(e.input_ids, e.labels) if l != IGNORE]) == "second answer<|im_end|>\n"


def test_text_records_train_every_token_and_end_with_eos(tiny_model):
    tok = load_tokenizer(tiny_model)
    e = encode_text(tok, "Guten Morgen, Freiburg.")
    assert e.labels == e.input_ids and e.input_ids[-1] == tok.eos_token_id


def test_packing_has_no_attention_across_examples(tiny_model):
    """Logits of each example inside a packed row equal its logits when run alone."""
    model, tok, _ = load_model(tiny_model)
    msgs = lambda i: [{"role": "user", "content": f"question {i} " * (i + 1)}, {"role": "assistant", "content": f"answer {i}"}]
    encs = [encode_chat(tok, msgs(i)) for i in range(4)]
    rows = pack(encs, max_length=sum(len(e) for e in encs[:3]) + 2)
    assert len(rows) >= 2 and any(len(set(r.position_ids)) < len(r.position_ids) for r in rows)  # something was packed
    batch = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        # use_cache=False as in training: transformers derives the block-diagonal mask from
        # position resets only when no KV cache is in play.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for k, r in enumerate(rows):
            starts = [i for i, p in enumerate(r.position_ids) if p == 0] + [len(r)]
            for s, t in zip(starts, starts[1:]):
                alone = model(input_ids=batch["input_ids"][k:k + 1, s:t]).logits[0]
                torch.testing.assert_close(packed[k, s:t], alone, atol=1e-4, rtol=1e-4)
    # and the first token of each packed example is never a target
    for r in rows:
        for i, p in enumerate(r.position_ids):
            if p == 0:
                assert r.labels[i] == IGNORE


def test_flat_micro_batch_gives_the_padded_loss_and_gradient(tiny_model):
    """A micro-batch of short rows laid out as one row (collate's flat_max) trains exactly as the
    padded batch: same loss sum, same token count, same LoRA gradient; over the limit it pads."""
    from plural.data.packing import unpacked
    from plural.tune.loop import TokenLoss

    model, tok, _ = load_model(tiny_model)
    from peft import LoraConfig as PeftLora, get_peft_model

    model = get_peft_model(model, PeftLora(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    msgs = lambda i: [{"role": "user", "content": f"question {i} " * (3 * i + 1)}, {"role": "assistant", "content": f"answer {i} " * (i + 1)}]
    rows = unpacked([encode_chat(tok, msgs(i)) for i in range(4)])
    assert len({len(r) for r in rows}) == 4  # unequal lengths: the padded batch has padding
    loss = TokenLoss(model)
    out = {}
    for name, limit in (("padded", 0), ("flat", sum(len(r) for r in rows))):
        b = collate(rows, tok.pad_token_id, limit)
        assert b["input_ids"].shape[0] == (1 if limit else 4)
        total, n = loss(**b)
        total.backward()
        out[name] = (float(total.detach()), int(n), [p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad(set_to_none=True)
    assert out["padded"][1] == out["flat"][1] > 0
    assert out["flat"][0] == pytest.approx(out["padded"][0], rel=1e-5)
    for a, f in zip(out["padded"][2], out["flat"][2]):
        torch.testing.assert_close(f, a, atol=1e-5, rtol=1e-4)
    assert collate(rows, tok.pad_token_id, sum(len(r) for r in rows) - 1)["input_ids"].shape[0] == 4


def test_pack_is_first_fit_and_keeps_every_token():
    from plural.data.chat import Encoded

    encs = [Encoded(list(range(n)), list(range(n))) for n in (5, 3, 4, 2, 6)]
    rows = pack(encs, 8)
    # first-fit-decreasing: 6 -> A, 5 -> B, 4 -> C, 3 -> B (fills it), 2 -> A (fills it)
    assert sorted(len(r) for r in rows) == [4, 8, 8]
    assert sum(len(r) for r in rows) == 20


def _categories(issues):
    return {(i.line, i.category) for i in issues}


def test_check_reports_every_category_with_line_numbers(tmp_path, tiny_model):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [
        good,                                                                          # 1 ok
        "{not json",                                                                   # 2
        {"messages": "hello"},                                                         # 3 schema
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 4
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},   # 5
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]},  # 6
        {"messages": [{"role": "user", "content": "q"}]},                              # 7
        {"messages": [{"role": "user", "content": "q " * 400}, {"role": "assistant", "content": "ok"}]},  # 8 too long
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},  # 9
        good,                                                                          # 10 duplicate of 1
    ]
    p = write_jsonl(tmp_path / "bad.jsonl", lines)
    rep = check_file(p, load_tokenizer(tiny_model), max_length=64)
    cats = _categories(rep.issues)
    for expected in [(2, "not-json"), (3, "schema"), (4, "unknown-role"), (5, "role-order"), (6, "empty-content"),
                     (7, "last-turn"), (8, "too-long"), (9, "no-trainable-tokens"), (10, "duplicate")]:
        assert expected in cats, (expected, cats)
    assert rep.records == 2  # lines 1 and 8 parse cleanly (8 is too long, but a valid record)
    assert all("messages" in i.message or i.line != 3 for i in rep.issues)


def test_preference_records(tmp_path):
    p = write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": "Say hi", "chosen": "Hello.", "rejected": "Go away."},
        {"messages": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hey"}], "rejected": "No"},
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"prompt": "x", "chosen": "a"},
    ])
    kind, recs, issues = read_records(p)
    assert kind == "preference" and [r.line for r in recs] == [1, 2]
    assert _categories(issues) == {(3, "duplicate"), (4, "schema")}


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b"\xef\xbb\xbf" + json.dumps({"text": "hallo"}).encode() + b"\n", None),
    (json.dumps({"text": "ok"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n', "UTF-8"),
])
def test_file_level_problems(tmp_path, content, needle):
    p = tmp_path / "f.jsonl"
    p.write_bytes(content)
    if needle == "empty":
        with pytest.raises(PluralError, match="empty"):
            read_records(p)
        return
    kind, recs, issues = read_records(p)
    if needle is None:  # a BOM is a warning, the record is read
        assert kind == "text" and len(recs) == 1 and issues[0].category == "encoding" and issues[0].severity == "warning"
    else:
        assert (2, "encoding") in _categories(issues) and needle in issues[0].message


def test_directory_and_huge_line(tmp_path):
    with pytest.raises(PluralError, match="is a directory"):
        read_records(tmp_path)
    p = tmp_path / "huge.jsonl"
    with open(p, "wb") as f:
        f.write(json.dumps({"text": "ok"}).encode() + b"\n")
        f.write(b'{"text": "' + b"a" * (50 * 2**20) + b'"}\n')
    kind, recs, issues = read_records(p)
    assert len(recs) == 1 and (2, "line-too-large") in _categories(issues)
    with pytest.raises(PluralError, match=r"huge.jsonl:2: error \[line-too-large\]"):
        load_records(p)


def test_mixed_adapter_generation_gives_each_rows_own_answer(tiny_model):
    """generate(adapter_names=...): one batch with base and adapter rows (the demo's comparison)
    answers each row as a separate base-only or adapter-only generation does."""
    from peft import LoraConfig as PeftLora, get_peft_model

    from plural.generation import generate

    model, tok, _ = load_model(tiny_model)
    torch.manual_seed(0)
    model = get_peft_model(model, PeftLora(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)).eval()
    qs = ["Where is my parcel?", "Wie lange dauert die Lieferung nach Wien?"]
    with model.disable_adapter():
        base = generate(model, tok, qs, max_new_tokens=12)
    tuned = generate(model, tok, qs, max_new_tokens=12)
    assert base != tuned  # the adapter changes the answers, so a mix-up would show
    both = generate(model, tok, qs + qs, max_new_tokens=12, batch_size=4, adapter_names=["__base__"] * 2 + ["default"] * 2)
    assert both == base + tuned
    with pytest.raises(ValueError, match="3 names for 2 prompts"):
        generate(model, tok, qs, adapter_names=["default"] * 3)
