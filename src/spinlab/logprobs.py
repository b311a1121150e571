"""Sequence log-probabilities of responses under a causal language model (torch only).

log p(y|x) is the sum of the response tokens' log-probs: prompt and padding are masked,
the closing EOS token is counted (design.md §1). The SPIN margin compares sums, not means,
so a per-token average here would change the objective.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token: logits [B, T, V] at position t score labels[:, t+1].

    Returns [B, T-1]; positions whose label is IGNORE_INDEX get 0.
    """
    logits = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    picked = torch.gather(logits, 2, safe.unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return logps * mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed response log-prob per sequence, [B]."""
    return token_logps(logits, labels).sum(-1)
