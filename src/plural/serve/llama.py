"""A lean Llama forward for serving: preallocated KV cache rows, per-row positions, batched multi-LoRA.

transformers' `generate` spends most of a CPU decode step in Python (cache objects, masks,
hooks); for a 135M model that overhead is larger than the matmuls. This module runs the same
math as `LlamaForCausalLM` (RMSNorm, RoPE, GQA attention, SwiGLU; checked token for token against
transformers + PEFT in tests/serve) on weights taken from the HF model, with:

- q|k|v and gate|up fused into one matmul each (fewer, larger ops);
- a KV cache preallocated once: K, V [L, rows, max_len, kv_heads, head_dim]. A sequence owns one
  row from prefill to finish; continuous batching is just assigning rows. (Positions before heads:
  a decode step's write `cache[rows, pos]` is then one small gather-free copy; with heads first,
  torch's index_put took milliseconds per layer);
- decode over rows 0..n-1 with each row at its own position (mask j <= pos[b]), so requests
  joining and leaving between steps need no re-padding or cache copies;
- each row's LoRA delta from its own adapter (see `lora.py`);
- optionally (`quantize="int4"`, CPU) the projection weights kept as 4-bit groups of 32 with a
  scale and an offset per group — llama.cpp's Q4_1 layout, so a model imported from a Q4_1 GGUF
  is served with its own 4-bit codes — multiplied by torch's int4 CPU kernel
  (`_weight_int4pack_mm_for_cpu`), and the output layer in int8. A one-row decode step reads
  about a third of the bytes of bf16 and runs ~2.3x faster (SmolLM2-135M, 2 cores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plural.errors import PluralError
from plural.serve.lora import GROUPS, module_shapes


def check_supported(config) -> None:
    if config.model_type not in ("llama",) or getattr(config, "hidden_act", "silu") != "silu":
        raise PluralError(
            f"the server's engine runs Llama-architecture models (SmolLM2, Llama, …); "
            f"this model is {config.model_type!r}"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise PluralError("the server's engine does not support attention_bias / mlp_bias Llama variants")


QUANTIZE = ("none", "int4")


class Int4Weight:
    """A weight [out, in] as unsigned 4-bit codes in groups of `GROUP` input columns, each group
    with its own scale and offset: w = scale·q + min (q in 0..15), the affine 4-bit scheme of
    llama.cpp's Q4_1. Round-to-nearest from the float weight; a weight that came from Q4_1 (the
    bundled GGUF) has every group's min and max on its grid, so its codes are recovered exactly
    (checked on SmolLM2); only scale and offset are rounded from Q4_1's fp16 to the kernel's bf16.

    `matmul(x)` is `x @ w.T` for x [..., in] (any float dtype; computed in bf16)."""

    GROUP = 32

    def __init__(self, w: torch.Tensor):
        out, inp = w.shape
        if inp % self.GROUP:
            raise PluralError(f"quantize int4 needs input widths divisible by {self.GROUP}; this model has a projection of width {inp}")
        g = w.detach().float().reshape(out, inp // self.GROUP, self.GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(out, inp)
        # torch's kernel dequantises (q - 8)·scale + zero: so zero = min + 8·scale. [in/G, out, 2]
        self.scales_zeros = torch.stack([scale.T, (lo + 8 * scale).T], dim=-1).to(torch.bfloat16).contiguous()
        # The kernel's own blocked layout, and the same codes as plain nibble pairs [out, in/2] for
        # `dequantize` (the kernel's cost grows with the rows it multiplies: past `KERNEL_ROWS` rows,
        # a long prefill, one bf16 matmul on the dequantised weight is faster).
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        self.nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
        self.out, self.inp = out, inp

    # Crossover measured on SmolLM2-135M's shapes (2 cores): for gate|up [3072, 576] the kernel takes
    # 1.4 ms at 64 rows and 5.6 at 256 against 7.7 and 7.6 ms to dequantise and multiply in bf16;
    # at 512 rows 10.7 against 8.0.
    KERNEL_ROWS = 256

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.inp).to(torch.bfloat16)
        if x2.shape[0] <= self.KERNEL_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.GROUP, self.scales_zeros)
        else:
            y = x2 @ self.dequantize().T
        return y.view(*lead, self.out).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in bf16: (q − 8)·scale + zero per group, as the kernel computes it."""
        n = self.nibbles
        q = torch.stack([n & 15, n >> 4], dim=-1).view(self.out, self.inp // self.GROUP, self.GROUP)
        sz = self.scales_zeros.float()
        w = (q.float() - 8) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]
        return w.view(self.out, self.inp).to(torch.bfloat16)


