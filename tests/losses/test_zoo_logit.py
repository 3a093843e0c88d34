"""Logit-based zoo terms (DKD, DIST, CTKD, MLKD): the papers' equations written out by hand on
small tensors, the identities they satisfy, gradients, state, schedules and refused values."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd.losses import Objective, TermInputs, soft_target_loss, standardize_logits
from kd.losses.ctkd import CTKD, curriculum_lambda
from kd.losses.dist import DIST, dist_loss
from kd.losses.dkd import DKD, dkd_loss, dkd_parts
from kd.losses.mlkd import MLKD, confidence_fractions, mlkd_loss

# -- hand references: plain Python lists and math, no torch -------------------------------------


def softmax(row: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def pearson(u: list[float], v: list[float]) -> float:
    mu, mv = statistics.fmean(u), statistics.fmean(v)
    cov = sum((a - mu) * (b - mv) for a, b in zip(u, v))
    return cov / math.sqrt(sum((a - mu) ** 2 for a in u) * sum((b - mv) ** 2 for b in v))


ZS = [[1.0, -0.5, 2.0, 0.3], [0.2, 0.1, -1.0, 1.5], [-0.7, 2.2, 0.4, 0.0]]
ZT = [[2.0, 0.5, 1.0, -1.0], [-0.3, 0.8, 0.2, 2.5], [0.1, 3.0, -0.5, 0.6]]
Y = [2, 3, 1]


def tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(ZS, dtype=torch.float64), torch.tensor(ZT, dtype=torch.float64), torch.tensor(Y)


def inputs(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor | None = None) -> TermInputs:
    return TermInputs(zs, torch.zeros(zs.shape[0], dtype=torch.long) if y is None else y, zt)


# -- DKD ------------------------------------------------------------------------------------------


def test_dkd_matches_the_papers_tckd_and_nckd_by_hand():
    T, alpha, beta = 2.0, 0.5, 3.0
    tckd = nckd = 0.0
    for zs, zt, y in zip(ZS, ZT, Y):
        ps, pt = softmax(zs, T), softmax(zt, T)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])  # b = [p_t, p_\t]
        hat_s = [p / (1 - ps[y]) for j, p in enumerate(ps) if j != y]  # p_hat_i = p_i / (1 - p_t)
        hat_t = [p / (1 - pt[y]) for j, p in enumerate(pt) if j != y]
        nckd += kl(hat_t, hat_s)
    tckd, nckd = T**2 * tckd / 3, T**2 * nckd / 3
    got_t, got_n = dkd_parts(*tensors(), T)
    assert got_t.item() == pytest.approx(tckd, rel=1e-10)
    assert got_n.item() == pytest.approx(nckd, rel=1e-10)
    assert dkd_loss(*tensors(), alpha, beta, T).item() == pytest.approx(alpha * tckd + beta * nckd, rel=1e-10)


def test_kd_is_tckd_plus_teacher_non_target_mass_times_nckd():
    # the paper's reformulation: KD = TCKD + (1 - p_t^T) NCKD, per sample
    zs, zt, y = tensors()
    for i in range(3):
        tckd, nckd = dkd_parts(zs[i : i + 1], zt[i : i + 1], y[i : i + 1], 3.0)
        rest = 1 - softmax(ZT[i], 3.0)[Y[i]]
        assert soft_target_loss(zs[i : i + 1], zt[i : i + 1], 3.0).item() == pytest.approx((tckd + rest * nckd).item())


def test_dkd_is_zero_when_student_equals_teacher_and_finite_for_a_hopeless_student():
    z, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    assert dkd_loss(z, z.clone(), y, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    bad = torch.zeros(6, 10).scatter(1, y[:, None], -1e4)  # ~0 probability on the target
    assert torch.isfinite(dkd_loss(bad, z, y, 1.0, 8.0, 4.0))


def test_dkd_gradients_reach_the_student_only_and_parts_are_logged():
    zs, zt = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    term = DKD(alpha=1.0, beta=8.0, temperature=4.0)
    loss = term(inputs(zs, zt, torch.tensor([0, 1, 2, 3])))
    loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0 and zt.grad is None
    extra = term.extra_terms()
    assert set(extra) == {"dkd_tckd", "dkd_nckd"} and not extra["dkd_tckd"].requires_grad
    assert loss.item() == pytest.approx((extra["dkd_tckd"] + 8.0 * extra["dkd_nckd"]).item(), rel=1e-6)


@pytest.mark.parametrize(("epoch", "scale"), [(0, 1 / 20), (9, 0.5), (19, 1.0), (100, 1.0)])
def test_dkd_warmup_counts_epochs_from_one_as_mdistiller(epoch, scale):
    objective = Objective(1.0, {"dkd": DKD(weight=2.0, warmup_epochs=20)})
    objective.start_epoch(epoch, 240)
    assert objective.terms["dkd"].scale() == pytest.approx(scale)
    assert objective._weights[1].item() == pytest.approx(2.0 * scale)
    term = DKD(warmup_epochs=0)
    term.start_epoch(0, 10)
    assert term.scale() == 1.0


def test_dkd_runs_under_logit_standardization():
    torch.manual_seed(0)
    zs, zt, y = 5 * torch.randn(8, 10), 3 * torch.randn(8, 10) + 2, torch.randint(0, 10, (8,))
    objective = Objective(ce_weight=1.0, terms={"dkd": DKD(warmup_epochs=0)}, logit_standardize=True)
    out = objective(zs, y, zt)
    expected = dkd_loss(standardize_logits(zs), standardize_logits(zt), y, 1.0, 8.0, 4.0)
    assert out["loss_dkd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((F.cross_entropy(zs, y) + expected).item(), rel=1e-5)
    assert {"dkd_tckd", "dkd_nckd"} <= set(out)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"), ({"alpha": -0.1}, "alpha"),
     ({"beta": -1.0}, "beta"), ({"warmup_epochs": -1}, "warmup_epochs"), ({"warmup_epochs": 2.5}, "warmup_epochs"),
     ({"beta": float("nan")}, "beta")],
)  # fmt: skip
def test_dkd_refuses_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=rf"distill\.terms\.dkd\.{key}"):
        DKD(**kwargs)


def test_negative_term_weights_are_refused():
    for make in (DKD, DIST, CTKD, MLKD):
        with pytest.raises(ValueError, match="weight must be a number >= 0"):
            make(weight=-1.0)


# -- DIST -----------------------------------------------------------------------------------------


def test_dist_matches_pearson_relations_by_hand():
    T, beta, gamma = 2.0, 1.0, 0.5
    ys, yt = [softmax(r, T) for r in ZS], [softmax(r, T) for r in ZT]
    inter = statistics.fmean(1 - pearson(s, t) for s, t in zip(ys, yt))  # per sample, across classes
    cols = lambda m, j: [row[j] for row in m]  # noqa: E731
    intra = statistics.fmean(1 - pearson(cols(ys, j), cols(yt, j)) for j in range(4))  # per class, across the batch
    zs, zt, _ = tensors()
    expected = T**2 * (beta * inter + gamma * intra)
    assert dist_loss(zs, zt, beta, gamma, T).item() == pytest.approx(expected, rel=1e-6)


def test_dist_reaches_its_minimum_when_student_equals_teacher():
    torch.manual_seed(0)
    z = torch.randn(16, 10)
    at_teacher = dist_loss(z, z.clone(), 1.0, 1.0, 4.0).item()
    assert at_teacher == pytest.approx(0.0, abs=1e-4)
    for _ in range(5):
        other = dist_loss(torch.randn(16, 10), z, 1.0, 1.0, 4.0).item()
        assert at_teacher < other <= 2 * 16 * 2  # each Pearson distance lies in [0, 2]


def test_dist_gradients_reach_the_student_only_and_bad_values_are_refused():
    zs, zt = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    DIST()(inputs(zs, zt)).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0 and zt.grad is None
    for kwargs, key in [({"temperature": 0}, "temperature"), ({"temperature": -2.0}, "temperature"),
                        ({"beta": -1.0}, "beta"), ({"gamma": -0.5}, "gamma")]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"distill\.terms\.dist\.{key}"):
            DIST(**kwargs)


# -- CTKD -----------------------------------------------------------------------------------------


def plain_kd(zs: torch.Tensor, zt: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Hinton's KD at temperature tau, written out: mean_i tau^2 sum_k p_t log(p_t / p_s)."""
    p_t = torch.softmax(zt / tau, dim=1)
    return (tau**2 * (p_t * (torch.log(p_t) - torch.log_softmax(zs / tau, dim=1))).sum(1)).mean()


