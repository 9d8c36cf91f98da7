"""The end-of-run answer to "did it learn?": the adapter's losses against the base's, and warnings.

A run that learned nothing looks like any other run (a falling loss curve, an adapter folder), so
at the end the recipe measures the base model (the adapter switched off) on the same training and
held-out rows, and warns, naming the knob to turn, when
- the held-out loss is not below the base's (nothing learned carries over to unseen examples);
- the held-out loss rose for the last RISES evaluations in a row (over-fitting);
- the training loss barely fell from the base's (too few steps or too small a learning rate).
"""

from __future__ import annotations

from pydantic import BaseModel

from plural.data.packing import Row

RISES = 3  # consecutive rising held-out evaluations that count as over-fitting
MIN_GAIN = 0.01  # nats per token: a held-out loss within this of the base's is "not better"
BARELY = 0.9  # training loss above this fraction of the base's: it barely learned the training data
TRAIN_SAMPLE = 32  # training rows measured (every k-th): the report costs about a tenth of a small run


class LearnReport(BaseModel):
    train_loss: float
    base_train_loss: float
    eval_loss: float | None = None
    base_eval_loss: float | None = None
    eval_history: list[tuple[int, float]] = []  # (step, held-out loss) of the periodic evaluations
    warnings: list[str] = []

    def lines(self) -> list[str]:
        out = [f"training loss {self.base_train_loss:.3f} (base) → {self.train_loss:.3f} (adapter)"]
        if self.eval_loss is not None:
            out.append(f"held-out loss {self.base_eval_loss:.3f} (base) → {self.eval_loss:.3f} (adapter)")
        else:
            out.append("no data.eval: give a held-out file to check that the adapter does better than the base on unseen examples")
        return out + [f"warning: {w}" for w in self.warnings]


def train_sample(rows: list[Row]) -> list[Row]:
    k = max(1, len(rows) // TRAIN_SAMPLE)
    return rows[::k][:TRAIN_SAMPLE]


def overfitting(history: list[tuple[int, float]]) -> str | None:
    if len(history) <= RISES:
        return None
    last = [l for _, l in history[-(RISES + 1):]]
    if not all(b > a for a, b in zip(last, last[1:])):
        return None
    step, best = min(history, key=lambda h: h[1])
    return (f"held-out loss rose for the last {RISES} evaluations (lowest {best:.3f} at step {step}, now {history[-1][1]:.3f}): "
            f"the adapter is over-fitting; lower train.epochs (or set train.max_steps: {step}) or train.lr")


def judge(train_loss: float, base_train_loss: float, eval_loss: float | None, base_eval_loss: float | None,
          eval_history: list[tuple[int, float]]) -> LearnReport:
    warnings = []
    if eval_loss is not None and base_eval_loss is not None and eval_loss > base_eval_loss - MIN_GAIN:
        warnings.append(f"the adapter is not better than the base on held-out data ({eval_loss:.3f} vs {base_eval_loss:.3f}): "
                        "raise train.epochs or train.lr, or add more varied phrasings to data.train")
    if (w := overfitting(eval_history)) is not None:
        warnings.append(w)
    if train_loss > BARELY * base_train_loss:
        warnings.append(f"the training loss barely fell ({base_train_loss:.3f} → {train_loss:.3f}): too few steps or too "
                        "small a learning rate; raise train.epochs or train.lr")
    return LearnReport(train_loss=train_loss, base_train_loss=base_train_loss, eval_loss=eval_loss, base_eval_loss=base_eval_loss,
                       eval_history=eval_history, warnings=warnings)


def measure(loss_mod, model, train_rows: list[Row], eval_rows: list[Row] | None, pad_id: int, device, amp,
            history: list[dict]) -> LearnReport:
    """Losses of the trained adapter and of the base (PEFT's disable_adapter) on the same rows."""
    from plural.tune.loop import evaluate

    sample = train_sample(train_rows)
    tl = evaluate(loss_mod, sample, pad_id, device, amp)
    el = evaluate(loss_mod, eval_rows, pad_id, device, amp) if eval_rows else None
    with model.disable_adapter():
        btl = evaluate(loss_mod, sample, pad_id, device, amp)
        bel = evaluate(loss_mod, eval_rows, pad_id, device, amp) if eval_rows else None
    hist = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    return judge(tl, btl, el, bel, hist)