class Int8Weight:
    """A weight [out, in] as int8 with one bf16 scale per output row (symmetric), multiplied by
    torch's int8 weight-only CPU kernel. Used for the output layer under `quantize: int4`. Measured
    on SmolLM2-135M, teacher-forced over 400 tokens of README text, KL(bf16 ‖ quantised) of the
    next-token distribution: 4-bit projections with a bf16 output layer 0.0021; with an int8 one
    0.0045 (top-1 agreement 94.5%); with a 4-bit one 0.051 (83%). llama.cpp's Q4_1 files keep this
    matrix at 8 bits (Q8_0) too."""

    # torch's int8 kernel is bandwidth-bound at one row and compute-bound beyond a few: past
    # `KERNEL_ROWS` rows (a batch of streams, a prefill) the same int8 weight, dequantised once to
    # bf16, is multiplied by the dense GEMM instead (crossover measured in docs/serving.md).
    KERNEL_ROWS = 4

    def __init__(self, w: torch.Tensor):
        w = w.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        self.q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)
        self.out, self.inp = w.shape
        self.dense = self.dequantize()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.inp).to(torch.bfloat16)
        if x2.shape[0] <= self.KERNEL_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        else:
            y = x2 @ self.dense.T
        return y.view(*lead, self.out).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None]).to(torch.bfloat16)


def _linear(x: torch.Tensor, w) -> torch.Tensor:
    return w.matmul(x) if isinstance(w, (Int4Weight, Int8Weight)) else x @ w.T


