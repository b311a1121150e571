"""Self-play objectives: a loss and per-example metrics from sequence log-probs (torch only).

An objective sees, for every kind of response a round provides ("real", "synthetic", ...), the
summed response log-probs of each prompt's response under the policy and, for methods that have
one, under the opponent. It returns the scalar loss and a per-example tensor for each name in
`metric_names`. How the responses are produced (generated, read back, cached) is not its business.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from spinlab.errors import ConfigError

Logps = dict[str, torch.Tensor]


class Objective:
    """The interface every method fits; `kinds` are the responses it needs for each prompt."""

    name: str = "SPIN"  # as printed and reported
    kinds: tuple[str, ...] = ("real", "synthetic")
    needs_opponent: bool = True
    metric_names: tuple[str, ...] = ()

    def __call__(self, policy: Logps, opponent: Logps | None, lam: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def at_round(self, index: int) -> Objective:
        """The objective that round `index` (0, 1, ...) trains with; a method whose constants
        follow a per-round schedule returns a copy with that round's values."""
        return self


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

    name = "SFT"
    kinds = ("real",)
    needs_opponent = False
    metric_names = ("loss", "logp_real")

    def __call__(self, policy: Logps, opponent: Logps | None, lam: float) -> dict[str, torch.Tensor]:
        return {"loss": -policy["real"].sum() / policy["tokens"].clamp(min=1), "logp_real": policy["real"]}


class TSPIN(Objective):
    """T-SPIN (arXiv 2601.08198, Eq. 7, in the form of the paper's Appendix D pseudocode):

        ℓ(α[log pθ(y|x) − log pθ(y'|x)]) + β·ℓ(α[log pθ(y'|x) − log pθ(y0|x)])

    y real, y' synthetic (sampled from the opponent θ_t), y0 proto-synthetic (sampled once from
    the initial policy θ_0 and kept for every round). The first term is the current advantage,
    the second the historical one. The reward is α·log pθ (Eq. 6, from the entropy-constrained
    opponent of Eq. 5 and Proposition 1): no reference model, so the opponent's log-probs and
    `lam` are not used; α plays λ's part.

    Paper defaults (Sec. 4.3): α = 1.0, β = 0.1, and β = 0 in round 0, where θ_t = θ_0 and the
    historical advantage carries no information (`beta_first_round`). ℓ is the logistic loss
    in the paper's experiments (Sec. 4.1); Eq. 4 admits any monotonically decreasing ℓ.
    """

    name = "T-SPIN"
    kinds = ("real", "synthetic", "proto")
    needs_opponent = False
    metric_names = (
        "loss",
        "margin",
        "margin_history",
        "accuracy",
        "reward_real",
        "reward_synthetic",
        "reward_proto",
        "logp_real",
        "logp_synthetic",
        "logp_proto",
    )

    def __init__(
        self,
        loss: Callable[[torch.Tensor], torch.Tensor],
        alpha: float = 1.0,
        beta: float = 0.1,
        beta_first_round: float = 0.0,
    ):
        if alpha <= 0:
            raise ConfigError(f"T-SPIN: alpha (the reward scale) must be > 0, got {alpha}")
        if beta < 0 or beta_first_round < 0:
            raise ConfigError(
                f"T-SPIN: beta and beta_first_round must be >= 0, got {beta}, {beta_first_round}"
            )
        self.loss = loss
        self.alpha = alpha
        self.beta = beta
        self.beta_first_round = beta_first_round
        self.beta_now = beta  # the weight __call__ uses; at_round sets it from the schedule

    def at_round(self, index: int) -> TSPIN:
        this_round = copy.copy(self)
        this_round.beta_now = self.beta_first_round if index == 0 else self.beta
        return this_round

    def __call__(self, policy: Logps, opponent: Logps | None, lam: float) -> dict[str, torch.Tensor]:
        reward_real = self.alpha * policy["real"]
        reward_synthetic = self.alpha * policy["synthetic"]
        reward_proto = self.alpha * policy["proto"]
        margin = reward_real - reward_synthetic
        margin_history = reward_synthetic - reward_proto
        losses = self.loss(margin) + self.beta_now * self.loss(margin_history)
        return {
            "loss": losses.mean(),
            "margin": margin,
            "margin_history": margin_history,
            "accuracy": (margin > 0).float(),
            "reward_real": reward_real,
            "reward_synthetic": reward_synthetic,
            "reward_proto": reward_proto,
            "logp_real": policy["real"],
            "logp_synthetic": policy["synthetic"],
            "logp_proto": policy["proto"],
        }
