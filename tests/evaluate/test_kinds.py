"""Suite kinds on tiny models, against hand-computed values.

The uniform model gives every token probability 1/V, so every log-likelihood is
-(number of scored tokens) x ln V and bits per byte = log2(V) x tokens / bytes.
"""

import math

import pytest
import torch

from plural.data.chat import IGNORE, encode_chat
from plural.errors import PluralError
from plural.evaluate.kinds import score_choice, score_preference, score_qa
from plural.evaluate.scoring import Scorer
from plural.evaluate.suites import get_kind, load_suite

DE = "Die Stadtbibliothek öffnet um neun Uhr, doch die ersten Besucher warten schon auf den Stufen."
EN = "The town library opens at nine, but the first visitors are already waiting on the steps. " * 3


@pytest.fixture(scope="module")
def uniform(uniform_model):
    from plural.store.models import load_model

    model, tok, _ = load_model(uniform_model)
    return model, tok


def test_uniform_model_bits_per_byte_is_log2_vocab_times_tokens_over_bytes(uniform, tmp_path, write_jsonl):
    model, tok = uniform
    V = model.config.vocab_size
    f = write_jsonl(tmp_path / "t.jsonl", [{"suite": {"kind": "perplexity"}}, {"text": EN, "lang": "en"}, {"text": DE, "lang": "de"}])
    suite = load_suite(f)
    # max_length 16 forces the English text through several rolling windows
    res = get_kind("perplexity").score(Scorer(model, tok, max_length=16, batch_tokens=64), suite)
    n_en, n_de = len(tok(EN, add_special_tokens=False)["input_ids"]), len(tok(DE, add_special_tokens=False)["input_ids"])
    b_en, b_de = len(EN.encode()), len(DE.encode())
    assert n_en > 16
    want = math.log2(V) * (n_en + n_de) / (b_en + b_de)
    m = res.metrics["bpb"]
    assert sum(m.num) / sum(m.den) == pytest.approx(want, rel=1e-6)
    de = res.metrics["bpb/de"]
    assert sum(de.num) / sum(de.den) == pytest.approx(math.log2(V) * n_de / b_de, rel=1e-6)
    assert not res.metrics["bpb"].higher_is_better


def test_rolling_windows_predict_every_token_once(uniform):
    model, tok = uniform
    sc = Scorer(model, tok, max_length=8)
    ids = list(range(100, 131))
    reqs = sc.rolling_requests(ids)
    assert [t for _, c in reqs for t in c] == ids
    for ctx, cont in reqs:
        assert len(ctx) + len(cont) - 1 <= 8  # the model input fits
        assert len(ctx) >= 1


def test_chat_perplexity_scores_only_the_assistant_turns(uniform, tmp_path, write_jsonl):
    model, tok = uniform
    msgs = [{"role": "user", "content": "Hallo, wann habt ihr offen?"}, {"role": "assistant", "content": "Montag bis Samstag."},
            {"role": "user", "content": "Und sonntags?"}, {"role": "assistant", "content": "Sonntags ist geschlossen."}]
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    res = get_kind("perplexity").score(Scorer(model, tok), load_suite(f, kind="perplexity"))
    n_trained = sum(1 for x in encode_chat(tok, msgs).labels if x != IGNORE)
    n_bytes = len("Montag bis Samstag.".encode()) + len("Sonntags ist geschlossen.".encode())
    assert res.metrics["bpb"].num[0] == pytest.approx(math.log2(model.config.vocab_size) * n_trained, rel=1e-6)
    assert res.metrics["bpb"].den[0] == n_bytes


def test_batched_loglikelihood_equals_one_at_a_time_and_a_plain_forward(tiny_model):
    from plural.store.models import load_model

    model, tok, _ = load_model(tiny_model)
    texts = [("Question: capital of France?\nAnswer:", " Paris"), ("Hi", " there, how are you today my friend?"),
             ("A much longer context that goes on and on about nothing in particular", " end")]
    batched = Scorer(model, tok, batch_tokens=4096)
    single = Scorer(model, tok, batch_tokens=1)  # one row per forward
    reqs = [batched.split_pair(c, x) for c, x in texts]
    a, b = batched.loglikelihood(reqs), single.loglikelihood(reqs)
    for (ctx, cont), x, y in zip(reqs, a, b):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        ref = sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
        assert x.logprob == pytest.approx(ref, abs=1e-4)
        assert y.logprob == pytest.approx(x.logprob, abs=1e-4)
        assert x.tokens == len(cont)
    assert batched.loglikelihood(reqs) == a  # same inputs, identical numbers


