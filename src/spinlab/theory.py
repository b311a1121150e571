"""SPIN's theory, exactly, on a tabular (categorical) model.

P prompts with K possible responses each; p_data[x] is a known distribution over the K responses
and the policy is a table of logits θ[x, k], pθ(·|x) = softmax(θ[x]). One round t has the frozen
opponent p_t and minimises an objective of spinlab.objectives averaged exactly over the responses
(`objective_loss`); for SPIN (`SPIN(ℓ)`, ℓ from `spinlab.losses`) that is the population SPIN loss
(arXiv 2401.01335, Eq. 4.7)

    L(θ) = E_x Σ_y Σ_y' p_data(y|x) p_t(y'|x) ℓ(λ[log pθ(y|x) − log p_t(y|x)] − λ[log pθ(y'|x) − log p_t(y'|x)])

summed over all K×K pairs (no sampling). E_x is taken as a sum over prompts: each prompt's logits
then see the same gradient however many prompts there are, so a table of several λ (one per
prompt, shape [P, 1]) trains as if each ran alone.

Since log pθ(y|x) − log pθ(y'|x) = θ[x,y] − θ[x,y'], the margin is linear in θ: L is convex in θ
for every convex ℓ, and adding a constant to θ[x] changes neither L nor pθ.

- Theorem 5.2: pθ = p_data is a fixed point. Here every loss has zero gradient at θ_t when
  p_t = p_data, because the pair (y, y') and the pair (y', y) then carry the same weight.
- Theorem 5.4 (logistic ℓ): if the ideal update lies in the model class and θ_t+1 is the global
  minimum, p_t+1 ∝ p_t·(p_data/p_t)^(1/λ). A full-support logit table holds every full-support
  distribution, so here that is exact for every λ > 0 (see `closed_form_update`). In log space,
  log p_t+1 − log p_data = (1 − 1/λ)(log p_t − log p_data) + const(x): the rounds converge to
  p_data iff |1 − 1/λ| < 1, i.e. λ > 1/2. The exponential loss's minimiser is the same update
  with 2λ (its per-pair optimum is half the logistic one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from spinlab.objectives import Objective

OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def _log(p: torch.Tensor) -> torch.Tensor:
    # Diverging rounds drive probabilities to exactly 0; the floor keeps logits finite (no NaN).
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


def tv_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total variation ½Σ_y|p − q|, averaged over prompts."""
    return 0.5 * (p - q).abs().sum(-1).mean().item()


