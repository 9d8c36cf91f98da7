"""`quantize: int4`: 4-bit weights in llama.cpp's Q4_1 layout, multiplied by torch's int4 CPU kernel."""

from __future__ import annotations

import copy

import pytest
import torch

from plural.serve.fused import FusedRunner
from plural.serve.quant import Int4Weight, Int8Weight

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="this torch has no int4 CPU kernel")


@pytest.mark.parametrize("dense", [torch.bfloat16, torch.float32])
def test_a_weight_on_a_q4_1_grid_is_recovered_exactly(dense):
    """A weight whose groups of 32 are scale·q + min with codes 0..15 (what a Q4_1 GGUF dequantises
    to) is quantised back to the same values; the kernel's product equals x @ w.T, and so does the
    dense fallback, in bf16 (CPUs with native bf16) and in fp32 (the others, issue 19)."""
    g = torch.Generator().manual_seed(0)
    out, inp = 48, 96
    q = torch.randint(0, 16, (out, inp // 32, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15  # each group spans its full range, as Q4_1's quantiser makes it
    scale = (torch.rand(out, inp // 32, 1, generator=g) / 8 + 1 / 64).bfloat16().float()  # bf16-exact scales
    lo = -8 * scale  # bf16-exact offsets
    w = (q * scale + lo).view(out, inp)
    iw = Int4Weight(w, dense)
    # Codes, scales and offsets come back exactly: the dequantised weight is that value.
    assert iw.dequantize().dtype == dense and torch.equal(iw.dequantize(), w.to(dense))
    x = torch.randn(5, inp, generator=g)
    ref = x @ w.T
    y = iw.matmul(x)  # the kernel: bf16 activations on every CPU
    assert y.dtype == x.dtype and torch.allclose(y, ref, atol=0.05 * float(ref.abs().max()))
    # Many rows (a prefill) take the dequantised dense path: the same product (exact in fp32).
    xs = torch.randn(iw.kernel_rows + 7, inp, generator=g)
    refs = xs @ w.T
    tol = 0.05 if dense == torch.bfloat16 else 1e-5
    assert torch.allclose(iw.matmul(xs), refs, atol=tol * float(refs.abs().max()))


@pytest.mark.parametrize("dense", [torch.bfloat16, torch.float32])
def test_int8_output_layer_gives_the_same_product_with_few_or_many_rows(dense):
    """The output layer multiplies a few rows with torch's int8 kernel and a batch with the dense
    GEMM on the same dequantised weight: a row's logits do not depend on the path taken."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 64, generator=g)
    iw = Int8Weight(w, dense)
    assert float((iw.dequantize().float() - w).abs().max()) <= float(w.abs().max()) / 127  # a real 8-bit grid
    x = torch.randn(iw.kernel_rows + 9, 64, generator=g).bfloat16()
    many = iw.matmul(x).float()  # the dense path
    few = torch.cat([iw.matmul(x[i:i + 1]).float() for i in range(x.shape[0])])  # the kernel, one row at a time
    ref = x.float() @ iw.dequantize().float().T
    for y in (many, few):
        assert torch.allclose(y, ref, atol=0.01 * float(ref.abs().max()))
    assert torch.equal(many.argmax(-1), few.argmax(-1))


def test_quantisation_error_is_bounded_by_half_a_step():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    err = (Int4Weight(w).dequantize().float() - w).abs().view(32, 2, 32)
    step = (w.view(32, 2, 32).amax(-1) - w.view(32, 2, 32).amin(-1)) / 15
    assert bool((err <= step[..., None] * 0.5 + 0.02 * w.abs().max()).all())


def test_int4_runner_matches_the_model_with_its_dequantised_weights(store, tiny_model):
    """Teacher-forced: the int4 runner's logits at every step equal (to bf16 activation rounding)
    those of transformers' model carrying the dequantised 4-bit weights."""
    from plural.store.models import load_model

    model, tok, _ = load_model(tiny_model)
    runner = FusedRunner(model, rows=2, max_len=64, dtype=torch.float32, device=torch.device("cpu"), quantize="int4")
    ref = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for layer in ref.model.layers:
            for mod in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                mod.weight.copy_(Int4Weight(mod.weight).dequantize().float())
        ref.lm_head.weight = torch.nn.Parameter(runner.lm_head.dequantize().float())
    ids = tok("The quick brown fox jumps over", return_tensors="pt").input_ids
    with torch.no_grad():
        want = ref(torch.cat([ids, torch.tensor([[5, 9, 11, 13]])], dim=1)).logits[0, ids.shape[1] - 1:]
    T = ids.shape[1]
    got = [runner.prefill(ids, torch.tensor([T]), torch.tensor([0]), [0])[0]]
    for i, t in enumerate([5, 9, 11, 13]):
        got.append(runner.decode(torch.tensor([t]), torch.tensor([T + i]), [0])[0])
    got = torch.stack(got)
    tol = 0.03 * float(want.abs().max())
    assert torch.allclose(got, want, atol=tol), float((got - want).abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # And the quantisation is real: the bf16 runner's logits differ from the int4 ones.
    plain = FusedRunner(model, rows=2, max_len=64, dtype=torch.float32, device=torch.device("cpu"))
    assert not torch.allclose(plain.prefill(ids, torch.tensor([T]), torch.tensor([0]), [0])[0], got[0], atol=1e-4)


def test_quantize_is_refused_where_it_cannot_run(store, tiny_model):
    from plural.errors import PluralError
    from plural.store.models import load_model

    model, _, _ = load_model(tiny_model)
    with pytest.raises(PluralError, match="quantize must be one of"):
        FusedRunner(model, rows=1, max_len=16, dtype=torch.float32, device=torch.device("cpu"), quantize="int3")
