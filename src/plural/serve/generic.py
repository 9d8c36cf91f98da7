"""The generic runner: any decoder-only `AutoModelForCausalLM`, through the model's own forward.

For families the fused runner does not compute (Phi-3 with its fused `qkv_proj` / `gate_up_proj`,
and whatever a user brings), the model's own `forward` runs with two things plural supplies:

- `RowCache`, a per-row KV cache in transformers' cache protocol (`update(key, value, layer)`):
  preallocated rows, each sequence writing at its own positions, so requests join and leave the
  batch between steps as in the fused runner. transformers 5's own continuous batching
  (`generate_batch`, a paged cache) schedules requests itself and runs them through its own
  loop; plural's scheduler, per-row LoRA slots and streaming need the forward alone, and its
  `StaticCache` shares one write position across the batch. So the cache is plural's, and the
  attention mask is passed as a ready 4D mask (transformers uses such a mask as given), built
  from each row's positions and the model's sliding window, if it has one.
- `RowLoRA`, a wrapper on each linear layer of the decoder that adds every row's own adapter
  delta, (x A_s^T) B_s^T · scale_s, to the base output (as the fused runner does per projection).

Prompts are left-padded in a prefill so every row's last prompt token is at the same position and
the model's own head (with any soft-capping or logit scaling it has) computes just that position
(`logits_to_keep=1`). Row b's cache index is then its position plus its padding, `start[b]`; the
cache holds 2·max_len positions so that any padding fits.

At start-up the runner checks itself against the model's plain forward (prefill + decode against
one full pass); a model that does not behave as a causal decoder under a KV cache (an encoder such
as BERT) is refused with that reason.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn as nn

from plural.errors import PluralError
from plural.serve.lora import lora_module


class RowCache:
    """K, V per layer: [rows, 2·max_len, kv_heads, head_dim]; `index` [n, T] the cache index each new
    token of the call's rows writes; reads return rows `rows` up to `span`, heads first."""

    is_compileable = False

    def __init__(self, n_layers: int, rows: int, length: int, kv_heads: int, head_dim: int, dtype, device):
        self.k = [torch.zeros(rows, length, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.rows = self.index = None
        self.span = 0
        self.contiguous = False  # rows are 0..n-1: read a view instead of gathering

    def set(self, rows: torch.Tensor, index: torch.Tensor, span: int, contiguous: bool) -> None:
        self.rows, self.index, self.span, self.contiguous = rows, index, span, contiguous

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states [n, kv_heads, T, D] -> written at [rows[b], index[b, t]]
        k, v = self.k[layer_idx], self.v[layer_idx]
        r = self.rows[:, None]
        k[r, self.index] = key_states.transpose(1, 2).to(k.dtype)
        v[r, self.index] = value_states.transpose(1, 2).to(v.dtype)
        if self.contiguous:
            n = self.rows.shape[0]
            return k[:n, :self.span].transpose(1, 2), v[:n, :self.span].transpose(1, 2)
        return k[self.rows, :self.span].transpose(1, 2), v[self.rows, :self.span].transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.span

    def __len__(self) -> int:
        return len(self.k)


class LoraStack:
    """One linear layer's factors for every slot: A^T [S, in, R], B^T·scale [S, R, out] (fp32)."""

    def __init__(self, n_slots: int, inp: int, out: int, rank: int, device):
        self.at = torch.zeros(n_slots, inp, rank, device=device)
        self.bt = torch.zeros(n_slots, rank, out, device=device)
        self.used: set[int] = set()


class RowLoRA(nn.Module):
    """A base nn.Linear plus each row's adapter delta; `cur` holds the gathered factors of the batch."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.stack: LoraStack | None = None
        self.cur: tuple[torch.Tensor, torch.Tensor] | None = None  # A^T [n, in, r], B^T [n, r, out]

    def forward(self, x):
        y = self.base(x)
        if self.cur is None:
            return y
        a, b = self.cur
        lead = x.shape[:-1]
        x3 = x.reshape(a.shape[0], -1, x.shape[-1]).float()  # [n, T, in]
        return y + torch.bmm(torch.bmm(x3, a), b).view(*lead, -1).to(y.dtype)


class GenericRunner:
    kind = "generic"

    def __init__(self, hf_model, rows: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 max_loras: int = 1, max_lora_rank: int = 8):
        cfg = hf_model.config
        if getattr(cfg, "is_encoder_decoder", False):
            raise PluralError(f"model type {cfg.model_type!r} is an encoder-decoder model; plural serves decoder-only causal LMs")
        self.cfg, self.family = cfg, cfg.model_type
        self.dtype, self.device = dtype, device
        self.model = hf_model.to(device=device, dtype=torch.float32).eval()
        self._check_causal()  # in fp32, where a causal model's difference is rounding only
        self.model = self.model.to(dtype)
        self.dtype, self.device = dtype, device
        self.rows, self.max_len = rows, max_len
        self.max_rank, self.n_slots = max_lora_rank, max_loras + 1
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads = text_cfg.num_attention_heads
        kv = getattr(text_cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
        self.cache = RowCache(text_cfg.num_hidden_layers, rows, 2 * max_len, kv, head_dim, dtype, device)
        self.start = torch.zeros(rows, dtype=torch.long, device=device)  # left padding of each row's prefill
        self.window = getattr(text_cfg, "sliding_window", None)
        types = getattr(text_cfg, "layer_types", None) or []
        self.mask_per_type = "sliding_attention" in types  # the model looks its masks up by layer type
        # Every linear layer of the decoder can carry a LoRA delta (PEFT's all-linear: not the output layer).
        self.linears: dict[str, RowLoRA] = {}
        out_layer = hf_model.get_output_embeddings()
        for name, mod in list(self.model.named_modules()):
            for child_name, child in list(mod.named_children()):
                if isinstance(child, nn.Linear) and child is not out_layer:
                    full = f"{name}.{child_name}" if name else child_name
                    wrapped = RowLoRA(child)
                    setattr(mod, child_name, wrapped)
                    self.linears[full] = wrapped
        self.slot_rank = [0] * self.n_slots
        self._key = None
        # transformers renamed `past_key_values` to `cache` (5.x, the old name deprecated until 5.40).
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._self_check()

    def describe(self) -> str:
        return f"generic ({self.family})"

    # ---- adapters -------------------------------------------------------------------------------

    def check_adapter(self, path: Path, shapes_on_disk: dict[str, tuple[int, ...]], rank: int) -> None:
        if not shapes_on_disk:
            raise PluralError(f"adapter {path}: adapter_model.safetensors holds no tensors")
        parsed = {k: lora_module(k) for k in shapes_on_disk}
        unknown = sorted({(p or (k, ""))[0] for k, p in parsed.items() if p is None or p[0] not in self.linears})
        if unknown:
            raise PluralError(f"adapter {path}: {len(unknown)} target module(s) do not exist as linear layers of the "
                              f"served base: {', '.join(unknown[:6])}{' …' if len(unknown) > 6 else ''}")
        for key, (mod, ab) in parsed.items():
            base = self.linears[mod].base
            want = (rank, base.in_features) if ab == "A" else (base.out_features, rank)
            if tuple(shapes_on_disk[key]) != want:
                raise PluralError(f"adapter {path}: tensor {key} has shape {list(shapes_on_disk[key])} but the served "
                                  f"base needs {list(want)}; the adapter was made for a different base model")

    def read_adapter(self, weights: Path, rank: int, scale: float, sha256: str = ""):
        from plural.serve.lora import read_verified

        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in read_verified(weights, sha256).items():
            mod, ab = lora_module(key)
            pairs.setdefault(mod, {})[ab] = t.float() * (scale if ab == "B" else 1.0)
        return rank, pairs

    def write_slot(self, slot: int, w) -> None:
        rank, pairs = w
        self.clear_slot(slot)
        for mod, f in pairs.items():
            lin = self.linears[mod]
            if lin.stack is None:  # allocated the first time any adapter targets this layer
                lin.stack = LoraStack(self.n_slots, lin.base.in_features, lin.base.out_features, self.max_rank, self.device)
            lin.stack.at[slot, :, :rank] = f["A"].T
            lin.stack.bt[slot, :rank] = f["B"].T
            lin.stack.used.add(slot)
        self.slot_rank[slot] = rank
        self._key = None

    def clear_slot(self, slot: int) -> None:
        for lin in self.linears.values():
            if lin.stack is not None and slot in lin.stack.used:
                lin.stack.at[slot].zero_()
                lin.stack.bt[slot].zero_()
                lin.stack.used.discard(slot)
        self.slot_rank[slot] = 0
        self._key = None

    def _set_slots(self, slots: list[int]) -> None:
        key = tuple(slots)
        if key == self._key:
            return
        self._key = key
        r = max(self.slot_rank[s] for s in slots)
        ix = torch.tensor(slots, device=self.device)
        for lin in self.linears.values():
            st = lin.stack
            if r == 0 or st is None or not st.used.intersection(slots):
                lin.cur = None
            else:
                lin.cur = (st.at.index_select(0, ix)[:, :, :r], st.bt.index_select(0, ix)[:, :r])

    # ---- the forward ----------------------------------------------------------------------------

    def _mask(self, q_index: torch.Tensor, kv_start: torch.Tensor, span: int) -> torch.Tensor | dict:
        """Additive 4D mask [n, 1, T, span]: row b's query at cache index q attends to [start_b, q]
        (and only to its last `sliding_window` tokens on sliding layers)."""
        j = torch.arange(span, device=self.device)[None, None]
        q = q_index[:, :, None]
        ok = (j <= q) & (j >= kv_start[:, None, None])
        neg = torch.finfo(self.dtype).min

        def additive(allowed):
            return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(~allowed, neg)[:, None]

        full = additive(ok)
        if not self.window:
            return full
        sliding = additive(ok & (j > q - self.window))
        return {"full_attention": full, "sliding_attention": sliding} if self.mask_per_type else sliding

    def _forward(self, ids, positions, index, rows, span, contiguous, slots):
        self._set_slots(slots)
        self.cache.set(rows, index, span, contiguous)
        mask = self._mask(index, self.start[rows], span)
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, logits_to_keep=1,
                         **{self._cache_kw: self.cache})
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, kv_rows: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Prompts ids [n, T] (right-padded; lengths [n]) into KV rows kv_rows [n]; logits of each last token [n, V]."""
        n, T = ids.shape
        pad = T - lengths  # move each prompt to the right end: every last token at T - 1
        t = torch.arange(T, device=self.device)[None]
        src = (t - pad[:, None]).clamp(min=0)
        left = torch.where(t >= pad[:, None], ids.gather(1, src), torch.zeros_like(ids))
        self.start[kv_rows] = pad
        positions = (t - pad[:, None]).clamp(min=0)
        return self._forward(left, positions, t.expand(n, T), kv_rows, T, False, slots)

    @torch.inference_mode()
    def embeddings(self, ids: torch.Tensor, lengths: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Mean-pooled last hidden state of each right-padded prompt ids [n, T] (lengths [n]): [n, hidden]
        float32. The model's own forward without the KV cache (transformers' last hidden state is after
        the final norm)."""
        self._set_slots(slots)
        keep = torch.arange(ids.shape[1], device=self.device)[None] < lengths[:, None]
        out = self.model(input_ids=ids, attention_mask=keep.long(), use_cache=False, output_hidden_states=True)
        h = out.hidden_states[-1].float() * keep.float()[..., None]
        return h.sum(1) / lengths[:, None].float()

    @torch.inference_mode()
    def prompt_logprobs(self, ids: torch.Tensor, slot: int) -> torch.Tensor:
        """Log-probabilities [T, V] float32 of the next token after each position of one prompt ids [T],
        with adapter slot `slot`: the model's own forward (and head) over all positions, no KV cache."""
        self._set_slots([slot])
        logits = self.model(input_ids=ids[None], use_cache=False).logits[0].float()
        return torch.log_softmax(logits, -1)

    @torch.inference_mode()
    def clear_row(self, row: int) -> None:
        for t in (*self.cache.k, *self.cache.v):
            t[row].zero_()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """One token for each of KV rows 0..n-1 at positions pos [n] (rows with no sequence: token 0, position 0)."""
        n = tokens.shape[0]
        rows = torch.arange(n, device=self.device)
        index = pos + self.start[:n]
        return self._forward(tokens[:, None], pos[:, None], index[:, None], rows, int(index.max()) + 1, True, slots)

    def _probes(self):
        vocab = self.cfg.get_text_config().vocab_size
        return (torch.tensor([[11, 22, 33, 44, 55, 66]], device=self.device) % vocab,
                torch.tensor([[71, 82, 93, 104, 115, 126]], device=self.device) % vocab)

    def _plain(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits[0].float()

    def _check_causal(self) -> None:
        """The logits of a prompt's first 4 tokens must not change when 2 more follow (an encoder
        such as BERT fails this). Measured against how much the logits change between two different
        prompts, in fp32, where a causal model differs by rounding only (~1e-6 of that)."""
        probe, other = self._probes()
        with torch.inference_mode():
            full = self._plain(probe)
            scale = float((full - self._plain(other)).abs().max()) or 1.0
            moved = float((self._plain(probe[:, :4]) - full[:4]).abs().max())
        if moved > 1e-3 * scale:
            raise PluralError(f"model type {self.cfg.model_type!r} is not causal (later tokens change earlier ones: "
                              "an encoder?); plural serves decoder-only causal LMs")

    def _self_check(self) -> None:
        """Prefill 4 tokens and decode 2 through the row cache: the same logits as one plain pass of
        all 6 (relative to the logits' change between prompts, so it means the same in bf16)."""
        probe, other = self._probes()
        with torch.inference_mode():
            full = self._plain(probe)
            scale = float((full - self._plain(other)).abs().max()) or 1.0
            got = [self.prefill(probe[:, :4], torch.tensor([4], device=self.device), torch.tensor([0], device=self.device), [0])[0]]
            for i in (4, 5):
                got.append(self.decode(probe[0, i:i + 1], torch.tensor([i], device=self.device), [0])[0])
        if float((torch.stack(got) - full[3:]).abs().max()) > 0.05 * scale:
            raise PluralError(f"model type {self.cfg.model_type!r} does not decode as a causal LM with a KV cache (it has "
                              "its own attention scheme); plural serves decoder-only causal LMs")