def closed_form_update(p_t: torch.Tensor, p_data: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Theorem 5.4: p_t+1 ∝ p_t·(p_data/p_t)^(1/λ), computed in log space, rows normalised."""
    log_p_t = _log(p_t)
    return torch.softmax(log_p_t + (_log(p_data) - log_p_t) / lam, dim=-1)


def closed_form_rounds(
    p0: torch.Tensor, p_data: torch.Tensor, lam: float | torch.Tensor, rounds: int
) -> list[torch.Tensor]:
    """[p_0, p_1, ..., p_rounds] under the ideal update of Theorem 5.4."""
    ps = [p0]
    for _ in range(rounds):
        ps.append(closed_form_update(ps[-1], p_data, lam))
    return ps


def _minimise(
    p_start: torch.Tensor, loss_of: Callable, steps: int, lr: float, optimizer: str
) -> torch.Tensor:
    """θ after `steps` full-batch steps on loss_of(θ) from θ = log p_start (rows normalised, so
    every margin against an opponent p_start is 0 at step 0). Adam and SGD decay lr linearly to 0;
    "lbfgs" runs up to `steps` L-BFGS iterations with a strong-Wolfe line search (lr is its
    first step) and stops once the largest gradient entry is below 1e-10, or earlier where float64
    can no longer tell the line search's losses apart (observed: gradients of 1e-9 to 1e-10)."""
    theta = torch.log_softmax(_log(p_start), dim=-1).clone().requires_grad_(True)
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            [theta],
            lr=lr,
            max_iter=steps,
            tolerance_grad=1e-10,
            tolerance_change=0.0,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = loss_of(theta)
            loss.backward()
            return loss

        opt.step(closure)
        return theta.detach()
    opt = OPTIMIZERS[optimizer]([theta], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / steps)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(theta).backward()
        opt.step()
        schedule.step()
    return theta.detach()


# A round provides, per prompt, one response of each kind the objective names. Each kind is drawn
# from its own distribution: "real" from p_data, "synthetic" from the opponent p_t, "proto" from the
# initial policy p_0 (T-SPIN). The population loss is the objective's per-example loss averaged
# exactly over every combination of responses, weighted by the product of their probabilities.


def sources_for_round(p_data: torch.Tensor, p_t: torch.Tensor, p0: torch.Tensor) -> dict[str, torch.Tensor]:
    """Which distribution each kind of response is drawn from in a round with opponent p_t."""
    return {"real": p_data, "synthetic": p_t, "proto": p0}


def objective_loss(
    theta: torch.Tensor,
    objective: Objective,
    sources: dict[str, torch.Tensor],
    p_opponent: torch.Tensor,
    lam: float | torch.Tensor,
) -> torch.Tensor:
    """Σ_x Σ_(y_1..y_n) Π_j sources[kind_j](y_j|x) · loss_objective(y_1..y_n): summed over prompts,
    exact over the K^n combinations of one response per kind.

    The objective is called on one combination at a time (torch.func.vmap over all of them), so its
    own `loss` (a batch mean) is that combination's loss. Each response counts as one token
    (the SFT objective's normaliser). `lam` is a number or one value per prompt ([P] or [P, 1]).
    """
    prompts, responses = theta.shape
    kinds = objective.kinds
    grid = torch.cartesian_prod(*[torch.arange(responses)] * len(kinds)).reshape(-1, len(kinds))
    log_policy = torch.log_softmax(theta, dim=-1)
    log_opponent = torch.log_softmax(_log(p_opponent), dim=-1)
    weight = torch.ones(prompts, len(grid), dtype=theta.dtype)
    policy, opponent = {}, {}
    for j, kind in enumerate(kinds):
        weight = weight * sources[kind][:, grid[:, j]]
        policy[kind] = log_policy[:, grid[:, j]].reshape(-1, 1)
        opponent[kind] = log_opponent[:, grid[:, j]].reshape(-1, 1)
    policy["tokens"] = torch.ones(prompts * len(grid), dtype=theta.dtype)  # 0-d per example, as a batch total
    lam = torch.as_tensor(lam, dtype=theta.dtype).reshape(-1, 1).expand(prompts, len(grid)).reshape(-1)
    if objective.needs_opponent:
        losses = torch.func.vmap(lambda p, o, lam_i: objective(p, o, lam_i)["loss"])(policy, opponent, lam)
    else:
        losses = torch.func.vmap(lambda p, lam_i: objective(p, None, lam_i)["loss"])(policy, lam)
    if losses.shape != (prompts * len(grid),):
        raise ValueError(
            f"{type(objective).__name__}: its loss must be a scalar per call, got {tuple(losses.shape[1:])}"
        )
    return (weight.reshape(-1) * losses).sum()


def objective_round(
    objective: Objective,
    sources: dict[str, torch.Tensor],
    p_t: torch.Tensor,
    lam: float | torch.Tensor,
    steps: int,
    lr: float,
    optimizer: str = "adam",
) -> torch.Tensor:
    """One round of `objective` against the frozen opponent p_t, the policy starting at θ_t = log p_t.

    With Adam or SGD the learning rate decays linearly to 0 over the round (the paper's schedule,
    no warm-up): at a constant rate Adam keeps hovering about lr away from the minimum.
    """
    theta = _minimise(
        p_t, lambda theta: objective_loss(theta, objective, sources, p_t, lam), steps, lr, optimizer
    )
    return torch.softmax(theta, dim=-1)


def objective_rounds(
    p0: torch.Tensor,
    p_data: torch.Tensor,
    objective: Objective,
    lam: float | torch.Tensor,
    rounds: int,
    steps: int,
    lr: float,
    optimizer: str = "adam",
) -> list[torch.Tensor]:
    """[p_0, p_1, ..., p_rounds] for `objective` (round t uses objective.at_round(t)); the
    proto-synthetic responses of every round come from p_0."""
    ps = [p0]
    for t in range(rounds):
        sources = sources_for_round(p_data, ps[-1], p0)
        ps.append(objective_round(objective.at_round(t), sources, ps[-1], lam, steps, lr, optimizer))
    return ps


def objective_gradient(
    p: torch.Tensor, objective: Objective, sources: dict[str, torch.Tensor], p_t: torch.Tensor, lam
) -> float:
    """Largest entry of the population loss's gradient at θ = log p: ~0 where a round has converged."""
    theta = torch.log_softmax(_log(p), dim=-1).clone().requires_grad_(True)
    objective_loss(theta, objective, sources, p_t, lam).backward()
    return theta.grad.abs().max().item()


def tspin_closed_form_update(p_t: torch.Tensor, p_data: torch.Tensor, alpha: float) -> torch.Tensor:
    """A T-SPIN round at β = 0 with logistic ℓ, minimised exactly: p_t+1 ∝ (p_data/p_t)^(1/α).

    For the pair (a, b) the weights of "a real, b synthetic" and the reverse are p_data(a)p_t(b)
    and p_data(b)p_t(a); the logistic optimum of α(θ_a − θ_b) is the log of their ratio, which
    θ = (1/α)·log(p_data/p_t) + c meets for every pair at once. No reference: p_t enters only
    as the opponent's samples, so log p_t+1 − log p* = −(1/α)(log p_t − log p*) + c(x) with the
    fixed point p* ∝ p_data^(1/(1+α)), which is p_data for no α > 0.
    """
    return torch.softmax((_log(p_data) - _log(p_t)) / alpha, dim=-1)
