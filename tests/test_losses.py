import math

import pytest
import torch
import torch.nn.functional as F

from spinlab import losses
from spinlab.objectives import SPIN

MARGINS = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])


def test_logistic_by_hand():
    expected = [math.log(1 + math.exp(-m)) for m in MARGINS.tolist()]
    assert losses.logistic(MARGINS).tolist() == pytest.approx(expected, rel=1e-6)
    assert losses.logistic(torch.tensor(0.0)).item() == pytest.approx(math.log(2))


def test_hinge_by_hand():
    assert losses.hinge(MARGINS).tolist() == pytest.approx([3.0, 1.5, 1.0, 0.5, 0.0])


def test_exponential_by_hand():
    assert losses.exponential(MARGINS).tolist() == pytest.approx(
        [math.exp(2), math.exp(0.5), 1.0, math.exp(-0.5), math.exp(-2)], rel=1e-6
    )


def test_correlation_by_hand():
    assert losses.correlation(MARGINS).tolist() == pytest.approx([3.0, 1.5, 1.0, 0.5, -1.0])


def test_smoothed_logistic_by_hand():
    eps = 0.2
    m = 1.3
    expected = (1 - eps) * math.log(1 + math.exp(-m)) + eps * math.log(1 + math.exp(m))
    assert losses.smoothed_logistic(torch.tensor(m), eps).item() == pytest.approx(expected, rel=1e-6)
    assert losses.smoothed_logistic(torch.tensor(m), 0.0).item() == pytest.approx(
        losses.logistic(torch.tensor(m)).item()
    )
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.smoothed_logistic(torch.tensor(m), 0.5)


@pytest.mark.parametrize("name", ["logistic", "hinge", "exponential", "correlation"])
def test_admissible_losses_are_monotone_decreasing_and_convex(name):
    # Assumption 5.1 of the paper.
    t = torch.linspace(-4, 4, 161)
    y = getattr(losses, name)(t)
    assert (y[1:] <= y[:-1] + 1e-7).all()
    second = y[2:] - 2 * y[1:-1] + y[:-2]
    assert (second >= -1e-5).all()


def test_logistic_is_sigmoid_dpo_with_real_as_chosen():
    # DPO (sigmoid) loss: -log σ(β·[(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))]).
    g = torch.Generator().manual_seed(0)
    pol_real, pol_syn, ref_real, ref_syn = (torch.randn(8, generator=g) * 20 for _ in range(4))
    lam = 0.1
    dpo = -F.logsigmoid(lam * ((pol_real - ref_real) - (pol_syn - ref_syn)))
    margin = lam * (pol_real - ref_real) - lam * (pol_syn - ref_syn)
    torch.testing.assert_close(losses.logistic(margin), dpo)
    # By hand: policy log-probs (real -4, synthetic -9), opponent (-6, -6), λ = 0.5: log-ratios +2
    # and -3, rewards 1.0 and -1.5, margin 2.5, loss log(1 + e^-2.5).
    out = SPIN(losses.logistic)(
        {"real": torch.tensor([-4.0]), "synthetic": torch.tensor([-9.0])},
        {"real": torch.tensor([-6.0]), "synthetic": torch.tensor([-6.0])},
        0.5,
    )
    assert (out["reward_real"].item(), out["reward_synthetic"].item()) == pytest.approx((1.0, -1.5))
    assert out["margin"].item() == pytest.approx(2.5)
    assert out["loss"].item() == pytest.approx(math.log1p(math.exp(-2.5)))
