"""SPIN's theory (arXiv 2401.01335, Theorems 5.2 and 5.4) checked exactly on a tabular model."""

import math
from itertools import pairwise

import pytest
import torch

from spinlab import losses
from spinlab import theory as th
from spinlab.objectives import SFT, SPIN, TSPIN

LOSSES = {
    "logistic": losses.logistic,
    "hinge": losses.hinge,
    "exponential": losses.exponential,
    "correlation": losses.correlation,
    "smoothed_logistic": losses.smoothed_logistic,
}
# One round "trained to convergence": Adam, lr decayed linearly from 0.5 to 0 over 400 full-batch steps.
CONVERGED = {"steps": 400, "lr": 0.5}


@pytest.fixture
def dists():
    """p_data (full support) and a nearby p_0: 4 prompts, 5 responses, float64."""
    gen = torch.Generator().manual_seed(0)
    logits, noise = torch.randn(2, 4, 5, dtype=torch.float64, generator=gen)
    p_data = torch.softmax(logits, -1)
    return torch.softmax(p_data.log() + noise, -1), p_data


def _centred(log_p: torch.Tensor) -> torch.Tensor:
    return log_p - log_p.mean(-1, keepdim=True)


def spin_loss(theta, p_t, p_data, lam, loss_fn) -> torch.Tensor:
    """The population SPIN loss L(θ) (theory's docstring): SPIN(ℓ) through theory.objective_loss."""
    return th.objective_loss(theta, SPIN(loss_fn), th.sources_for_round(p_data, p_t, p_t), p_t, lam)


def spin_round(p_t, p_data, lam, loss_fn, **minimise) -> torch.Tensor:
    """One SPIN round against the opponent p_t, the policy starting at log p_t."""
    sources = th.sources_for_round(p_data, p_t, p_t)
    return th.objective_round(SPIN(loss_fn), sources, p_t, lam, **minimise)


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0, 2.0])
def test_theorem_5_4_update_is_the_exact_minimiser_of_the_logistic_loss(dists, lam):
    # The loss is convex in the logits, so a zero gradient at the closed form means global minimum.
    p_t, p_data = dists
    theta = th.closed_form_update(p_t, p_data, lam).log().requires_grad_(True)
    loss = spin_loss(theta, p_t, p_data, lam, losses.logistic)
    loss.backward()
    assert theta.grad.abs().max().item() < 1e-14
    nudge = 1e-3 * torch.randn(theta.shape, dtype=theta.dtype, generator=torch.Generator().manual_seed(1))
    assert spin_loss(theta.detach() + nudge, p_t, p_data, lam, losses.logistic) > loss


def test_logistic_round_trained_to_convergence_matches_theorem_5_4(dists):
    # The four λ train as one table (one λ per prompt): prompts do not interact in L.
    p_t, p_data = dists
    lams = (0.1, 0.5, 1.0, 2.0)
    lam = torch.tensor(lams, dtype=torch.float64).repeat_interleave(len(p_t))[:, None]
    trained = spin_round(p_t.repeat(4, 1), p_data.repeat(4, 1), lam, losses.logistic, **CONVERGED)
    error = (trained - th.closed_form_update(p_t.repeat(4, 1), p_data.repeat(4, 1), lam)).abs()
    # Observed ≤ 2e-9 for every λ; λ = 0.1 is the slowest (logits move by 10·|log(p_data/p_t)|).
    for lam_value, err in zip(lams, error.reshape(4, -1).amax(-1).tolist(), strict=True):
        assert err < 1e-6, f"λ = {lam_value}: max |p_trained − p_closed_form| = {err:.1e}"


def test_exponential_loss_minimiser_is_theorem_5_4_at_twice_lambda(dists):
    # Pairwise optimum of p(a)q(b)e^(−d) + p(b)q(a)e^(d) is d = ½·log-odds: the logistic one halved.
    p_t, p_data = dists
    trained = spin_round(p_t, p_data, 1.0, losses.exponential, **CONVERGED)
    assert (trained - th.closed_form_update(p_t, p_data, 2.0)).abs().max().item() < 1e-9
    assert (trained - th.closed_form_update(p_t, p_data, 1.0)).abs().max().item() > 0.05


