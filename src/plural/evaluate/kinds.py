"""The built-in suite kinds: perplexity, qa, choice, preference, samples.

Each is a `read` function (check one JSONL object, name the line on error) and a `score` function
(all items at once through the batched `Scorer`), registered in `plural.evaluate.suites.KINDS`.
Items may carry `"lang"`; metrics are then also reported per language (`metric/lang`). For the
perplexity kind a missing `lang` is detected with langid (when installed).
"""

from __future__ import annotations

from typing import Any, Literal

from plural.config import Strict
from plural.errors import PluralError
from plural.evaluate.metrics import LN2, match
from plural.evaluate.suites import Kind, Metric, Suite, SuiteScores, register_kind

# ---- shared item helpers -----------------------------------------------------------------------------


def _messages(obj: dict, where: str, allow_final_assistant: bool = False) -> list[dict]:
    """A prompt as a message list, from `prompt` (a user string) or `messages`."""
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise PluralError(f"{where}: \"prompt\" must be a non-empty string")
        return [{"role": "user", "content": obj["prompt"]}]
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise PluralError(f"{where}: needs \"prompt\" (a string) or \"messages\" (a list of {{role, content}})")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise PluralError(f"{where}: messages[{i}] must be {{\"role\": system|user|assistant, \"content\": str}}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] == "assistant" and not allow_final_assistant:
        raise PluralError(f"{where}: the prompt's last message is an assistant turn; end with a user turn")
    return out


def _lang(obj: dict, where: str) -> str | None:
    lang = obj.get("lang")
    if lang is not None and (not isinstance(lang, str) or not lang):
        raise PluralError(f"{where}: \"lang\" must be a language code such as \"de\"")
    return lang


def _strings(v: Any, key: str, where: str) -> list[str]:
    vals = [v] if isinstance(v, (str, int, float)) and not isinstance(v, bool) else v
    if not isinstance(vals, list) or not vals or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in vals):
        raise PluralError(f"{where}: \"{key}\" must be a string, a number or a non-empty list of them")
    return [str(x) for x in vals]


def _with_system(msgs: list[dict], system: str | None) -> list[dict]:
    if system and msgs[0]["role"] != "system":
        return [{"role": "system", "content": system}] + msgs
    return msgs


def _grouped(metrics: dict[str, Metric], groups: list[str | None]) -> dict[str, Metric]:
    """Add `name/group` sub-metrics when the items fall into more than one group."""
    names = sorted({g for g in groups if g is not None})
    if len(names) < 2:
        return metrics
    out = dict(metrics)
    for name, m in metrics.items():
        for g in names:
            idx = [i for i, x in enumerate(groups) if x == g]
            out[f"{name}/{g}"] = Metric([m.num[i] for i in idx], None if m.den is None else [m.den[i] for i in idx], m.higher_is_better)
    return out


_identifier = None


def detect_lang(text: str) -> str | None:
    """ISO 639-1 code of `text` by langid (Lui & Baldwin 2012), or None without langid."""
    global _identifier
    if _identifier is None:
        try:
            from langid.langid import LanguageIdentifier, model
        except ImportError:
            return None
        _identifier = LanguageIdentifier.from_modelstring(model, norm_probs=False)
    return _identifier.classify(text)[0]


# ---- perplexity ----------------------------------------------------------------------------------------


def read_perplexity(obj: dict, where: str) -> dict:
    """{"text": str, "lang"?} scores the whole text; {"messages": [...], "lang"?} scores the assistant turns."""
    lang = _lang(obj, where)
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise PluralError(f"{where}: \"text\" must be a non-empty string")
        return {"text": obj["text"], "lang": lang or detect_lang(obj["text"])}
    msgs = _messages(obj, where, allow_final_assistant=True)
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    if not answers:
        raise PluralError(f"{where}: a chat item needs at least one assistant turn to score")
    return {"messages": msgs, "lang": lang or detect_lang(" ".join(answers))}


def score_perplexity(scorer, suite: Suite) -> SuiteScores:
    """Bits per byte: -log2 p(scored tokens) / UTF-8 bytes of the scored text.

    Text items score every token of the text (conditioned on the prefix token). Chat items score
    each assistant turn, its end-of-turn token included, given the conversation before it (the
    tokens a fine-tune trains), over the bytes of the assistant contents.
    """
    from plural.data.chat import IGNORE, encode_chat

    docs, reqs, owner, n_bytes = [], [], [], []
    for i, it in enumerate(suite.items):
        if "text" in it:
            docs.append((i, scorer.encode(it["text"])))
            n_bytes.append(len(it["text"].encode("utf-8")))
            continue
        enc = encode_chat(scorer.tok, it["messages"])
        # one request per contiguous trained span: context = everything before it
        k = 0
        while k < len(enc.labels):
            if enc.labels[k] == IGNORE:
                k += 1
                continue
            e = k
            while e < len(enc.labels) and enc.labels[e] != IGNORE:
                e += 1
            reqs.append((enc.input_ids[:k], enc.input_ids[k:e]))
            owner.append(i)
            k = e
        n_bytes.append(sum(len(m["content"].encode("utf-8")) for m in it["messages"] if m["role"] == "assistant"))
    logp = [0.0] * len(suite.items)
    for (i, _), lp in zip(docs, scorer.loglikelihood_rolling([d for _, d in docs])):
        logp[i] += lp
    for i, ll in zip(owner, scorer.loglikelihood(reqs)):
        logp[i] += ll.logprob
    bits = [-lp / LN2 for lp in logp]
    metrics = {"bpb": Metric(bits, [float(b) for b in n_bytes], higher_is_better=False)}
    return SuiteScores(_grouped(metrics, [it["lang"] for it in suite.items]))


