"""The SPIN loss family: pure functions ℓ of the margin.

The margin is the argument of ℓ in the SPIN objective (arXiv 2401.01335, Eq. 4.7):

    margin = λ·[log pθ(y|x) − log pθt(y|x)] − λ·[log pθ(y'|x) − log pθt(y'|x)]

with y the real response and y' the synthetic one. Assumption 5.1 asks for ℓ monotone
decreasing and convex; the paper trains with the logistic loss and names hinge, exponential
and correlation as admissible. Each function maps a tensor of margins to per-pair losses;
the caller takes the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logistic(margin: torch.Tensor) -> torch.Tensor:
    """ℓ(t) = log(1 + exp(−t)), the paper's choice (Eq. 4.7); equals sigmoid DPO with β = λ."""
    return F.softplus(-margin)


def hinge(margin: torch.Tensor) -> torch.Tensor:
    """ℓ(t) = max(0, 1 − t) (Assumption 5.1)."""
    return torch.relu(1.0 - margin)


def exponential(margin: torch.Tensor) -> torch.Tensor:
    """ℓ(t) = exp(−t) (Assumption 5.1)."""
    return torch.exp(-margin)


def correlation(margin: torch.Tensor) -> torch.Tensor:
    """ℓ(t) = 1 − t (Assumption 5.1); unbounded below, so λ and the step count bound it."""
    return 1.0 - margin


def smoothed_logistic(margin: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Logistic loss with label smoothing ε: (1−ε)·ℓ(t) + ε·ℓ(−t), an ablation beyond the paper.

    With ε > 0 it is no longer monotone (it has a minimum at t = log((1−ε)/ε)), so it
    stops pushing the margin once real and synthetic are told apart with confidence.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    return (1.0 - label_smoothing) * F.softplus(-margin) + label_smoothing * F.softplus(margin)
