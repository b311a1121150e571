"""Self-play objectives: a loss and per-example metrics from sequence log-probs (torch only).

An objective sees, for every kind of response a round provides ("real", "synthetic", ...), the
summed response log-probs of each prompt's response under the policy and, for methods that have
one, under the opponent. It returns the scalar loss and a per-example tensor for each name in
`metric_names`. How the responses are produced (generated, read back, cached) is not its business.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Logps = dict[str, torch.Tensor]


class Objective:
    """The interface every method fits; `kinds` are the responses it needs for each prompt."""

    kinds: tuple[str, ...] = ("real", "synthetic")
    needs_opponent: bool = True
    metric_names: tuple[str, ...] = ()

    def __call__(self, policy: Logps, opponent: Logps | None, lam: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class SPIN(Objective):
    """SPIN (arXiv 2401.01335, Eq. 4.7): ℓ of the margin
    λ·[log pθ(y|x) − log pθt(y|x)] − λ·[log pθ(y'|x) − log pθt(y'|x)], y real, y' synthetic."""

    metric_names = (
        "loss",
        "margin",
        "accuracy",
        "reward_real",
        "reward_synthetic",
        "logp_real",
        "logp_synthetic",
    )

    def __init__(self, loss: Callable[[torch.Tensor], torch.Tensor]):
        self.loss = loss

    def __call__(self, policy: Logps, opponent: Logps | None, lam: float) -> dict[str, torch.Tensor]:
        reward_real = lam * (policy["real"] - opponent["real"])
        reward_synthetic = lam * (policy["synthetic"] - opponent["synthetic"])
        margin = reward_real - reward_synthetic
        losses = self.loss(margin)
        return {
            "loss": losses.mean(),
            "margin": margin,
            "accuracy": (margin > 0).float(),
            "reward_real": reward_real,
            "reward_synthetic": reward_synthetic,
            "logp_real": policy["real"],
            "logp_synthetic": policy["synthetic"],
        }


class SFT(Objective):
    """Supervised fine-tuning: mean negative log-likelihood per real-response token.

    `tokens` (the number of scored response tokens in the batch) arrives under the kind "tokens".
    """

    kinds = ("real",)
    needs_opponent = False
    metric_names = ("loss", "logp_real")

    def __call__(self, policy: Logps, opponent: Logps | None, lam: float) -> dict[str, torch.Tensor]:
        return {"loss": -policy["real"].sum() / policy["tokens"].clamp(min=1), "logp_real": policy["real"]}
