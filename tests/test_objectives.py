"""The objectives (spinlab.objectives) against values computed by hand with math.log/exp."""

import math

import pytest
import torch
from hydra.utils import instantiate

from spinlab import losses
from spinlab.objectives import SFT, SPIN, TSPIN, Objective
from tests.conftest import CONF, compose_cfg


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))


# Two prompts' summed response log-probs.
POLICY = {"real": t(-10.0, -4.0), "synthetic": t(-12.0, -3.0)}
OPPONENT = {"real": t(-11.0, -5.0), "synthetic": t(-11.5, -2.0)}


def test_spin_logistic_loss_by_hand():
    # λ = 0.1: rewards real 0.1·(1, 1), synthetic 0.1·(−0.5, −1); margins 0.15 and 0.2.
    out = SPIN(losses.logistic)(POLICY, OPPONENT, 0.1)
    expected = (softplus(-0.15) + softplus(-0.2)) / 2
    assert out["loss"].item() == pytest.approx(expected, abs=1e-12)
    assert out["margin"].tolist() == pytest.approx([0.15, 0.2], abs=1e-12)
    assert out["reward_synthetic"].tolist() == pytest.approx([-0.05, -0.1], abs=1e-12)
    assert out["accuracy"].tolist() == [1.0, 1.0]


def test_spin_hinge_loss_by_hand():
    out = SPIN(losses.hinge)(POLICY, OPPONENT, 0.1)
    assert out["loss"].item() == pytest.approx((0.85 + 0.8) / 2, abs=1e-12)


def test_sft_loss_by_hand():
    # Summed log-probs −3 and −5 over 4 scored tokens: 8 / 4 nats per token.
    out = SFT()({"real": t(-3.0, -5.0), "tokens": t(4.0)}, None, 0.1)
    assert out["loss"].item() == pytest.approx(2.0, abs=1e-12)


TRIPLETS = {"real": t(-2.0, -7.0), "synthetic": t(-3.0, -4.0), "proto": t(-5.0, -4.0)}


def test_tspin_loss_by_hand():
    # Current advantages log p(y) − log p(y') = 1, −3; historical log p(y') − log p(y0) = 2, 0.
    out = TSPIN(losses.logistic, alpha=1.0, beta=0.1)(TRIPLETS, None, 0.1)
    expected = (softplus(-1) + 0.1 * softplus(-2) + softplus(3) + 0.1 * math.log(2)) / 2
    assert out["loss"].item() == pytest.approx(expected, abs=1e-12)
    assert out["margin"].tolist() == pytest.approx([1.0, -3.0])
    assert out["margin_history"].tolist() == pytest.approx([2.0, 0.0])
    assert out["accuracy"].tolist() == [1.0, 0.0]
    assert set(out) == set(TSPIN.metric_names)
    # α scales every reward: margins 0.5, −1.5 and 1, 0.
    out = TSPIN(losses.logistic, alpha=0.5, beta=0.3)(TRIPLETS, None, 0.1)
    expected = (softplus(-0.5) + 0.3 * softplus(-1) + softplus(1.5) + 0.3 * math.log(2)) / 2
    assert out["loss"].item() == pytest.approx(expected, abs=1e-12)


def test_tspin_beta_schedule_is_zero_in_round_zero_only():
    objective = TSPIN(losses.logistic, alpha=1.0, beta=0.1)
    current_only = (softplus(-1) + softplus(3)) / 2
    assert objective.at_round(0)(TRIPLETS, None, 0.1)["loss"].item() == pytest.approx(current_only, abs=1e-12)
    with_history = (softplus(-1) + 0.1 * softplus(-2) + softplus(3) + 0.1 * math.log(2)) / 2
    for later in (objective.at_round(1), objective.at_round(4), objective.at_round(0).at_round(2)):
        assert later(TRIPLETS, None, 0.1)["loss"].item() == pytest.approx(with_history, abs=1e-12)
    assert objective.beta_now == 0.1  # at_round returns a copy; the configured objective is unchanged


