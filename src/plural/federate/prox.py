"""FedProx's proximal term on a node (Li et al., MLSys 2020): loss + mu/2·‖w − w_global‖².

A loss module returns (sum, count) and tune.loop.fit divides a step's summed loss by its global
count N of trained tokens, so the term is added as (mu/2·‖w − w_global‖²)·n per micro-batch of n
tokens: summed over the step and divided by N it contributes exactly mu/2·‖w − w_global‖² per
optimizer step.
"""

from __future__ import annotations

import torch
from torch import nn

from plural.tune.loop import TokenLoss


class ProxLoss(nn.Module):
    flat_max = TokenLoss.flat_max  # a token sum plus a term per token: the row layout does not matter

    def __init__(self, model: nn.Module, mu: float):
        super().__init__()
        self.inner = TokenLoss(model)
        self.mu = mu
        self.params = [p for p in model.parameters() if p.requires_grad]
        # The global weights this round started from (buffers: moved with .to(), not trained).
        for i, p in enumerate(self.params):
            self.register_buffer(f"ref{i}", p.detach().clone(), persistent=False)

    def proximal(self) -> torch.Tensor:
        return 0.5 * self.mu * sum((p - getattr(self, f"ref{i}")).pow(2).sum() for i, p in enumerate(self.params))

    def forward(self, input_ids, labels, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        total, n = self.inner(input_ids, labels, position_ids)
        return total + self.proximal() * n, n
