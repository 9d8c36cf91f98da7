"""What the engine needs from a model: the `Runner` protocol, and which runner serves a model.

Two implementations: `FusedRunner` (fused.py), plural's own lean forward for the Llama-like
families (families.py), optionally int4; and `GenericRunner` (generic.py), the model's own
forward with plural's per-row KV cache and per-row LoRA, for any other decoder-only causal LM.
The server picks the fused one where the architecture is supported and says which at start-up
and in `/health`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from plural.errors import PluralError


class Runner(Protocol):
    kind: str  # "fused" | "generic"
    family: str  # the model type it runs
    rows: int  # KV-cache rows: sequences that can run at once
    max_len: int  # prompt + completion tokens per row

    def describe(self) -> str: ...

    # Adapters: checked at registration (tensor names and shapes from the file header), read on
    # the loader thread, written into / cleared from a slot on the engine thread. Slot 0 = none.
    def check_adapter(self, path: Path, shapes_on_disk: dict[str, tuple[int, ...]], rank: int) -> None: ...

    def read_adapter(self, weights: Path, rank: int, scale: float, sha256: str = "") -> object: ...

    def write_slot(self, slot: int, weights: object) -> None: ...

    def clear_slot(self, slot: int) -> None: ...

    # The forward. prefill: prompts ids [n, T] right-padded (lengths [n]) into KV rows kv_rows [n];
    # decode: one token for each of rows 0..n-1 at positions pos [n]. Both take each row's adapter
    # slot and return the logits of each row's last token, [n, V] float32.
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, kv_rows: torch.Tensor, slots: list[int]) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, slots: list[int]) -> torch.Tensor: ...

    # Zero KV row `row` after a sequence in it failed: a decode step reads every row up to the
    # batch's longest position, and masked-out NaN still poisons attention (softmax weight 0 x NaN
    # value = NaN), so a non-finite cache left by a diverged adapter would fail the row's next tenant.
    def clear_row(self, row: int) -> None: ...

    # /v1/embeddings: mean-pooled last hidden state of right-padded prompts [n, T] -> [n, hidden] float32.
    def embeddings(self, ids: torch.Tensor, lengths: torch.Tensor, slots: list[int]) -> torch.Tensor: ...

    # `echo` with `logprobs`: log-softmax [T, V] float32 at every position of one prompt ids [T] under
    # adapter slot `slot`; row t is the distribution of token t + 1. Writes no KV row.
    def prompt_logprobs(self, ids: torch.Tensor, slot: int) -> torch.Tensor: ...


RUNNERS = ("auto", "fused", "generic")


def make_runner(hf_model, *, rows: int, max_len: int, dtype: torch.dtype, device: torch.device, quantize: str,
                max_loras: int, max_lora_rank: int, runner: str = "auto") -> Runner:
    """The fused runner where it supports the model (and `runner` allows), else the generic one."""
    from plural.serve.fused import FusedRunner, supports
    from plural.serve.generic import GenericRunner

    cfg = hf_model.config
    if runner not in RUNNERS:
        raise PluralError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    fused_ok = supports(cfg)
    if runner == "fused" and not fused_ok:
        from plural.serve.families import family_of

        family_of(cfg)  # raises with the reason
    if runner != "generic" and fused_ok:
        return FusedRunner(hf_model, rows=rows, max_len=max_len, dtype=dtype, device=device, quantize=quantize,
                           max_loras=max_loras, max_lora_rank=max_lora_rank)
    if quantize != "none":
        raise PluralError(f"quantize: {quantize} needs the fused runner, which does not run model type "
                          f"{cfg.model_type!r}; serve it without --quantize")
    return GenericRunner(hf_model, rows=rows, max_len=max_len, dtype=dtype, device=device,
                         max_loras=max_loras, max_lora_rank=max_lora_rank)
