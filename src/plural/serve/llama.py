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
- each row's LoRA delta from its own adapter (see `lora.py`).
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


class LlamaRunner:
    def __init__(self, hf_model, rows: int, max_len: int, dtype: torch.dtype, device: torch.device):
        cfg = hf_model.config
        check_supported(cfg)
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

        m = hf_model.model
        self.embed = w(m.embed_tokens.weight)
        self.lm_head = w(hf_model.lm_head.weight)
        self.final_norm = w(m.norm.weight)
        self.layers = []
        for layer in m.layers:
            a, p = layer.self_attn, layer.mlp
            self.layers.append({
                "ln1": w(layer.input_layernorm.weight), "ln2": w(layer.post_attention_layernorm.weight),
                "qkv": w(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                "o": w(a.o_proj.weight),
                "gate_up": w(torch.cat([p.gate_proj.weight, p.up_proj.weight])),
                "down": w(p.down_proj.weight),
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
        y = x @ weight.T
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
        return (last @ self.lm_head.T).float()

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
        return (h[:, 0] @ self.lm_head.T).float()
