"""Recipe: Odds Ratio Preference Optimization of a LoRA adapter (`method: orpo`).

ORPO (Hong et al. 2024, arXiv:2403.07691) needs no reference model: it adds to the SFT loss on the
chosen answer a term that raises the odds of the chosen answer over the rejected one,

    loss = NLL(y_w|x) - λ log σ( log odds(y_w|x) - log odds(y_l|x) ),   odds(y|x) = P / (1 - P)

where P = exp(mean token log-prob of y) (eq. 4-6 of the paper; the mean, not the sum, keeps the
odds defined for long answers) and NLL is the mean token cross-entropy of the chosen answer.
λ is `preference.beta` (as in TRL). It can start from scratch (SFT and preference in one stage,
the point of the paper) or from an SFT adapter (`init_adapter:`).

The rows, the log-probs, the run folder and the save are DPO's (tune/dpo.py); only the loss differs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from plural.tune import loop
from plural.tune.config import TuneConfig
from plural.tune.dpo import pair_accuracy, save, sequence_logps, setup


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) from log P; log P is clamped just below 0 so 1 - P never reaches 0."""
    lp = mean_logp.clamp(max=-1e-6)
    return lp - torch.log1p(-torch.exp(lp))


def orpo_loss(mean_logp_chosen, mean_logp_rejected, lam: float) -> torch.Tensor:
    """Per-pair ORPO loss [B] from mean token log-probs [B]: NLL of chosen + λ × odds-ratio loss."""
    ratio = F.logsigmoid(log_odds(mean_logp_chosen) - log_odds(mean_logp_rejected))
    return -mean_logp_chosen - lam * ratio


class ORPOLoss(nn.Module):
    """forward(**collated rows) -> (Σ per-pair ORPO loss, number of pairs)."""

    def __init__(self, model: nn.Module, lam: float):
        super().__init__()
        self.model, self.lam = model, lam

    def _mean_logps(self, input_ids, labels, position_ids) -> torch.Tensor:
        logp, n = sequence_logps(self.model, input_ids, labels, position_ids)  # [B, 2] each
        return logp / n.clamp(min=1)

    def rewards(self, input_ids, labels, position_ids) -> torch.Tensor:
        """Log odds ratio of chosen over rejected per pair, [B] (positive: chosen preferred)."""
        m = self._mean_logps(input_ids, labels, position_ids)
        return log_odds(m[:, 0]) - log_odds(m[:, 1])

    def forward(self, input_ids, labels, position_ids) -> tuple[torch.Tensor, int]:
        m = self._mean_logps(input_ids, labels, position_ids)
        return orpo_loss(m[:, 0], m[:, 1], self.lam).sum(), input_ids.shape[0]


def run(cfg: TuneConfig, run_dir: Path, resume: bool = False) -> Path:
    cfg, device, dist, model, tok, stored, train_rows, eval_rows = setup(cfg, run_dir)
    loss_mod = ORPOLoss(model, cfg.preference.beta)
    res = loop.fit(cfg, run_dir, model, train_rows, eval_rows, tok.pad_token_id, dist, device, resume=resume, loss_module=loss_mod)
    extra = {"lambda": cfg.preference.beta}
    if eval_rows:
        amp = loop.autocast_dtype(cfg.train.precision, device)
        extra["eval_odds_accuracy"] = round(pair_accuracy(loss_mod, eval_rows, tok.pad_token_id, device, amp), 4)
    return save(cfg, run_dir, model, stored, res, dist, device, extra)