def test_choice_acc_and_acc_norm_by_hand(uniform, tmp_path, write_jsonl):
    model, tok = uniform
    sc = Scorer(model, tok)
    short, long = "a", "hello world, hello world"
    n_s, n_l = (len(tok(" " + c, add_special_tokens=False)["input_ids"]) for c in (short, long))
    assert n_s < n_l and n_s / len(short) > n_l / len(long)
    f = write_jsonl(tmp_path / "ch.jsonl", [{"context": "Pick:", "choices": [short, long], "answer": 1}])
    res = score_choice(sc, load_suite(f, kind="choice"))
    # uniform: log p = -n ln V, so the choice with fewer tokens wins on acc, fewer tokens per byte on acc_norm
    assert res.metrics["acc"].num == [0.0]
    assert res.metrics["acc_norm"].num == [1.0]


def test_preference_margin_by_hand(uniform, tmp_path, write_jsonl):
    model, tok = uniform
    sc = Scorer(model, tok)
    chosen, rejected = "Sonntags ist geschlossen.", "Ja."
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Sonntag?", "chosen": chosen, "rejected": rejected}])
    res = score_preference(sc, load_suite(f, kind="preference"))

    def n_answer(ans):  # answer tokens with the end-of-turn token, from the chat mask
        msgs = [{"role": "user", "content": "Sonntag?"}, {"role": "assistant", "content": ans}]
        labels = encode_chat(tok, msgs).labels
        return sum(1 for x in labels if x != IGNORE) - 1  # the mask also trains the newline after <|im_end|>

    lnV = math.log(model.config.vocab_size)
    assert res.metrics["margin"].num[0] == pytest.approx(-(n_answer(chosen) - n_answer(rejected)) * lnV, rel=1e-6)
    assert res.metrics["accuracy"].num == [0.0]  # more tokens -> lower likelihood under the uniform model


class _FixedAnswers:
    """A scorer stand-in that 'generates' fixed answers, to check qa scoring alone."""

    def __init__(self, answers):
        self.answers = answers

    def generate_chat(self, prompts, max_new_tokens):
        assert len(prompts) == len(self.answers)
        return list(self.answers)


def test_qa_scoring_per_item_match_and_languages(tmp_path, write_jsonl):
    f = write_jsonl(tmp_path / "qa.jsonl", [
        {"suite": {"kind": "qa", "options": {"match": "contains"}}},
        {"prompt": "Sunday?", "answer": "closed", "lang": "en"},
        {"prompt": "Preis?", "answer": 12, "match": "numeric", "lang": "de"},
        {"prompt": "Hotline?", "answer": "0800 555 0134", "lang": "de"},
        {"prompt": "Dimanche ?", "answer": ["fermé", "ferme"], "match": "exact", "lang": "fr"},
    ])
    suite = load_suite(f)
    res = score_qa(_FixedAnswers(["We are CLOSED on Sundays.", "Es kostet 12,00 Euro.", "Ruf 0800 555 0135 an.", "Fermé."]), suite)
    assert res.metrics["accuracy"].num == [1.0, 1.0, 0.0, 1.0]
    assert res.metrics["accuracy/de"].num == [1.0, 0.0]
    assert [s["score"] for s in res.samples] == [1.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("rows,kind,msg", [
    ([{"prompt": "x"}], "qa", ":1: a qa item needs \"answer\""),
    ([{"prompt": "x", "answer": "y"}, {"prompt": "x", "answer": "ten", "match": "numeric"}], "qa", ":2: numeric match needs numbers"),
    ([{"prompt": "x", "choices": ["a", "b"], "answer": 2}], "choice", ":1: \"answer\" must be the index (0..1)"),
    ([{"text": ""}], "perplexity", ":1: \"text\" must be a non-empty string"),
    ([{"prompt": "x", "chosen": "a", "rejected": "a"}], "preference", ":1: \"chosen\" and \"rejected\" are identical"),
])
def test_bad_items_name_the_line(tmp_path, rows, kind, msg, write_jsonl):
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PluralError, match=None) as e:
        load_suite(f, kind=kind)
    assert f"{f}{msg}" in str(e.value)


def test_suite_without_kind_and_unknown_kind(tmp_path, write_jsonl):
    f = write_jsonl(tmp_path / "s.jsonl", [{"text": "hello"}])
    with pytest.raises(PluralError, match="no suite kind"):
        load_suite(f)
    with pytest.raises(PluralError, match="unknown suite kind 'bogus'"):
        load_suite(f, kind="bogus")
    with pytest.raises(PluralError, match="unknown key"):
        load_suite(write_jsonl(tmp_path / "q.jsonl", [{"suite": {"kind": "qa", "options": {"matsch": "exact"}}}, {"prompt": "a", "answer": "b"}]))