# ---- qa ------------------------------------------------------------------------------------------------


class QAOptions(Strict):
    match: Literal["exact", "contains", "regex", "numeric"] = "contains"
    tolerance: float = 0.0
    max_new_tokens: int = 64
    system: str | None = None


def read_qa(obj: dict, where: str) -> dict:
    """{"prompt"|"messages", "answer": str | number | [..], "match"?, "tolerance"?, "lang"?}"""
    if "answer" not in obj:
        raise PluralError(f"{where}: a qa item needs \"answer\" (a string, a number or a list of accepted answers)")
    how = obj.get("match")
    if how is not None and how not in ("exact", "contains", "regex", "numeric"):
        raise PluralError(f"{where}: \"match\" must be exact, contains, regex or numeric (got {how!r})")
    answers = _strings(obj["answer"], "answer", where)
    if how == "numeric":
        for a in answers:
            try:
                float(a)
            except ValueError:
                raise PluralError(f"{where}: numeric match needs numbers in \"answer\", got {a!r}") from None
    if how == "regex":
        import re

        for a in answers:
            try:
                re.compile(a)
            except re.error as e:
                raise PluralError(f"{where}: \"answer\" {a!r} is not a valid regular expression: {e}") from None
    tol = obj.get("tolerance")
    if tol is not None and (not isinstance(tol, (int, float)) or tol < 0):
        raise PluralError(f"{where}: \"tolerance\" must be a number >= 0")
    return {"messages": _messages(obj, where), "answers": answers, "match": how, "tolerance": tol, "lang": _lang(obj, where)}


def score_qa(scorer, suite: Suite) -> SuiteScores:
    o: QAOptions = suite.options
    outputs = scorer.generate_chat([_with_system(it["messages"], o.system) for it in suite.items], o.max_new_tokens)
    correct, samples = [], []
    for it, out in zip(suite.items, outputs):
        how = it["match"] or o.match
        ok = match(out, it["answers"], how, o.tolerance if it["tolerance"] is None else it["tolerance"])
        correct.append(1.0 if ok else 0.0)
        samples.append({"prompt": it["messages"][-1]["content"], "output": out, "reference": " | ".join(it["answers"]), "score": float(ok)})
    metrics = _grouped({"accuracy": Metric(correct)}, [it["lang"] for it in suite.items])
    return SuiteScores(metrics, samples)


# ---- choice --------------------------------------------------------------------------------------------


class ChoiceOptions(Strict):
    delimiter: str = " "  # between a raw "context" and each choice (lm-evaluation-harness's target_delimiter)
    system: str | None = None


def read_choice(obj: dict, where: str) -> dict:
    """{"context": raw text | "prompt"/"messages": chat, "choices": [str, ...], "answer": index, "lang"?}"""
    choices = obj.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise PluralError(f"{where}: \"choices\" must be a list of at least two non-empty strings")
    ans = obj.get("answer")
    if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
        raise PluralError(f"{where}: \"answer\" must be the index (0..{len(choices) - 1}) of the correct choice")
    if "context" in obj:
        if not isinstance(obj["context"], str):
            raise PluralError(f"{where}: \"context\" must be a string")
        return {"context": obj["context"], "choices": choices, "answer": ans, "lang": _lang(obj, where)}
    return {"messages": _messages(obj, where), "choices": choices, "answer": ans, "lang": _lang(obj, where)}


