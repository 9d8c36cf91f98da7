"""A training forward for PEFT's LoRA linears with the adapter's update folded into one GEMM.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: after the two small matmuls it
makes two passes over the full [tokens, out_features] output (the multiply by `scaling`, then the
add), and the multiply has a backward pass of the same size. `torch.addmm(base, h, B.T,
alpha=scaling)` lets the GEMM scale its product and accumulate it into the base output, so neither
pass exists; in the backward the scaling lands on the [tokens, r] gradient of `h` instead. The
result is the same sum (bit-identical in fp32 when `scaling` is a power of two).

Measured on a 2-core AMD EPYC capped to AVX2 (fp32, SmolLM2-135M, LoRA r 16 on all seven
projections, 4 rows of 512 tokens, eager, alternating in one process): 0.92× the step time of
PEFT's forward; `torch.compile` of every decoder layer reached the same step time after 42 s of
compilation, so it is not used. Figures and commands: docs/benchmarks.md, "The LoRA update inside the GEMM".

The forward is set on each module instance (the PEFT classes are untouched) and hands every case it
does not cover back to PEFT's own forward: adapters disabled or merged (DPO's reference pass),
per-row `adapter_names`, several active adapters, variants such as DoRA, a bias on lora_B, and
mismatched dtypes outside autocast.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # Only set on exact peft.tuners.lora.layer.Linear instances, so type(self).forward is PEFT's.
    active = self.active_adapters
    ad = active[0] if len(active) == 1 else None
    if (args or kwargs or ad is None or self.disable_adapters or self.merged or ad not in self.lora_A
            or ad in self.lora_variant or self.lora_B[ad].bias is not None
            or (self.get_base_layer().weight.dtype != self.lora_A[ad].weight.dtype and not torch.is_autocast_enabled(x.device.type))):
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer(x)
    h = F.linear(self.lora_dropout[ad](self._cast_input_dtype(x, self.lora_A[ad].weight.dtype)), self.lora_A[ad].weight)
    out = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B[ad].weight.t(),
                      alpha=self.scaling[ad])
    return out.view(base.shape)


def fold_lora_updates(model: nn.Module) -> int:
    """Give every PEFT LoRA linear of `model` the addmm forward. Returns how many (idempotent)."""
    from peft.tuners.lora.layer import Linear

    n = 0
    for mod in model.modules():
        if type(mod) is Linear:  # subclasses (quantised bases, ...) keep their own forward
            if getattr(mod.forward, "__func__", None) is not _forward:
                mod.forward = types.MethodType(_forward, mod)
            n += 1
    return n