def test_tspin_uses_neither_opponent_nor_lam():
    objective = TSPIN(losses.logistic)
    a = objective(TRIPLETS, None, 0.1)["loss"]
    b = objective(TRIPLETS, {k: v + 3.0 for k, v in TRIPLETS.items()}, 5.0)["loss"]
    assert a.item() == b.item()


@pytest.mark.parametrize("bad", [{"alpha": 0.0}, {"beta": -0.1}, {"beta_first_round": -1.0}])
def test_tspin_rejects_bad_constants(bad):
    with pytest.raises(ValueError, match="T-SPIN"):
        TSPIN(losses.logistic, **bad)


# At a round's first step the policy equals the opponent (θ = θ_t).
@pytest.mark.parametrize(
    ("loss", "at_zero"),
    [
        (losses.logistic, math.log(2)),
        (losses.hinge, 1.0),
        (losses.exponential, 1.0),
        (losses.correlation, 1.0),
    ],
)
def test_spin_first_step_is_loss_at_zero_reward(loss, at_zero):
    # SPIN: both rewards λ·log(pθ/pθt) are 0, so the margin is 0 and the loss is ℓ(0) for every pair.
    logps = {"real": t(-10.0, -4.0, -30.0), "synthetic": t(-12.0, -3.0, -1.0)}
    out = SPIN(loss)(logps, {k: v.clone() for k, v in logps.items()}, 0.1)
    assert out["loss"].item() == pytest.approx(at_zero, abs=1e-12)
    assert out["reward_real"].abs().max().item() == 0.0


def test_tspin_first_step_is_not_a_zero_reward_value():
    # T-SPIN has no reference: its rewards are α·log pθ, not 0 at the first step. Its value there is
    # ℓ of the round-start policy's own margins, whatever the opponent. When y0 is the round-0 synthetic
    # response (y' = y0 in round 0), the historical margin is 0 and that term is β·ℓ(0) = β·log 2.
    same = {"real": t(-2.0, -7.0), "synthetic": t(-3.0, -4.0), "proto": t(-3.0, -4.0)}
    objective = TSPIN(losses.logistic, alpha=1.0, beta=0.1)
    expected = (softplus(-1) + softplus(3)) / 2 + 0.1 * math.log(2)
    assert objective.at_round(1)(same, None, 0.1)["loss"].item() == pytest.approx(expected, abs=1e-12)
    assert objective.at_round(1)(same, same, 0.1)["loss"].item() == pytest.approx(expected, abs=1e-12)


def test_sft_first_step_does_not_depend_on_an_opponent():
    # SFT has no opponent: its first-step value is the round-start policy's NLL per token.
    policy = {"real": t(-3.0, -5.0), "tokens": t(4.0)}
    assert SFT()(policy, None, 0.1)["loss"].item() == SFT()(policy, {"real": t(0.0, 0.0)}, 0.1)["loss"].item()


def options() -> list[str]:
    return sorted(p.stem for p in (CONF / "objective").glob("*.yaml"))


@pytest.mark.parametrize("name", options())
def test_objective_configs_instantiate_and_give_a_finite_loss(name):
    cfg = compose_cfg([f"objective={name}"])
    objective = instantiate(cfg.objective)
    assert isinstance(objective, Objective)
    policy = {kind: t(-2.0, -3.0) for kind in objective.kinds} | {"tokens": t(5.0)}
    opponent = {kind: t(-2.5, -2.0) for kind in objective.kinds} if objective.needs_opponent else None
    out = objective.at_round(1)(policy, opponent, 0.1)
    assert torch.isfinite(out["loss"]) and set(out) == set(objective.metric_names)


def test_tspin_config_holds_the_paper_defaults():
    objective = instantiate(compose_cfg(["objective=tspin"]).objective)
    assert (objective.alpha, objective.beta, objective.beta_first_round) == (1.0, 0.1, 0.0)
    assert objective.loss is losses.logistic or objective.loss.func is losses.logistic