def score_choice(scorer, suite: Suite) -> SuiteScores:
    """acc: argmax of log p(choice | context); acc_norm: argmax of log p per UTF-8 byte of the choice."""
    o: ChoiceOptions = suite.options
    reqs = []
    for it in suite.items:
        if "context" in it:
            ctx, pre = it["context"], o.delimiter
        else:
            ctx, pre = scorer.chat_prompt(_with_system(it["messages"], o.system)), ""
        reqs += [scorer.split_pair(ctx, pre + c) for c in it["choices"]]
    lls = scorer.loglikelihood(reqs)
    acc, acc_norm, samples, k = [], [], [], 0
    for it in suite.items:
        n = len(it["choices"])
        lp = [ll.logprob for ll in lls[k:k + n]]
        k += n
        norm = [v / len(c.encode("utf-8")) for v, c in zip(lp, it["choices"])]
        pick = max(range(n), key=lambda j: (lp[j], -j))
        pick_n = max(range(n), key=lambda j: (norm[j], -j))
        acc.append(float(pick == it["answer"]))
        acc_norm.append(float(pick_n == it["answer"]))
        q = it.get("context") or it["messages"][-1]["content"]
        samples.append({"prompt": q, "output": it["choices"][pick], "reference": it["choices"][it["answer"]], "score": acc[-1]})
    metrics = _grouped({"acc": Metric(acc), "acc_norm": Metric(acc_norm)}, [it["lang"] for it in suite.items])
    return SuiteScores(metrics, samples)


# ---- preference ----------------------------------------------------------------------------------------


def read_preference(obj: dict, where: str) -> dict:
    """plural's preference record: {"prompt"|"messages", "chosen", "rejected"} (strings or one assistant message)."""
    out = {"messages": _messages(obj, where), "lang": _lang(obj, where)}
    for key in ("chosen", "rejected"):
        v = obj.get(key)
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) and v[0].get("role") == "assistant":
            v = v[0].get("content")
        if not isinstance(v, str) or not v.strip():
            raise PluralError(f"{where}: \"{key}\" must be a non-empty string (or a list with one assistant message)")
        out[key] = v
    if out["chosen"] == out["rejected"]:
        raise PluralError(f"{where}: \"chosen\" and \"rejected\" are identical")
    return out


def answer_request(scorer, messages: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a rendered conversation: the answer with its end-of-turn token."""
    prompt = scorer.chat_prompt(messages)
    full = scorer.tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise PluralError("the model's chat template does not render the prompt as a prefix of the conversation")
    return scorer.split_pair(prompt, full[len(prompt):].rstrip("\n"))


def score_preference(scorer, suite: Suite) -> SuiteScores:
    """accuracy: log p(chosen) > log p(rejected) (ties count half); margin: mean of the difference (nats)."""
    reqs = []
    for it in suite.items:
        reqs += [answer_request(scorer, it["messages"], it["chosen"]), answer_request(scorer, it["messages"], it["rejected"])]
    lls = scorer.loglikelihood(reqs)
    acc, margin, samples = [], [], []
    for j, it in enumerate(suite.items):
        d = lls[2 * j].logprob - lls[2 * j + 1].logprob
        acc.append(1.0 if d > 0 else 0.5 if d == 0 else 0.0)
        margin.append(d)
        samples.append({"prompt": it["messages"][-1]["content"], "output": f"margin {d:+.3f} nats", "reference": it["chosen"], "score": acc[-1]})
    metrics = _grouped({"accuracy": Metric(acc), "margin": Metric(margin)}, [it["lang"] for it in suite.items])
    return SuiteScores(metrics, samples)


# ---- samples -------------------------------------------------------------------------------------------


class SamplesOptions(Strict):
    max_new_tokens: int = 96
    system: str | None = None


def read_samples(obj: dict, where: str) -> dict:
    """{"prompt"|"messages", "reference"?}; a chat record's final assistant turn becomes the reference."""
    msgs = _messages(obj, where, allow_final_assistant=True)
    ref = obj.get("reference")
    if msgs[-1]["role"] == "assistant":
        ref = ref if ref is not None else msgs[-1]["content"]
        msgs = msgs[:-1]
        if not msgs:
            raise PluralError(f"{where}: nothing to prompt with before the assistant turn")
    if ref is not None and not isinstance(ref, str):
        raise PluralError(f"{where}: \"reference\" must be a string")
    return {"messages": msgs, "reference": ref}


def score_samples(scorer, suite: Suite) -> SuiteScores:
    o: SamplesOptions = suite.options
    outputs = scorer.generate_chat([_with_system(it["messages"], o.system) for it in suite.items], o.max_new_tokens)
    samples = [{"prompt": it["messages"][-1]["content"], "output": out, "reference": it["reference"]} for it, out in zip(suite.items, outputs)]
    return SuiteScores({}, samples)


PERPLEXITY = register_kind(Kind("perplexity", read_perplexity, score_perplexity, None, "bits per byte on held-out text or on the assistant turns of chat records, per language"))
QA = register_kind(Kind("qa", read_qa, score_qa, QAOptions, "generated answers scored by exact match, contains, regex or numeric tolerance"))
CHOICE = register_kind(Kind("choice", read_choice, score_choice, ChoiceOptions, "multiple choice by log-likelihood (acc) and per-byte log-likelihood (acc_norm)"))
PREFERENCE = register_kind(Kind("preference", read_preference, score_preference, None, "held-out preference accuracy and mean log-prob margin of chosen over rejected"))
SAMPLES = register_kind(Kind("samples", read_samples, score_samples, SamplesOptions, "side-by-side generations of every variant, for people to read"))