@pytest.mark.parametrize(("epoch", "lam"), [(9, 1.0), (4, 0.5)])
def test_ctkd_reverses_the_temperature_gradient_only(epoch, lam):
    torch.manual_seed(0)
    zs0, zt = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    term = CTKD(curriculum_epochs=10).double()
    term.start_epoch(epoch, 240)  # Lightning epoch 9 is the authors' 10th: lambda_max; epoch 4: halfway
    zs = zs0.clone().requires_grad_()
    loss = term(inputs(zs, zt))
    loss.backward()
    theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)  # the same starting point, a plain leaf
    zs_ref = zs0.clone().requires_grad_()
    ref = plain_kd(zs_ref, zt, 1.0 + 20.0 * torch.sigmoid(theta))
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    assert theta.grad.abs().item() > 1e-6
    assert term.theta.grad.item() == pytest.approx(-lam * theta.grad.item(), rel=1e-8)
    assert torch.allclose(zs.grad, zs_ref.grad, rtol=1e-8, atol=1e-12)  # the student's gradient is not reversed


def test_ctkd_temperature_is_a_parameter_of_the_term_and_survives_a_state_dict_round_trip():
    term = CTKD()
    assert any(p is term.theta for p in term.parameters())
    assert any(p is term.theta for p in Objective(0.1, {"ctkd": term}).parameters())  # reaches the optimiser
    assert set(term.state_dict()) == {"theta"}  # lambda is refreshed by start_epoch, not saved
    with torch.no_grad():
        term.theta.fill_(-0.7)
    fresh = CTKD()
    fresh.load_state_dict(term.state_dict())
    zs, zt = torch.randn(4, 6), torch.randn(4, 6)
    assert fresh(inputs(zs, zt)).item() == pytest.approx(term(inputs(zs, zt)).item())
    shown = term.extra_terms()["ctkd_temperature"]
    assert not shown.requires_grad and shown.item() == pytest.approx(1 + 20 / (1 + math.exp(0.7)), rel=1e-6)


