"""What a train call carries from one step to the next: the adaptive KL coefficient and
the learning-rate schedule.

The learning rate is a pure function of the optimizer-step index (the engine's step
times the steps per call, plus the mini-batch), so it needs no state: a resumed run,
or one under another plan, gets the same rates. The adaptive KL coefficient depends
on the KLs observed so far: an `AdaptiveKL` per trained model holds it as plain numbers
(`state_dict()` / `load_state_dict()`), saved with the model in checkpoints
(`calls.model_state`).
"""

from __future__ import annotations

import math


def lr_factor(schedule: str, update: int, total: int, warmup: int) -> float:
    """The learning rate's multiple of its base at optimizer step `update` (0-based) of
    `total`: linear warm-up from 0 over `warmup` steps, then constant, linear decay to 0
    or a half-cosine to 0 over the remaining steps (the Hugging Face schedulers)."""
    if update < warmup:
        return (update + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(max(update - warmup, 0) / max(total - warmup, 1), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r}")


class AdaptiveKL:
    """Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"), eq. 2:
    e = clip(KL / target - 1, -0.2, 0.2), coef <- coef * (1 + e * n / horizon), with KL the
    batch's mean per-sequence KL and n its rows. target 0: the coefficient stays fixed."""

    def __init__(self, coef: float, target: float, horizon: float):
        self.coef, self.target, self.horizon = float(coef), float(target), float(horizon)

    def update(self, kl: float, rows: int) -> None:
        if self.target <= 0:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * rows / self.horizon

    def state_dict(self) -> dict:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.coef, self.target, self.horizon = (float(state[k]) for k in ("coef", "target", "horizon"))
