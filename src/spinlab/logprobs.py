"""Sequence log-probabilities of responses under a causal language model (torch only).

log p(y|x) is the sum of the response tokens' log-probs: prompt and padding are masked,
the closing EOS token is counted, since the model must learn where a response ends. The SPIN margin compares sums, not means,
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


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the scored targets, labels[:, 1:] != IGNORE_INDEX. On a GPU this is a
    host synchronisation (the count decides the size), so collate computes it on the host."""
    return (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    sequence_ids: torch.Tensor | None = None,
    positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_sequences: int | None = None,
) -> torch.Tensor:
    """Summed response log-prob per sequence: [B] for one sequence per row; for packed rows,
    one entry per sequence id (see SelfPlayDataModule's packing). `positions` and
    `num_sequences`, when given, are target_positions(labels) and the count of sequence ids."""
    per_token = token_logps(logits, labels)
    if sequence_ids is None:
        return per_token.sum(-1)
    rows, cols = target_positions(labels) if positions is None else positions
    return _sum_by_sequence(per_token[rows, cols], rows, cols, labels, sequence_ids, num_sequences)


def _sum_by_sequence(
    values: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    labels: torch.Tensor,
    sequence_ids,
    num_sequences: int | None = None,
) -> torch.Tensor:
    """Per-token values at target positions (rows, cols) summed per row, or per sequence id."""
    if sequence_ids is None:
        owner, count = rows, labels.shape[0]
    else:  # every sequence has at least its prompt's tokens, so ids run 0 .. max
        owner = sequence_ids[:, 1:][rows, cols]
        count = int(sequence_ids.max()) + 1 if num_sequences is None else num_sequences
    return torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, owner, values)


def output_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """float32 logits of the output layer: softcap · tanh(scale · (hidden Wᵀ + b) / softcap).

    The steps after the matmul are what some families add to `lm_head`: a bias (Phi), a scale
    (Cohere's `logit_scale`; Granite's 1 / `logits_scaling`) and a final soft-cap (Gemma-2's
    `final_logit_softcapping`). All are per element or per column, so they apply chunk by chunk.
    """
    logits = (hidden @ weight.t()).float()
    if bias is not None:
        logits = logits + bias.float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _selected_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    logits = output_logits(hidden, weight, bias, scale, softcap)
    picked = torch.gather(logits, 1, targets.unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1)


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 256,
    positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The log-prob of every scored token (labels[:, 1:] != IGNORE_INDEX), and its (rows, cols),
    from final hidden states and the output layer (see `output_logits`), `chunk_size` tokens at a
    time; each chunk is recomputed in the backward pass instead of stored."""
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, 1:]
    rows, cols = target_positions(labels) if positions is None else positions
    h = hidden[:, :-1][rows, cols]
    t = targets[rows, cols]
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    parts = []
    for start in range(0, t.numel(), chunk_size):
        args = (h[start : start + chunk_size], weight, t[start : start + chunk_size], bias, scale, softcap)
        parts.append(
            checkpoint(_selected_logps, *args, use_reentrant=False) if grad else _selected_logps(*args)
        )
    per_token = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return per_token, (rows, cols)


def chunked_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 256,
    sequence_ids: torch.Tensor | None = None,
    positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_sequences: int | None = None,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Summed response log-prob per sequence from final hidden states and the output layer.

    Same value as `sequence_logps(output_logits(hidden, weight, bias, scale, softcap), labels)`,
    but the vocabulary projection runs only on response positions, `chunk_size` tokens at a time,
    and each chunk is recomputed in the backward pass instead of stored: the [B, T, V] logits,
    which dominate memory for small models with large vocabularies, never exist. With
    `sequence_ids` (packed rows), sums are per sequence id instead of per row. `positions` and
    `num_sequences` as for sequence_logps: given, nothing here waits for the device.
    """
    per_token, (rows, cols) = chunked_token_logps(
        hidden, weight, labels, chunk_size, positions, bias, scale, softcap
    )
    return _sum_by_sequence(per_token, rows, cols, labels, sequence_ids, num_sequences)
