"""Loss unit tests: hand-computed values and the identities the Hinton loss must satisfy."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd.losses import CrossEntropy, SoftTargetKD, soft_target_loss


def test_soft_target_matches_hand_computed_value():
    # one sample, two classes, T = 2
    zs, zt, T = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), 2.0
    q = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]  # softmax(zs / T)
    p = [1 / (1 + math.e), math.e / (1 + math.e)]  # softmax(zt / T)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert soft_target_loss(zs, zt, T).item() == pytest.approx(T**2 * kl, rel=1e-6)


def test_soft_target_matches_the_formula_on_a_batch_at_a_temperature_where_t_squared_is_not_2t():
    # two samples, three classes, T = 3 (at T = 2, T**2 == 2T and one sample hides the class axis)
    zs = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
    zt = [[0.0, 2.0, 1.0], [3.0, -1.0, 0.5]]
    T = 3.0

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    kl = [sum(p * math.log(p / q) for p, q in zip(softmax(t_row), softmax(s_row))) for s_row, t_row in zip(zs, zt)]
    expected = T**2 * sum(kl) / len(kl)  # Hinton et al.: T^2 times the batch mean of KL(p_T || q_T)
    assert soft_target_loss(torch.tensor(zs), torch.tensor(zt), T).item() == pytest.approx(expected, rel=1e-6)


def test_soft_target_is_zero_when_student_equals_teacher():
    z = torch.randn(16, 10)
    assert soft_target_loss(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_target_is_batch_mean_of_per_sample_kl():
    zs, zt = torch.randn(5, 4), torch.randn(5, 4)
    per_sample = [soft_target_loss(zs[i : i + 1], zt[i : i + 1], 3.0) for i in range(5)]
    assert soft_target_loss(zs, zt, 3.0).item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-5)


def test_alpha_zero_is_plain_cross_entropy():
    zs, zt, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    terms = SoftTargetKD(temperature=4.0, alpha=0.0)(zs, y, zt)
    assert terms["loss"].item() == pytest.approx(F.cross_entropy(zs, y).item(), rel=1e-6)


def test_total_is_alpha_weighted_sum_of_logged_terms():
    zs, zt, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    terms = SoftTargetKD(temperature=3.0, alpha=0.7)(zs, y, zt)
    expected = 0.7 * soft_target_loss(zs, zt, 3.0) + 0.3 * F.cross_entropy(zs, y)
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(terms) == {"loss", "loss_kd", "loss_ce"}


def test_gradients_reach_the_student_only():
    zs = torch.randn(4, 3, requires_grad=True)
    zt = torch.randn(4, 3, requires_grad=True)
    SoftTargetKD(4.0, 0.9)(zs, torch.tensor([0, 1, 2, 0]), zt)["loss"].backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None


def test_t_squared_keeps_soft_gradients_comparable_across_temperatures():
    # Hinton §2.1: without T^2 the soft-term gradient shrinks as 1/T^2; with it, it stays O(1).
    torch.manual_seed(0)
    zt = torch.randn(64, 10)
    zs = (zt + 0.5 * torch.randn(64, 10)).requires_grad_()
    norms = {}
    for T in (1.0, 4.0, 20.0):
        zs.grad = None
        soft_target_loss(zs, zt, T).backward()
        norms[T] = zs.grad.norm().item()
    raw_20 = norms[20.0] / 20.0**2  # what the gradient would be without the factor
    assert 0.2 < norms[20.0] / norms[4.0] < 5.0
    assert raw_20 < 0.01 * norms[1.0]


def test_cross_entropy_objective_needs_no_teacher():
    zs, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    terms = CrossEntropy()(zs, y)
    assert not CrossEntropy().needs_teacher
    assert terms["loss"].item() == pytest.approx(F.cross_entropy(zs, y).item())


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_is_refused(alpha):
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        SoftTargetKD(temperature=4.0, alpha=alpha)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf")])
def test_non_positive_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        SoftTargetKD(temperature=temperature, alpha=0.5)


def test_mismatched_class_counts_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        soft_target_loss(torch.randn(2, 10), torch.randn(2, 100), 4.0)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan"), True, "4"])
def test_the_kd_term_refuses_a_temperature_that_is_not_a_finite_positive_number(temperature):
    from kd.losses import SoftTarget

    with pytest.raises(ValueError, match=r"distill\.temperature must be a finite number > 0, got"):
        SoftTarget(temperature=temperature)


@pytest.mark.parametrize("temperature", [0.5, 1, 4.0])
def test_the_kd_term_keeps_any_finite_positive_temperature_as_a_float(temperature):
    from kd.losses import SoftTarget

    term = SoftTarget(temperature=temperature)
    assert term.temperature == float(temperature) and isinstance(term.temperature, float)


def test_the_kd_term_defaults_to_hintons_temperature_and_weight_one():
    from kd.losses import SoftTarget

    term = SoftTarget()
    assert term.temperature == 4.0 and float(term.weight) == 1.0
