"""FedProx's proximal term on a node (Li et al., MLSys 2020): loss + mu/2·‖w − w_global‖².

tune.loop.fit divides the summed token loss of a step by the step's trained-token count N, so
the term is added as (mu/2·‖w − w_global‖²)·n per micro-batch of n tokens: summed over the step
and divided by N it contributes exactly mu/2·‖w − w_global‖² per optimizer step.
"""

from __future__ import annotations

import torch
from torch import nn

from plural.data.chat import IGNORE
from plural.tune.loop import TokenLoss


class ProxLoss(nn.Module):
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

    def forward(self, input_ids, labels, position_ids) -> torch.Tensor:
        n = (labels[:, 1:] != IGNORE).sum()
        return self.inner(input_ids, labels, position_ids) + self.proximal() * n