def test_ctkd_temperature_stays_in_its_range():
    term = CTKD(t_min=2.0, t_span=5.0)
    for value in (-60.0, 0.0, 60.0):
        with torch.no_grad():
            term.theta.fill_(value)
        assert 2.0 <= term.temperature().item() <= 7.0


@pytest.mark.parametrize("epoch", [0, 4, 9, 30])
def test_ctkd_lambda_schedule_is_the_authors_cosine(epoch):
    n, E = epoch + 1, 10  # the authors count epochs from 1
    by_hand = 0.2 + (0.9 - 0.2) * (1 - math.cos(math.pi * min(n, E) / E)) / 2
    assert curriculum_lambda(n, 0.2, 0.9, E) == pytest.approx(by_hand)
    term = CTKD(lambda_min=0.2, lambda_max=0.9, curriculum_epochs=E)
    buffer = term.lambda_
    term.start_epoch(epoch, 240)
    assert term.lambda_ is buffer and term.lambda_.item() == pytest.approx(by_hand, rel=1e-6)  # updated in place
    # the authors' CosineDecay(max_value=0, min_value=-1, num_loops=10), sign folded in
    authors = (math.cos(min(n, E) * math.pi / E) + 1.0) * 0.5 * (0 - (-1)) + (-1)
    assert curriculum_lambda(n, 0.0, 1.0, E) == pytest.approx(-authors)
    assert curriculum_lambda(0, 0.0, 1.0, E) == 0.0 and curriculum_lambda(3, 0.0, 1.0, 0) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"t_min": 0.0}, "t_min"), ({"t_min": -1.0}, "t_min"), ({"t_span": -1.0}, "t_span"),
     ({"lambda_min": -0.1}, "lambda_min"), ({"lambda_max": -1.0}, "lambda_max"),
     ({"curriculum_epochs": -1}, "curriculum_epochs"), ({"theta_init": float("inf")}, "theta_init")],
)  # fmt: skip
def test_ctkd_refuses_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=rf"distill\.terms\.ctkd\.{key}"):
        CTKD(**kwargs)


# -- MLKD -----------------------------------------------------------------------------------------


