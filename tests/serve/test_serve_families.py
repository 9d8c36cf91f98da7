"""Issue 12: every family plural serves, through the engine, equals plain transformers + PEFT.

For each family (tiny random models: families.py), a mixed batch of the base and three adapters
(all linear layers / attention only / MLP with rsLoRA), prompts longer than Mistral's and Gemma 2's
sliding windows, greedy: the engine's tokens equal `generate` of transformers + PEFT, with the
fused runner where it applies and with the generic runner always.
"""

from __future__ import annotations

import copy

import pytest
import torch

from families import FAMILIES, build, make_adapters
from plural.errors import PluralError
from plural.serve.engine import Engine, SamplingParams
from plural.serve.fused import supports
from plural.serve.registry import make_adapter
from test_serve_engine import run_engine

PROMPTS = [list(range(200, 213)), list(range(300, 309)), list(range(400, 420)), list(range(500, 511))]
NEW = 8


@pytest.fixture(scope="module")
def tok(store):
    from transformers import AutoTokenizer

    from plural.store.models import get_model

    return AutoTokenizer.from_pretrained(get_model("tiny").path)


def peft_greedy(model, adapter, ids):
    from peft import PeftModel

    m = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)) if adapter else model
    x = torch.tensor([ids])
    with torch.no_grad():
        out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                         pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return out[0, len(ids):].tolist()


def engine_for(model, tok, runner):
    eng = Engine(copy.deepcopy(model), tok, max_batch=3, max_len=128, max_queue=16, max_loras=2, max_lora_rank=8,
                 cache_bytes=1 << 30, dtype=torch.float32, device=torch.device("cpu"), runner=runner)
    eng.stop_ids = set()  # run to max_tokens, as the reference does with eos_token_id=None
    return eng


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_equals_transformers_peft(family, tok, tmp_path):
    model = build(family, tok)
    adapters = make_adapters(model, tmp_path)
    names = [None, "all8", "attn4", "mlp2", "all8", None]
    jobs_spec = [(name, PROMPTS[i % len(PROMPTS)]) for i, name in enumerate(names)]
    refs = [peft_greedy(model, adapters[n] if n else None, ids) for n, ids in jobs_spec]
    # The adapters really change the output (else a mixed-up row could pass unnoticed).
    assert len({tuple(r) for r, (n, ids) in zip(refs, jobs_spec) if ids == PROMPTS[0]}) == 2
    runners = (["fused"] if supports(model.config) else []) + ["generic"]
    assert (family == "phi3") == (runners == ["generic"])
    for runner in runners:
        eng = engine_for(model, tok, runner)
        assert eng.runner.kind == runner and eng.runner.family == family
        for name, path in adapters.items():
            eng.add_adapter(make_adapter(name, path, None, eng.runner, 8))
        eng.start()
        try:
            # 6 sequences, 3 rows, 2 LoRA slots for 3 adapters: rows are reused, adapters evicted and reloaded.
            jobs = [(eng.adapters[n] if n else None, ids, SamplingParams(max_tokens=NEW, temperature=0.0))
                    for n, ids in jobs_spec]
            got = run_engine(eng, jobs)
        finally:
            eng.stop()
        assert got == refs, f"{family} / {runner}: {got} != {refs}"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "phi3"])
def test_int4_fused_family_equals_its_dequantised_reference(family, tok):
    """Teacher-forced, int4 on each fused family: logits equal transformers' model carrying the
    dequantised 4-bit weights (to bf16 activation rounding), top-1 identical."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no int4 CPU kernel")
    from plural.serve.fused import FusedRunner

    model = build(family, tok)
    runner = FusedRunner(copy.deepcopy(model), rows=1, max_len=64, dtype=torch.float32, device=torch.device("cpu"),
                         quantize="int4")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, lw in zip(ref.model.layers, runner.layers):
            a, p = layer.self_attn, layer.mlp
            qkv = lw["qkv"].dequantize().float()
            q, k = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0]
            a.q_proj.weight.copy_(qkv[:q]), a.k_proj.weight.copy_(qkv[q:q + k]), a.v_proj.weight.copy_(qkv[q + k:])
            a.o_proj.weight.copy_(lw["o"].dequantize().float())
            gu = lw["gate_up"].dequantize().float()
            p.gate_proj.weight.copy_(gu[:gu.shape[0] // 2]), p.up_proj.weight.copy_(gu[gu.shape[0] // 2:])
            p.down_proj.weight.copy_(lw["down"].dequantize().float())
        ref.lm_head.weight = torch.nn.Parameter(runner.lm_head.dequantize().float())  # untied, int8 as served
    ids = torch.tensor([PROMPTS[2]])
    follow = [5, 9, 11, 13]
    with torch.no_grad():
        want = ref(torch.cat([ids, torch.tensor([follow])], dim=1)).logits[0, ids.shape[1] - 1:]
    T = ids.shape[1]
    got = [runner.prefill(ids, torch.tensor([T]), torch.tensor([0]), [0])[0]]
    for i, t in enumerate(follow):
        got.append(runner.decode(torch.tensor([t]), torch.tensor([T + i]), [0])[0])
    got = torch.stack(got)
    tol = 0.03 * float(want.abs().max())
    assert torch.allclose(got, want, atol=tol), float((got - want).abs().max())
    # Top-1 equal wherever the reference is decisive (random tiny models have near-ties that bf16
    # activation rounding may flip); at least half the positions must be decisive.
    top2 = want.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * float((got - want).abs().max())
    assert int(decisive.sum()) >= len(decisive) // 2
    assert torch.equal(got.argmax(-1)[decisive], want.argmax(-1)[decisive])


def test_adapter_for_modules_the_base_lacks_is_refused_naming_them(tok, tmp_path):
    llama, phi = build("llama", tok), build("phi3", tok)
    adapters = make_adapters(llama, tmp_path)  # q_proj, v_proj, ... : Phi-3 has qkv_proj instead
    eng = engine_for(phi, tok, "auto")
    with pytest.raises(PluralError, match=r"do not exist as linear layers of the served base: .*q_proj"):
        make_adapter("x", adapters["attn4"], None, eng.runner, 8)
    fused = engine_for(llama, tok, "auto")
    phi_adapters = make_adapters(phi, tmp_path / "phi")
    with pytest.raises(PluralError, match=r"target module\(s\) do not exist in the served base: .*qkv_proj"):
        make_adapter("y", phi_adapters["attn4"], None, fused.runner, 8)


def test_encoder_only_model_is_refused(tok):
    from transformers import BertConfig, BertLMHeadModel

    bert = BertLMHeadModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64)).eval()
    with torch.no_grad():  # attention that matters, as in a trained encoder
        for p in bert.parameters():
            p.mul_(4.0)
    with pytest.raises(PluralError, match="'bert' is not causal"):
        engine_for(bert, tok, "auto")
    with pytest.raises(PluralError, match="'bert' is not causal"):
        Engine(copy.deepcopy(bert), tok, max_batch=1, max_len=32, max_queue=1, max_loras=1, max_lora_rank=8,
               cache_bytes=1 << 20, dtype=torch.bfloat16, device=torch.device("cpu"))
    with pytest.raises(PluralError, match="not one of the fused runner's families"):
        engine_for(bert, tok, "fused")
    with pytest.raises(PluralError, match="needs the fused runner"):
        Engine(copy.deepcopy(build("phi3", tok)), tok, max_batch=1, max_len=32, max_queue=1, max_loras=1, max_lora_rank=8,
               cache_bytes=1 << 20, dtype=torch.float32, device=torch.device("cpu"), quantize="int4")