class LlamaRunner:
    def __init__(self, hf_model, rows: int, max_len: int, dtype: torch.dtype, device: torch.device, quantize: str = "none"):
        cfg = hf_model.config
        check_supported(cfg)
        if quantize not in QUANTIZE:
            raise PluralError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
        if quantize == "int4" and (device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")):
            raise PluralError("quantize: int4 runs on CPU only (torch's int4 CPU kernel); on a GPU serve in bfloat16")
        self.cfg = cfg
        self.dtype, self.device = dtype, device
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.n_layers = cfg.num_hidden_layers
        self.max_len, self.rows = max_len, rows
        self.eps = cfg.rms_norm_eps
        shapes = module_shapes(cfg)
        # Output offset of each projection inside its fused matmul.
        self.offset = {"q_proj": 0, "k_proj": shapes["q_proj"][0], "v_proj": shapes["q_proj"][0] + shapes["k_proj"][0],
                       "o_proj": 0, "gate_proj": 0, "up_proj": shapes["gate_proj"][0], "down_proj": 0}
        self.width = {m: s[0] for m, s in shapes.items()}

        def w(t):
            return t.detach().to(device=device, dtype=dtype).contiguous()

        def mat(t):  # a projection / output weight: quantised when asked
            return Int4Weight(t) if quantize == "int4" else w(t)

        m = hf_model.model
        self.embed = w(m.embed_tokens.weight)
        self.lm_head = Int8Weight(hf_model.lm_head.weight) if quantize == "int4" else w(hf_model.lm_head.weight)
        self.final_norm = w(m.norm.weight)
        self.layers = []
        for layer in m.layers:
            a, p = layer.self_attn, layer.mlp
            self.layers.append({
                "ln1": w(layer.input_layernorm.weight), "ln2": w(layer.post_attention_layernorm.weight),
                "qkv": mat(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                "o": mat(a.o_proj.weight),
                "gate_up": mat(torch.cat([p.gate_proj.weight, p.up_proj.weight])),
                "down": mat(p.down_proj.weight),
            })
        # RoPE tables [max_len, head_dim] from the model's own rotary module (honours rope scaling).
        rot = m.rotary_emb
        pos = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(pos, rot.inv_freq.float().cpu())
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * rot.attention_scaling).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * rot.attention_scaling).to(device=device, dtype=dtype)
        self.k_cache = torch.zeros(self.n_layers, rows, max_len, self.n_kv, self.head_dim, dtype=dtype, device=device)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.scale = self.head_dim ** -0.5

    def _norm(self, x, weight):
        # LlamaRMSNorm's math in one fused op (statistics in fp32 for bf16/fp16 inputs; the weight is
        # applied before the single rounding, where transformers rounds before and after it).
        return F.rms_norm(x, weight.shape, weight, self.eps)

    def _proj(self, x, weight, group, lora, layer):
        """x [n, T, in] @ fused weight^T, plus each targeted module's per-row LoRA delta on its slice."""
        y = _linear(x, weight)
        fac = lora.get(group)
        if fac is not None:
            a, parts = fac  # see LoraSlots.gather: float32 factors
            t = torch.bmm(x.float(), a[layer])  # [n, T, R]: every targeted module's x A^T at once
            for mod, c0, c1, b in parts:
                off = self.offset[mod]
                y[..., off:off + self.width[mod]].add_(torch.bmm(t[..., c0:c1], b[layer]))
        return y

    @staticmethod
    def _rope(x, cos, sin):
        # x [n, T, heads, d]; cos/sin [n or 1, T, 1, d]; rotate_half as in transformers.
        d = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., d:], x[..., :d]], dim=-1) * sin

    def _layers(self, x, cos, sin, lora, attend):
        n, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        for i, lw in enumerate(self.layers):
            h = self._norm(x, lw["ln1"])
            qkv = self._proj(h, lw["qkv"], GROUPS[0], lora, i)
            qk, v = qkv.split([(H + KV) * D, KV * D], dim=-1)
            qk = self._rope(qk.view(n, T, H + KV, D), cos, sin)  # q and k heads rotated together
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
            v = v.view(n, T, KV, D).transpose(1, 2)
            o = attend(i, q, k, v)  # [n, H, T, D]
            o = o.transpose(1, 2).reshape(n, T, H * D)
            x = x + self._proj(o, lw["o"], GROUPS[1], lora, i)
            h = self._norm(x, lw["ln2"])
            gu = self._proj(h, lw["gate_up"], GROUPS[2], lora, i)
            g, u = gu.chunk(2, dim=-1)
            x = x + self._proj(F.silu(g) * u, lw["down"], GROUPS[3], lora, i)
        return self._norm(x, self.final_norm)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, kv_rows: torch.Tensor, lora: dict) -> torch.Tensor:
        """Prompts ids [n, T] (right-padded; lengths [n]) into KV rows kv_rows [n]; logits of each last token [n, V]."""
        n, T = ids.shape
        x = self.embed[ids]
        cos, sin = self.cos[:T][None, :, None], self.sin[:T][None, :, None]  # [1, T, 1, D]

        def attend(i, q, k, v):
            # Causal attention within each prompt: padding sits after a row's last token, so it never
            # influences that row's real positions.
            self.k_cache[i, kv_rows, :T] = k.transpose(1, 2)
            self.v_cache[i, kv_rows, :T] = v.transpose(1, 2)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)

        h = self._layers(x, cos, sin, lora, attend)
        last = h[torch.arange(n, device=self.device), lengths - 1]
        return _linear(last, self.lm_head).float()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, lora: dict) -> torch.Tensor:
        """One token for each of KV rows 0..n-1: tokens [n] at positions pos [n]; logits [n, V].

        Rows with no sequence are fed token 0 at position 0; they only ever write their own row.
        """
        n = tokens.shape[0]
        x = self.embed[tokens][:, None]  # [n, 1, hidden]
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [n, 1, 1, D]
        span = int(pos.max()) + 1
        rows = torch.arange(n, device=self.device)
        # mask[b, j] = j <= pos[b]: each row sees its own history only.
        mask = (torch.arange(span, device=self.device)[None] <= pos[:, None])[:, None, None]  # [n, 1, 1, span]

        def attend(i, q, k, v):
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[rows, pos] = k[:, :, 0]
            vc[rows, pos] = v[:, :, 0]
            return F.scaled_dot_product_attention(q, kc[:n, :span].transpose(1, 2), vc[:n, :span].transpose(1, 2),
                                                  attn_mask=mask, scale=self.scale, enable_gqa=True)

        h = self._layers(x, cos, sin, lora, attend)
        return _linear(h[:, 0], self.lm_head).float()