@pytest.mark.parametrize("name", LOSSES)
def test_p_data_is_a_fixed_point_for_every_loss(dists, name):
    # Theorem 5.2. At p_t = p_data pairs (y, y') and (y', y) weigh the same: the gradient is 0.
    _, p_data = dists
    p_data = p_data.repeat(2, 1)
    lam = torch.tensor([0.1, 2.0], dtype=torch.float64).repeat_interleave(4)[:, None]
    sgd = spin_round(p_data, p_data, lam, LOSSES[name], steps=200, lr=1.0, optimizer="sgd")
    assert (sgd - p_data).abs().max().item() < 1e-14
    # Adam divides the float64 rounding noise of that zero gradient (~1e-16) by its eps (1e-8),
    # so it drifts a little (observed ≤ 2.4e-6 here) and nothing pulls it back: 1e-5 tolerance.
    adam = spin_round(p_data, p_data, lam, LOSSES[name], steps=200, lr=0.5)
    assert (adam - p_data).abs().max().item() < 1e-5


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0, 2.0])
def test_closed_form_contracts_log_ratio_by_one_minus_one_over_lambda(dists, lam):
    p_t, p_data = dists
    p_next = th.closed_form_update(p_t, p_data, lam)
    expected = (1 - 1 / lam) * _centred(p_t.log() - p_data.log())
    assert torch.allclose(_centred(p_next.log() - p_data.log()), expected, rtol=0, atol=1e-12)


def test_closed_form_rounds_converge_iff_lambda_above_one_half(dists):
    p0, p_data = dists
    tv0 = th.tv_distance(p0, p_data)
    assert tv0 > 0.1
    # λ = 1: one round lands on p_data.
    assert th.tv_distance(th.closed_form_update(p0, p_data, 1.0), p_data) < 1e-12
    # λ = 2: log-ratios halve every round.
    tv = [th.tv_distance(p, p_data) for p in th.closed_form_rounds(p0, p_data, 2.0, 10)]
    assert all(b < a for a, b in pairwise(tv)) and tv[-1] < 1e-3
    # λ = 1/2: factor −1, a 2-cycle that never gets closer.
    p = th.closed_form_rounds(p0, p_data, 0.5, 2)
    assert torch.allclose(p[2], p0, rtol=0, atol=1e-12) and th.tv_distance(p[1], p_data) > 0.1
    # λ = 0.1: factor −9, every round overshoots further, the policy piles onto single responses.
    tv = [th.tv_distance(p, p_data) for p in th.closed_form_rounds(p0, p_data, 0.1, 6)]
    assert min(tv[1:]) > tv0 and max(tv[1:]) > 0.5


@pytest.mark.parametrize(("optimizer", "lr", "shrink"), [("adam", 0.01, 0.4), ("sgd", 1.0, 0.7)])
def test_few_small_steps_per_round_reduce_tv_at_lambda_0_1(dists, optimizer, lr, shrink):
    # The paper's regime: λ = 0.1, each round stopped far from its optimum, which (Theorem 5.4,
    # factor 1 − 1/λ = −9) would overshoot. Observed TV 0.181 → 0.059 (Adam), → 0.115 (SGD).
    p0, p_data = dists
    ps = th.objective_rounds(p0, p_data, SPIN(losses.logistic), 0.1, 8, steps=10, lr=lr, optimizer=optimizer)
    tv = [th.tv_distance(p, p_data) for p in ps]
    assert all(b < a for a, b in pairwise(tv))
    assert tv[-1] < shrink * tv[0]


def test_correlation_loss_is_unbounded_and_piles_mass_on_the_most_underweighted_response(dists):
    # ℓ(t) = 1 − t makes L linear in the logits, slope ∝ p_t − p_data: there is no minimum.
    p_t, p_data = dists
    target = (p_data - p_t).argmax(-1, keepdim=True)
    loss, mass = [], []
    for lr in (1.0, 3.0, 10.0):
        p = spin_round(p_t, p_data, 1.0, losses.correlation, steps=50, lr=lr, optimizer="sgd")
        loss.append(spin_loss(p.log(), p_t, p_data, 1.0, losses.correlation).item())
        mass.append(p.gather(-1, target).min().item())
    # Longer moves only lower the loss further, and SGD moves the logits along p_data − p_t,
    # so its argmax takes the mass (observed, least over prompts: 0.06 → 0.27 → 0.87).
    assert loss[0] > loss[1] + 1 > loss[2] + 2
    assert mass[0] < mass[1] < mass[2] and mass[2] > 0.8


# The self-play family: each objective from spinlab.objectives on the tabular model's exact log-probs.
# Rounds "trained to convergence" here: L-BFGS until the largest gradient entry is ~1e-10.
LBFGS = {"steps": 500, "lr": 1.0, "optimizer": "lbfgs"}


