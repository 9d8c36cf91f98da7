"""The fused runner: a lean forward for the Llama-like families, preallocated KV rows, batched multi-LoRA.

transformers' `generate` spends most of a CPU decode step in Python (cache objects, masks,
hooks); for a 135M model that overhead is larger than the matmuls. This module runs the same
math as transformers' Llama, Mistral, Qwen2, Qwen3 and Gemma 2 (`families.py` lists each one's
differences; checked token for token against transformers + PEFT in tests/serve) on weights
taken from the HF model, with:

- q|k|v and gate|up fused into one matmul each (fewer, larger ops);
- a KV cache preallocated once: K, V [L, rows, max_len, kv_heads, head_dim]. A sequence owns one
  row from prefill to finish; continuous batching is just assigning rows. (Positions before heads:
  a decode step's write `cache[rows, pos]` is then one small gather-free copy; with heads first,
  torch's index_put took milliseconds per layer);
- decode over rows 0..n-1 with each row at its own position (mask j <= pos[b], and j > pos[b] - W
  on a layer with sliding window W), so requests joining and leaving between steps need no
  re-padding or cache copies;
- each row's LoRA delta from its own adapter (see `lora.py`);
- optionally (`quantize="int4"`, CPU) the projection weights in llama.cpp's Q4_1 layout and the
  output layer in int8 (`quant.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from plural.errors import PluralError
from plural.serve.families import Family, family_of
from plural.serve.lora import GROUPS, LoraSlots, check_tensors, module_shapes, read_adapter
from plural.serve.quant import QUANTIZE, Int4Weight, Int8Weight, dense_weight, linear


class FusedRunner:
    kind = "fused"

    def __init__(self, hf_model, rows: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 quantize: str = "none", max_loras: int = 1, max_lora_rank: int = 8):
        cfg = hf_model.config
        fam = family_of(cfg)
        if quantize not in QUANTIZE:
            raise PluralError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
        if quantize == "int4" and (device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")):
            raise PluralError("quantize: int4 runs on CPU only (torch's int4 CPU kernel); on a GPU serve in bfloat16")
        self.cfg, self.fam = cfg, fam
        self.family = fam.name
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
        self.slots = LoraSlots(cfg, max_loras, max_lora_rank, dtype, device)
        self._lora, self._lora_key = {}, None

        def w(t):
            return t.detach().to(device=device, dtype=dtype).contiguous()

        def mat(t):  # a projection / output weight: quantised when asked
            return Int4Weight(t) if quantize == "int4" else dense_weight(w(t))

        def norm_w(t):  # gemma's norms are x * (1 + w), applied in fp32
            return (1.0 + t.detach().float()).to(device) if fam.norm_plus_one else w(t)

        def cat_bias(*mods):
            if mods[0].bias is None:
                return None
            return w(torch.cat([m.bias for m in mods]))

        m = hf_model.model
        self.embed = w(m.embed_tokens.weight)
        # Gemma scales embeddings by sqrt(hidden), rounded to the model's dtype as transformers does.
        self.embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=dtype).item() if fam.embed_scale else None
        self.lm_head = Int8Weight(hf_model.lm_head.weight) if quantize == "int4" else dense_weight(w(hf_model.lm_head.weight))
        self.final_norm = norm_w(m.norm.weight)
        self.layers = []
        for layer in m.layers:
            a, p = layer.self_attn, layer.mlp
            lw = {
                "ln1": norm_w(layer.input_layernorm.weight),
                "qkv": mat(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                "qkv_b": cat_bias(a.q_proj, a.k_proj, a.v_proj),
                "o": mat(a.o_proj.weight), "o_b": cat_bias(a.o_proj),
                "gate_up": mat(torch.cat([p.gate_proj.weight, p.up_proj.weight])), "gate_up_b": cat_bias(p.gate_proj, p.up_proj),
                "down": mat(p.down_proj.weight), "down_b": cat_bias(p.down_proj),
            }
            if fam.sandwich:  # gemma2: input -> attn -> post_attention; pre_feedforward -> mlp -> post_feedforward
                lw["post_attn"] = norm_w(layer.post_attention_layernorm.weight)
                lw["ln2"] = norm_w(layer.pre_feedforward_layernorm.weight)
                lw["post_ffn"] = norm_w(layer.post_feedforward_layernorm.weight)
            else:
                lw["ln2"] = norm_w(layer.post_attention_layernorm.weight)
            if fam.qk_norm:
                lw["q_norm"], lw["k_norm"] = w(a.q_norm.weight), w(a.k_norm.weight)
            self.layers.append(lw)
        # RoPE tables [max_len, head_dim] from the model's own rotary module (honours rope scaling).
        rot = m.rotary_emb
        pos = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(pos, rot.inv_freq.float().cpu())
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * rot.attention_scaling).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * rot.attention_scaling).to(device=device, dtype=dtype)
        # KV cache [layer, row, kv head, position, dim]: a row's [KV, S, D] slice is the layout attention
        # reads, no transpose (issue 12's Gemma 2 profile spent 11 of 70 ms per decode step copying the
        # former [row, position, head] layout into it).
        self.k_cache = torch.zeros(self.n_layers, rows, self.n_kv, max_len, self.head_dim, dtype=dtype, device=device)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.scale = fam.attn_scale or self.head_dim ** -0.5
        # A window at least as long as the context never masks anything: plain causal attention.
        self.windows = [w_ if w_ is not None and w_ < max_len else None for w_ in fam.windows]

    def describe(self) -> str:
        return f"fused ({self.family})"

    # ---- adapters -------------------------------------------------------------------------------

    def check_adapter(self, path: Path, shapes_on_disk: dict[str, tuple[int, ...]], rank: int) -> None:
        check_tensors(path, shapes_on_disk, rank, self.cfg)

    def read_adapter(self, weights: Path, rank: int, scale: float, sha256: str = ""):
        return read_adapter(weights, rank, scale, self.dtype, sha256)

    def write_slot(self, slot: int, w) -> None:
        self.slots.write(slot, w)
        self._lora_key = None

    def clear_slot(self, slot: int) -> None:
        self.slots.clear(slot)
        self._lora_key = None

    def _gather(self, slots: list[int], keep: bool) -> dict:
        """Per-row factors; the decode batch's are kept until its composition changes."""
        if not keep:
            return self.slots.gather(slots, self.device)
        key = tuple(slots)
        if key != self._lora_key:
            self._lora, self._lora_key = self.slots.gather(slots, self.device), key
        return self._lora

    # ---- the forward ----------------------------------------------------------------------------

    def _norm(self, x, weight):
        if self.fam.norm_plus_one:  # gemma: in fp32, then one rounding (weight is 1 + w, fp32)
            return F.rms_norm(x.float(), weight.shape, weight, self.eps).to(x.dtype)
        # LlamaRMSNorm's math in one fused op (statistics in fp32 for bf16/fp16 inputs; the weight is
        # applied before the single rounding, where transformers rounds before and after it).
        return F.rms_norm(x, weight.shape, weight, self.eps)

    def _proj(self, x, weight, bias, group, lora, layer):
        """x [n, T, in] @ fused weight^T (+ bias), plus each targeted module's per-row LoRA delta on its slice."""
        y = linear(x, weight)
        if bias is not None:
            y = y + bias
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

    def _act(self, g, u):
        return (F.silu(g) if self.fam.act == "silu" else F.gelu(g, approximate="tanh")) * u

    def _attention(self, q, k, v, mask, is_causal=False):
        """q [n, H, T, D], k/v [n, KV, S, D], mask bool [n or 1, 1, T, S] (True = attend) or None."""
        cap = self.fam.attn_softcap
        if cap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                                  scale=self.scale, enable_gqa=True)
        # Soft-capped scores (gemma2): tanh(s / cap) * cap before the mask; SDPA has no such hook.
        # Grouped-query attention as one matmul per KV head group: the query heads that share a KV
        # head are stacked along the query axis, so K and V are read in place, never repeated.
        n, H, T, D = q.shape
        KV = k.shape[1]
        rep = H // KV
        qg = q.reshape(n, KV, rep * T, D)
        if k.dtype != torch.float32:
            # A bf16 bmm copies a K^T sliced from the cache into a transposed layout first (207 us per
            # layer at 16 rows x 201 positions, measured); a sequential copy of K, then its transposed
            # view: 83 us. (An fp32 cache read in place was no faster: twice the bytes to read.)
            k = k.contiguous()
        s = torch.matmul(qg, k.transpose(-1, -2)).float()  # [n, KV, rep*T, S]
        s = s.mul_(self.scale / cap).tanh_().mul_(cap)
        S = s.shape[-1]
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=s.device).tril(S - T)[None, None]
        s = s.view(n, KV, rep, T, S).masked_fill_(~mask[:, :, None], float("-inf")).view(n, KV, rep * T, S)
        o = torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v)  # [n, KV, rep*T, D]
        return o.view(n, H, T, D)

    def _layers(self, x, cos, sin, lora, attend):
        n, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        fam = self.fam
        for i, lw in enumerate(self.layers):
            h = self._norm(x, lw["ln1"])
            qkv = self._proj(h, lw["qkv"], lw["qkv_b"], GROUPS[0], lora, i)
            qk, v = qkv.split([(H + KV) * D, KV * D], dim=-1)
            qk = qk.view(n, T, H + KV, D)
            if fam.qk_norm:  # qwen3: RMSNorm over each head's dims, before RoPE
                qk = torch.cat([self._norm(qk[:, :, :H], lw["q_norm"]), self._norm(qk[:, :, H:], lw["k_norm"])], dim=2)
            qk = self._rope(qk, cos, sin)  # q and k heads rotated together
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
            v = v.view(n, T, KV, D).transpose(1, 2)
            o = attend(i, q, k, v)  # [n, H, T, D]
            o = o.transpose(1, 2).reshape(n, T, H * D)
            o = self._proj(o, lw["o"], lw["o_b"], GROUPS[1], lora, i)
            if fam.sandwich:
                o = self._norm(o, lw["post_attn"])
            x = x + o
            h = self._norm(x, lw["ln2"])
            gu = self._proj(h, lw["gate_up"], lw["gate_up_b"], GROUPS[2], lora, i)
            g, u = gu.chunk(2, dim=-1)
            f = self._proj(self._act(g, u), lw["down"], lw["down_b"], GROUPS[3], lora, i)
            if fam.sandwich:
                f = self._norm(f, lw["post_ffn"])
            x = x + f
        return self._norm(x, self.final_norm)

    def _embed(self, ids):
        x = self.embed[ids]
        return x * self.embed_scale if self.embed_scale is not None else x

    def _logits(self, h):
        logits = linear(h, self.lm_head).float()
        cap = self.fam.final_softcap
        return logits.div_(cap).tanh_().mul_(cap) if cap else logits

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, kv_rows: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Prompts ids [n, T] (right-padded; lengths [n]) into KV rows kv_rows [n], each row with its
        adapter slot (0 = none); logits of each last token [n, V]."""
        n, T = ids.shape
        lora = self._gather(slots, keep=False)
        x = self._embed(ids)
        cos, sin = self.cos[:T][None, :, None], self.sin[:T][None, :, None]  # [1, T, 1, D]
        # Causal attention within each prompt: padding sits after a row's last token, so it never
        # influences that row's real positions. A sliding window adds j > i - W.
        masks = self._window_masks(T)

        def attend(i, q, k, v):
            self.k_cache[i, kv_rows, :, :T] = k
            self.v_cache[i, kv_rows, :, :T] = v
            w_ = self.windows[i]
            return self._attention(q, k, v, masks[w_] if w_ is not None else None, is_causal=True)

        h = self._layers(x, cos, sin, lora, attend)
        last = h[torch.arange(n, device=self.device), lengths - 1]
        return self._logits(last)

    def _window_masks(self, T: int) -> dict[int, torch.Tensor]:
        """Causal masks over T positions with each layer's sliding window W (j <= i and j > i - W),
        [1, 1, T, T] (True = attend), by window length; full-attention layers need none."""
        i_, j_ = torch.arange(T, device=self.device)[:, None], torch.arange(T, device=self.device)[None]
        return {w_: ((j_ <= i_) & (j_ > i_ - w_))[None, None] for w_ in set(self.windows) if w_ is not None}

    def _uncached(self, ids: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Final hidden states [n, T, hidden] of prompts ids [n, T] (right-padded), each row with its
        adapter slot, writing no KV row: embeddings and prompt logprobs."""
        T = ids.shape[1]
        lora = self._gather(slots, keep=False)
        cos, sin = self.cos[:T][None, :, None], self.sin[:T][None, :, None]
        masks = self._window_masks(T)

        def attend(i, q, k, v):
            w_ = self.windows[i]
            return self._attention(q, k, v, masks[w_] if w_ is not None else None, is_causal=True)

        return self._layers(self._embed(ids), cos, sin, lora, attend)

    @torch.inference_mode()
    def embeddings(self, ids: torch.Tensor, lengths: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Mean-pooled last hidden state (after the final norm) of each right-padded prompt ids [n, T]
        (lengths [n]), each row with its adapter slot: [n, hidden] float32. Writes no KV row."""
        h = self._uncached(ids, slots).float()
        keep = (torch.arange(ids.shape[1], device=self.device)[None] < lengths[:, None]).float()[..., None]
        return (h * keep).sum(1) / lengths[:, None].float()

    @torch.inference_mode()
    def clear_row(self, row: int) -> None:
        self.k_cache[:, row].zero_()
        self.v_cache[:, row].zero_()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """One token for each of KV rows 0..n-1: tokens [n] at positions pos [n], row b with adapter
        slot slots[b]; logits [n, V]. Rows with no sequence are fed token 0 at position 0; they only
        ever write their own row."""
        n = tokens.shape[0]
        lora = self._gather(slots, keep=True)
        x = self._embed(tokens)[:, None]  # [n, 1, hidden]
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [n, 1, 1, D]
        span = int(pos.max()) + 1
        rows = torch.arange(n, device=self.device)
        j = torch.arange(span, device=self.device)[None]
        # mask[b, j] = j <= pos[b]: each row sees its own history only (and its window's part of it).
        masks = {None: (j <= pos[:, None])[:, None, None]}  # [n, 1, 1, span]
        for w_ in set(self.windows):
            if w_ is not None:
                masks[w_] = ((j <= pos[:, None]) & (j > pos[:, None] - w_))[:, None, None]

        def attend(i, q, k, v):
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            return self._attention(q, kc[:n, :, :span], vc[:n, :, :span], masks[self.windows[i]])

        h = self._layers(x, cos, sin, lora, attend)
        return self._logits(h[:, 0])

    @torch.inference_mode()
    def prompt_logprobs(self, ids: torch.Tensor, slot: int) -> torch.Tensor:
        """Log-probabilities [T, V] float32 of the next token after each position of one prompt ids [T],
        with adapter slot `slot` (0 = none), for `echo` with `logprobs`. Writes no KV row."""
        h = self._uncached(ids[None], [slot])
        return torch.log_softmax(self._logits(h[0]), -1)


def supports(config) -> bool:
    try:
        family_of(config)
        return True
    except PluralError:
        return False