def mlkd_by_hand(zs: list[list[float]], zt: list[list[float]], temps: list[float]) -> tuple[float, float, float]:
    """Instance (T^2 KL), batch (||G_t - G_s||^2 / B) and class (||M_t - M_s||^2 / K) levels."""
    b, k = len(zs), len(zs[0])
    ins = bat = cls = 0.0
    for t in temps:
        ps, pt = [softmax(r, t) for r in zs], [softmax(r, t) for r in zt]
        ins += t**2 * statistics.fmean(kl(q, p) for p, q in zip(ps, pt))
        gram = lambda p, i, j: sum(p[i][c] * p[j][c] for c in range(k))  # noqa: E731  (P P^T)_ij
        corr = lambda p, i, j: sum(p[n][i] * p[n][j] for n in range(b))  # noqa: E731  (P^T P)_ij
        bat += sum((gram(pt, i, j) - gram(ps, i, j)) ** 2 for i in range(b) for j in range(b)) / b
        cls += sum((corr(pt, i, j) - corr(ps, i, j)) ** 2 for i in range(k) for j in range(k)) / k
    return ins, bat, cls


def test_mlkd_paper_mode_matches_the_three_levels_by_hand():
    ins, bat, cls = mlkd_by_hand(ZS, ZT, [1.0, 2.5])
    zs, zt, _ = tensors()
    assert mlkd_loss(zs, zt, [1.0, 2.5], mode="paper").item() == pytest.approx(ins + bat + cls, rel=1e-10)


def test_mlkd_code_mode_is_the_authors_two_view_loss_on_one_view():
    torch.manual_seed(0)
    zs, zt = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    ins, bat, cls = mlkd_by_hand(zs.tolist(), zt.tolist(), [2.0, 3.0])
    p = [softmax(r) for r in zt.tolist()]
    conf = [max(r) for r in p]
    mass = [sum(r[c] for r in p) for c in range(5)]
    f_s = statistics.fmean(c <= np.percentile(conf, 50) for c in conf)  # the authors' masks, as fractions
    f_c = statistics.fmean(m <= np.percentile(mass, 50) for m in mass)
    got_s, got_c = confidence_fractions(zt)
    assert (got_s.item(), got_c.item()) == pytest.approx((f_s, f_c))
    # weak view: masked kd + bc + cc; strong view (the same images here): unmasked kd
    expected = f_s * ins + ins + f_s * bat + f_c * cls
    assert mlkd_loss(zs, zt, [2.0, 3.0], mode="code").item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_mlkd_is_zero_when_student_equals_teacher_and_trains_the_student_only(mode):
    z = torch.randn(8, 10)
    assert mlkd_loss(z, z.clone(), mode=mode).item() == pytest.approx(0.0, abs=1e-6)
    zs, zt = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    MLKD(mode=mode)(inputs(zs, zt)).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0 and zt.grad is None


@pytest.mark.parametrize("temperatures", [[], [0.0], [2.0, -1.0], "2, 3", [float("nan")], 4.0])
def test_mlkd_refuses_bad_temperature_lists(temperatures):
    with pytest.raises(ValueError, match=r"distill\.terms\.mlkd\.temperatures"):
        MLKD(temperatures=temperatures)
    with pytest.raises(ValueError, match=r"distill\.terms\.mlkd\.mode"):
        MLKD(mode="both")


def test_all_four_terms_combine_in_one_objective():
    terms = {"dkd": DKD(), "dist": DIST(), "ctkd": CTKD(), "mlkd": MLKD()}
    zs, zt, y = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10), torch.randint(0, 10, (8,))
    out = Objective(1.0, terms)(zs, y, zt)
    out["loss"].backward()
    assert {f"loss_{k}" for k in terms} | {"dkd_tckd", "dkd_nckd", "ctkd_temperature"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values()) and terms["ctkd"].theta.grad is not None


def test_mlkd_warmup_scales_the_term_linearly_and_is_off_by_default():
    from kd.losses import MLKD

    off, on = MLKD(), MLKD(warmup_epochs=4)
    scales = []
    for epoch in range(6):
        off.start_epoch(epoch, 6)
        on.start_epoch(epoch, 6)
        scales.append((off.scale(), on.scale()))
    assert scales == [(1.0, 0.25), (1.0, 0.5), (1.0, 0.75), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)]
    with pytest.raises(ValueError, match="distill.terms.mlkd.warmup_epochs must be an integer >= 0"):
        MLKD(warmup_epochs=-1)