def test_spin_population_loss_by_hand():
    # One prompt, two responses: p_data = (3/4, 1/4), opponent p_t = (1/2, 1/2), policy (4/5, 1/5).
    # log-ratios against p_t: log 1.6 and log 0.4, so at λ = 1 the margin of (real y, synthetic y')
    # is 0 for y = y', log 4 for (0, 1) and −log 4 for (1, 0); the pairs weigh p_data(y)·p_t(y'):
    # 3/8, 3/8, 1/8, 1/8 for (0, 0), (0, 1), (1, 0), (1, 1).
    p_data = torch.tensor([[0.75, 0.25]], dtype=torch.float64)
    p_t = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    theta = torch.tensor([[0.8, 0.2]], dtype=torch.float64).log()
    log4, log2 = math.log(4), math.log(2)
    by_hand = {
        # ℓ(t) = log(1 + e^−t): ℓ(0) = log 2, ℓ(log 4) = log 1.25, ℓ(−log 4) = log 5
        "logistic": 0.5 * log2 + 0.375 * math.log(1.25) + 0.125 * math.log(5),
        # ℓ(t) = max(0, 1 − t): 1, 0, 1 + log 4, 1
        "hinge": 0.5 + 0.125 * (1 + log4),
        # ℓ(t) = e^−t: 1, 1/4, 4, 1
        "exponential": 0.5 + 0.375 / 4 + 0.125 * 4,
        # ℓ(t) = 1 − t: 1, 1 − log 4, 1 + log 4, 1
        "correlation": 1 - 0.25 * log4,
    }
    for name, expected in by_hand.items():
        assert spin_loss(theta, p_t, p_data, 1.0, LOSSES[name]).item() == pytest.approx(
            expected, abs=1e-12
        ), name
    # λ = 2 doubles every margin: the hinge's (0, 1) pair stays at 0, its (1, 0) pair costs 1 + 2·log 4.
    assert spin_loss(theta, p_t, p_data, 2.0, losses.hinge).item() == pytest.approx(
        0.5 + 0.125 * (1 + 2 * log4)
    )


@pytest.mark.parametrize(("lam", "rounds"), [(1.0, 1), (2.0, 10)])
def test_spin_objective_reaches_p_data_where_lambda_allows(dists, lam, rounds):
    # Theorems 5.2 and 5.4 (SPIN is consistent): converged logistic rounds contract log p_t − log p_data
    # by 1 − 1/λ, so λ = 1 lands on p_data in one round and λ = 2 halves the gap every round.
    p0, p_data = dists
    ps = th.objective_rounds(p0, p_data, SPIN(losses.logistic), lam, rounds, **LBFGS)
    assert th.tv_distance(ps[-1], p_data) < 1e-3
    assert th.tv_distance(ps[-1], p_data) < 1e-2 * th.tv_distance(p0, p_data)


def test_sft_objective_reaches_p_data_in_one_round(dists):
    p0, p_data = dists
    ps = th.objective_rounds(p0, p_data, SFT(), 0.1, 1, **LBFGS)
    assert th.tv_distance(ps[-1], p_data) < 1e-6


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_tspin_round_at_beta_zero_matches_its_closed_form(dists, alpha):
    # No reference: the converged round is p_t+1 ∝ (p_data/p_t)^(1/α) (theory.tspin_closed_form_update).
    p_t, p_data = dists
    sources = th.sources_for_round(p_data, p_t, p_t)
    trained = th.objective_round(TSPIN(losses.logistic, alpha=alpha, beta=0.0), sources, p_t, 0.0, **LBFGS)
    assert (trained - th.tspin_closed_form_update(p_t, p_data, alpha)).abs().max().item() < 1e-6


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_p_data_is_not_a_fixed_point_of_tspin(dists, beta):
    # The paper (2601.08198) proves no consistency. With y, y' and y0 all drawn from p_data both of
    # T-SPIN's terms are symmetric in the two responses, so a converged round goes to the uniform policy.
    _, p_data = dists
    sources = th.sources_for_round(p_data, p_data, p_data)
    p1 = th.objective_round(TSPIN(losses.logistic, alpha=1.0, beta=beta), sources, p_data, 0.0, **LBFGS)
    assert (p1 - 1 / p_data.shape[-1]).abs().max().item() < 1e-8
    assert th.tv_distance(p1, p_data) > 0.1


def test_tspin_at_beta_zero_settles_at_p_data_to_the_one_over_one_plus_alpha(dists):
    # log p_t+1 − log p* = −(1/α)(log p_t − log p*) with p* ∝ p_data^(1/(1+α)): α = 2 halves the gap.
    p0, p_data = dists
    ps = th.objective_rounds(p0, p_data, TSPIN(losses.logistic, alpha=2.0, beta=0.0), 0.0, 15, **LBFGS)
    p_star = torch.softmax(p_data.log() / 3, dim=-1)
    assert th.tv_distance(ps[-1], p_star) < 1e-4
    assert th.tv_distance(ps[-1], p_data) > 0.1
