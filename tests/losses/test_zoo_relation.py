"""Relation-based distillation terms: RKD, PKT, SP, CC, NST.

Each equation is written out again here, independently (loops over samples, channels and
triplets on tiny tensors) or as numbers worked by hand in the comments; the code under test is
never its own reference.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kd.models.features import FeatureInfo, FeatureStage
from kd.losses import Objective
from kd.losses.cc import CC, cc_loss, taylor_rbf_correlation
from kd.losses.nst import NST, nst_loss
from kd.losses.pkt import PKT, pkt_loss
from kd.losses.protocol import BindContext, TermInputs
from kd.losses.rkd import RKD, pairwise_distances, rkd_angle_loss, rkd_distance_loss, rkd_loss
from kd.losses.sp import SP, sp_loss

PAIR = [{"student": "s", "teacher": "t"}]


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _context(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> BindContext:
    return BindContext(num_classes=10, num_samples=100, student_shapes={"s": torch.Size(s_shape)},
                       teacher_shapes={"t": torch.Size(t_shape)})  # fmt: skip


def _inputs(s: torch.Tensor, t: torch.Tensor) -> TermInputs:
    b = s.shape[0]
    return TermInputs(torch.zeros(b, 10), torch.zeros(b, dtype=torch.long), student={"s": s}, teacher={"t": t})


def _bound(term_cls, s_shape, t_shape, **kwargs):
    term = term_cls(pairs=PAIR, **kwargs)
    term.bind(_context(s_shape, t_shape))
    return term


# --- independent references --------------------------------------------------------------------


def _ref_rkd_distance(s: torch.Tensor, t: torch.Tensor) -> float:
    s, t = s.flatten(1).double(), t.flatten(1).double()
    b = s.shape[0]

    def psi(x):
        d = [[math.dist(x[i].tolist(), x[j].tolist()) for j in range(b)] for i in range(b)]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[v / mu for v in row] for row in d]

    ps, pt = psi(s), psi(t)
    return sum(_huber(ps[i][j] - pt[i][j]) for i in range(b) for j in range(b)) / b**2


def _ref_rkd_angle(s: torch.Tensor, t: torch.Tensor) -> float:
    s, t = s.flatten(1).double(), t.flatten(1).double()
    b = s.shape[0]

    def cos_at(x, i, j, k):  # angle at x_i between x_j and x_k; 0 without a direction
        if j == i or k == i:
            return 0.0
        u, v = x[j] - x[i], x[k] - x[i]
        return float(u @ v / (u.norm() * v.norm()))

    total = sum(_huber(cos_at(s, i, j, k) - cos_at(t, i, j, k)) for i, j, k in itertools.product(range(b), repeat=3))
    return total / b**3


def _ref_pkt(s: torch.Tensor, t: torch.Tensor) -> float:
    s, t = s.flatten(1).double(), t.flatten(1).double()
    b = s.shape[0]

    def probs(x):
        k = [[(float(F.cosine_similarity(x[i], x[j], dim=0)) + 1) / 2 for j in range(b)] for i in range(b)]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(s), probs(t)
    return sum(pt[i][j] * math.log(pt[i][j] / ps[i][j]) for i in range(b) for j in range(b)) / b**2


def _ref_sp(s: torch.Tensor, t: torch.Tensor) -> float:
    s, t = s.flatten(1).double(), t.flatten(1).double()
    b = s.shape[0]

    def gram(x):
        g = [[float(x[i] @ x[j]) for j in range(b)] for i in range(b)]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = gram(s), gram(t)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def _ref_cc_paper(s: torch.Tensor, t: torch.Tensor, gamma: float, order: int) -> float:
    b = s.shape[0]

    def psi(x):
        x = [row / row.norm() for row in x.double()]
        return [[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * float(x[i] @ x[j]) ** p
                     for p in range(order + 1)) for j in range(b)] for i in range(b)]  # fmt: skip

    ps, pt = psi(s), psi(t)
    return sum((pt[i][j] - ps[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def _ref_nst(s: torch.Tensor, t: torch.Tensor) -> float:
    """Per sample: mean over channel pairs of (f_i . f_j)^2 for tt and ss, minus twice st; batch mean."""
    total = 0.0
    for n in range(s.shape[0]):
        fs = [c.flatten().double() / c.flatten().double().norm() for c in s[n]]
        ft = [c.flatten().double() / c.flatten().double().norm() for c in t[n]]

        def k_mean(a, b):
            return sum(float(x @ y) ** 2 for x in a for y in b) / (len(a) * len(b))

        total += k_mean(ft, ft) + k_mean(fs, fs) - 2 * k_mean(fs, ft)
    return total / s.shape[0]


# --- RKD ---------------------------------------------------------------------------------------


def test_rkd_distance_hand_computed():
    # student 0, 1, 2: distances 1, 2, 1 (mu = 4/3) -> psi 0.75, 1.5, 0.75
    # teacher 0, 1, 3: distances 1, 3, 2 (mu = 2)   -> psi 0.5, 1.5, 1.0
    # differences 0.25, 0, 0.25, each twice: huber 4 * 0.5 * 0.0625 = 0.125, over 9 entries
    s, t = torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[0.0], [1.0], [3.0]])
    assert rkd_distance_loss(s, t).item() == pytest.approx(0.125 / 9, rel=1e-5)


def test_rkd_angle_hand_computed():
    # student: a right angle at x_0 (cos 0), 45 degrees at x_1 and x_2 (cos 1/sqrt 2);
    # teacher collinear 0, 1, 2 on a line: cos 1 at x_0, -1 at x_1, 1 at x_2.
    # huber(-1) + huber(1/sqrt2 + 1) + huber(1/sqrt2 - 1) = 0.5 + (1/sqrt2 + 0.5) + (0.75 - 1/sqrt2) = 1.75,
    # each for two orderings of (j, k): 3.5 over 27 triplets
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    assert rkd_angle_loss(s, t).item() == pytest.approx(3.5 / 27, rel=1e-5)
    assert rkd_loss(s, t, 0.0, 2.0).item() == pytest.approx(7.0 / 27, rel=1e-5)


def test_rkd_matches_independent_reference_and_weights_combine():
    torch.manual_seed(0)
    s, t = torch.randn(5, 3), torch.randn(5, 7)  # widths differ
    d, a = _ref_rkd_distance(s, t), _ref_rkd_angle(s, t)
    assert rkd_distance_loss(s, t).item() == pytest.approx(d, rel=1e-4)
    assert rkd_angle_loss(s, t).item() == pytest.approx(a, rel=1e-4)
    assert rkd_loss(s, t, 25.0, 50.0).item() == pytest.approx(25 * d + 50 * a, rel=1e-4)


def test_pairwise_distances_precise_far_from_the_origin():
    # small distances between points far from the origin (post-ReLU embeddings share a large mean):
    # ||x||^2 ~ 1e6 in float32 would leave errors ~0.1 in the Gram form without the centring
    a, c = 2.0**-10, 2.0**-9  # exact in float32 next to 1000
    x = torch.tensor([[1000.0, 0.0], [1000.0 + a, 0.0], [1000.0, c]])
    h = math.hypot(a, c)
    expected = torch.tensor([[0.0, a, c], [a, 0.0, h], [c, h, 0.0]])
    assert torch.allclose(pairwise_distances(x), expected, atol=1e-6)


def test_rkd_invariant_to_scale_translation_and_rotation_of_the_embedding():
    torch.manual_seed(1)
    s, t = torch.randn(6, 4), torch.randn(6, 5)
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    moved = (3.7 * s + torch.randn(1, 4)) @ q
    assert rkd_distance_loss(moved, t).item() == pytest.approx(rkd_distance_loss(s, t).item(), rel=1e-4)
    assert rkd_angle_loss(moved, t).item() == pytest.approx(rkd_angle_loss(s, t).item(), rel=1e-4)
    assert rkd_loss(s, 0.01 * t).item() == pytest.approx(rkd_loss(s, t).item(), rel=1e-4)


def test_rkd_zero_when_equal_and_for_too_small_batches():
    x = torch.randn(6, 4)
    assert rkd_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_loss(x, 5.0 * x).item() == pytest.approx(0.0, abs=1e-6)  # the relations are scale-free
    one = torch.randn(1, 4, requires_grad=True)
    assert rkd_loss(one, torch.randn(1, 3)).item() == 0.0
    assert rkd_angle_loss(torch.randn(2, 4), torch.randn(2, 4)).item() == 0.0


def test_rkd_normalize_option_equals_loss_of_unit_embeddings():
    torch.manual_seed(2)
    s, t = torch.randn(5, 3), torch.randn(5, 4)
    expected = rkd_loss(F.normalize(s, dim=1), F.normalize(t, dim=1))
    assert rkd_loss(s, t, normalize=True).item() == pytest.approx(expected.item(), rel=1e-6)


def test_rkd_finite_gradient_when_samples_coincide():
    s = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0], [3.0, 0.0]], requires_grad=True)
    rkd_loss(s, torch.randn(4, 3)).backward()
    assert torch.isfinite(s.grad).all()


# --- PKT ---------------------------------------------------------------------------------------


def test_pkt_hand_computed():
    # student orthogonal: kernel [[1, .5], [.5, 1]] -> rows (2/3, 1/3); teacher identical rows: (1/2, 1/2)
    # each row: 0.5 log(0.5 / (2/3)) + 0.5 log(0.5 / (1/3)) = 0.5 log 1.125; two rows over 4 entries
    s, t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert pkt_loss(s, t).item() == pytest.approx(math.log(1.125) / 4, rel=1e-5)


def test_pkt_matches_independent_reference_on_maps_and_is_scale_free():
    torch.manual_seed(3)
    s, t = torch.randn(4, 2, 3, 3), torch.randn(4, 5)  # a map and a vector of another width
    assert pkt_loss(s, t).item() == pytest.approx(_ref_pkt(s, t), rel=1e-4)
    assert pkt_loss(4.0 * s, 0.5 * t).item() == pytest.approx(pkt_loss(s, t).item(), rel=1e-4)


def test_pkt_zero_when_equal():
    x = torch.randn(6, 5)
    assert pkt_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)


# --- SP ----------------------------------------------------------------------------------------


def test_sp_hand_computed():
    # student orthogonal: G = I; teacher identical rows: G rows (1, 1)/sqrt 2
    # ||G_t - G_s||^2 = 2 (1/sqrt2 - 1)^2 + 2 * 1/2 = 4 - 2 sqrt 2, over B^2 = 4
    s, t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sp_loss(s, t).item() == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-6)


def test_sp_matches_independent_reference_maps_of_different_shapes():
    torch.manual_seed(4)
    s, t = torch.randn(4, 3, 4, 4), torch.randn(4, 6, 2, 2)
    assert sp_loss(s, t).item() == pytest.approx(_ref_sp(s, t), rel=1e-4)


def test_sp_invariant_to_permuting_and_scaling_the_features_and_zero_when_equal():
    torch.manual_seed(5)
    s, t = torch.randn(5, 4, 3, 3), torch.randn(5, 8)
    base = sp_loss(s, t).item()
    assert sp_loss(s[:, torch.randperm(4)], t).item() == pytest.approx(base, rel=1e-5)  # channels
    assert sp_loss(s, t[:, torch.randperm(8)]).item() == pytest.approx(base, rel=1e-5)  # units
    assert sp_loss(7.0 * s, t).item() == pytest.approx(base, rel=1e-5)
    assert sp_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-7)


# --- CC ----------------------------------------------------------------------------------------


def test_cc_paper_hand_computed():
    # normalised student orthogonal: dot = I, off-diagonal psi = exp(-2g) (the p = 0 term);
    # teacher identical rows: dot = 1, psi = exp(-2g) (1 + 2g + 2g^2). Diagonals agree.
    # loss = 2 (exp(-2g) (2g + 2g^2))^2 / 4, g = 0.4: 0.5 exp(-1.6) 1.12^2
    s, t = torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    assert cc_loss(s, t, "paper", 0.4, 2).item() == pytest.approx(0.5 * math.exp(-1.6) * 1.12**2, rel=1e-5)


def test_cc_paper_matches_reference_and_taylor_approximates_the_rbf_kernel():
    torch.manual_seed(6)
    s, t = torch.randn(4, 3), torch.randn(4, 5)  # widths may differ in mode paper
    assert cc_loss(s, t, "paper", 0.7, 3).item() == pytest.approx(_ref_cc_paper(s, t, 0.7, 3), rel=1e-4)
    unit = F.normalize(s, dim=1)
    rbf = torch.exp(-0.4 * torch.cdist(unit, unit).pow(2))
    assert torch.allclose(taylor_rbf_correlation(s, 0.4, 20), rbf, atol=1e-5)


def test_cc_code_hand_computed_and_zero_when_equal():
    # delta = |s - 0|: rows (1, 2), (3, 4), (0, 0): consecutive products 1*3 + 2*4 = 11 and 0, mean 5.5
    s, t = torch.tensor([[1.0, -2.0], [3.0, 4.0], [0.0, 0.0]]), torch.zeros(3, 2)
    assert cc_loss(s, t, "code").item() == pytest.approx(5.5)
    x = torch.randn(4, 3)
    for mode in ("paper", "code"):
        assert cc_loss(x, x.clone(), mode).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="embed"):
        cc_loss(torch.randn(3, 2), torch.randn(3, 4), "code")


def test_cc_term_embeddings_gradients_and_state_dict_round_trip():
    torch.manual_seed(7)
    term = _bound(CC, (2, 3, 3), (5,), embed_dim=4)  # a map and a vector, embedded to 4
    names = {n for n, _ in term.named_parameters()}
    assert names == {"embed_s.0.linear.weight", "embed_s.0.linear.bias", "embed_t.0.linear.weight", "embed_t.0.linear.bias"}
    s, t = torch.randn(4, 2, 3, 3, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    loss = term(_inputs(s, t))
    e_s, e_t = term.embed_s["0"](s), term.embed_t["0"](t)
    assert loss.item() == pytest.approx(cc_loss(e_s, e_t, "code").item(), rel=1e-5)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())
    fresh = _bound(CC, (2, 3, 3), (5,), embed_dim=4)
    fresh.load_state_dict(term.state_dict())
    assert fresh(_inputs(s, t)).item() == pytest.approx(loss.item(), rel=1e-6)


def test_cc_embed_choices():
    assert not list(_bound(CC, (6,), (6,), mode="paper", embed="if_needed").parameters())
    assert len(list(_bound(CC, (6,), (8,), mode="paper", embed="if_needed").parameters())) == 4
    never = _bound(CC, (6,), (8,), mode="paper", embed="never")  # B x B matrices: widths may differ
    s, t = torch.randn(4, 6), torch.randn(4, 8)
    assert never(_inputs(s, t)).item() == pytest.approx(_ref_cc_paper(s, t, 0.4, 2), rel=1e-4)
    with pytest.raises(ValueError, match=r"s \(6,\).*t \(8,\).*embed=if_needed"):
        _bound(CC, (6,), (8,), mode="code", embed="never")
    with pytest.raises(RuntimeError, match="bind"):
        CC(pairs=PAIR)(_inputs(s, s))


# --- NST ---------------------------------------------------------------------------------------


def test_nst_hand_computed():
    # student channels (1, 0), (0, 1); teacher one channel (1, 0):
    # tt = 1, ss = mean of [[1, 0], [0, 1]] = 0.5, st = mean(1, 0) = 0.5 -> 1 + 0.5 - 2 * 0.5 = 0.5
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    t = torch.tensor([[[[3.0, 0.0]]]])  # (1, 1, 1, 2)
    assert nst_loss(s, t).item() == pytest.approx(0.5, rel=1e-6)


def test_nst_matches_independent_reference_and_pools_to_the_smaller_map():
    torch.manual_seed(8)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    pooled = s.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))  # 2x2 blocks averaged by hand
    assert nst_loss(s, t).item() == pytest.approx(_ref_nst(pooled, t), rel=1e-4)
    assert nst_loss(t, s).item() == pytest.approx(_ref_nst(t, pooled), rel=1e-4)
    same = torch.randn(2, 4, 3, 3)
    assert nst_loss(same, torch.randn(2, 6, 3, 3)).item() > 0
    assert nst_loss(same, same.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_nst_invariant_to_a_positive_scale_of_each_channel():
    torch.manual_seed(9)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3)
    scaled = s * (torch.rand(1, 4, 1, 1) + 0.5)
    assert nst_loss(scaled, t).item() == pytest.approx(nst_loss(s, t).item(), rel=1e-5)


def test_nst_on_vectors_compares_fractions_of_active_units_without_gradient():
    # one position per channel: units become signs; rho_s = 3/4, rho_t = 1/4 -> (3/4 - 1/4)^2
    s = torch.tensor([[1.0, -2.0, 0.0, 3.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0, 5.0, 0.0]])
    loss = nst_loss(s, t)
    assert loss.item() == pytest.approx(0.25, rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(s.grad) == 0


# --- all five terms: construction, binding, maps and vectors, gradients -------------------------

TERMS = [RKD, PKT, SP, CC, NST]
CASES = [((3, 4, 4), (5, 2, 2)), ((6,), (9,)), ((3, 4, 4), (7,))]


@pytest.mark.parametrize("term_cls", TERMS)
@pytest.mark.parametrize(("s_shape", "t_shape"), CASES)
def test_terms_run_on_maps_and_vectors_and_grads_reach_the_student_only(term_cls, s_shape, t_shape):
    torch.manual_seed(10)
    term = _bound(term_cls, s_shape, t_shape)
    s = torch.randn(4, *s_shape, requires_grad=True)
    t = torch.randn(4, *t_shape, requires_grad=True)
    loss = term(_inputs(s, t))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert t.grad is None
    vector_nst = term_cls is NST and (len(s_shape) == 1 or len(t_shape) == 1)
    assert s.grad is not None and (vector_nst or s.grad.abs().sum() > 0)


@pytest.mark.parametrize("term_cls", [RKD, PKT, SP, NST])
def test_parameter_free_terms_have_no_parameters_or_state(term_cls):
    term = _bound(term_cls, (3, 4, 4), (5, 4, 4))
    assert not list(term.parameters()) and not term.state_dict()


def test_terms_equal_their_pure_functions_and_sum_weighted_pairs():
    torch.manual_seed(11)
    s, t = torch.randn(5, 3, 4, 4), torch.randn(5, 6, 2, 2)
    pairs = [{"student": "s", "teacher": "t", "weight": 2.0}, {"student": "s", "teacher": "t", "weight": 0.5}]
    ctx = _context((3, 4, 4), (6, 2, 2))
    for term, fn in ((RKD(pairs=pairs), rkd_loss), (PKT(pairs=pairs), pkt_loss), (SP(pairs=pairs), sp_loss),
                     (NST(pairs=pairs), nst_loss)):  # fmt: skip
        term.bind(ctx)
        assert term(_inputs(s, t)).item() == pytest.approx(2.5 * fn(s, t).item(), rel=1e-5)


@pytest.mark.parametrize("term_cls", TERMS)
def test_terms_compute_in_float32_under_autocast(term_cls):
    torch.manual_seed(12)
    term = _bound(term_cls, (3, 4, 4), (5, 4, 4))
    s, t = torch.randn(6, 3, 4, 4).bfloat16(), torch.randn(6, 5, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = term(_inputs(s, t))
    assert low.dtype == torch.float32
    rel = 1e-2 if term_cls is CC else 1e-4  # CC's linear embeddings themselves run in bfloat16
    assert low.item() == pytest.approx(term(_inputs(s.float(), t.float())).item(), rel=rel, abs=1e-7)


def test_default_layers_and_the_objective_logs_each_term():
    assert (RKD.default_layers, PKT.default_layers, CC.default_layers) == ("embedding",) * 3
    assert (SP.default_layers, NST.default_layers) == ("last", "last")
    stages = (FeatureStage("layer1", "layer1", "layer1.pre", 4, 1), FeatureStage("layer2", "layer2", "layer2.pre", 8, 2))
    info = FeatureInfo(stages, "fc:in", 8)
    rkd, sp = RKD(), SP()
    for term in (rkd, sp):
        term.resolve(info, info)
    assert [(p.student, p.teacher) for p in rkd.feature_pairs()] == [("fc:in", "fc:in")]
    assert [(p.student, p.teacher) for p in sp.feature_pairs()] == [("layer2", "layer2")]
    objective = Objective(1.0, {"rkd": RKD(pairs=PAIR), "sp": SP(pairs=PAIR)})
    objective.bind(_context((4,), (6,)))
    s, t = torch.randn(4, 4), torch.randn(4, 6)
    out = objective(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), None, {"s": s}, {"t": t})
    assert out["loss_rkd"].item() == pytest.approx(rkd_loss(s, t).item(), rel=1e-5)
    assert out["loss_sp"].item() == pytest.approx(sp_loss(s, t).item(), rel=1e-5)


# --- bad values --------------------------------------------------------------------------------


@pytest.mark.parametrize("term_cls", TERMS)
def test_negative_weight_refused(term_cls):
    with pytest.raises(ValueError, match=f"{term_cls.name}: weight must be"):
        term_cls(weight=-1.0)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: RKD(distance_weight=-1.0), "rkd.distance_weight"),
        (lambda: RKD(angle_weight=float("nan")), "rkd.angle_weight"),
        (lambda: RKD(distance_weight=0.0, angle_weight=0.0), "both 0"),
        (lambda: RKD(normalize="yes"), "rkd.normalize"),
        (lambda: PKT(eps=0.0), "pkt.eps"),
        (lambda: PKT(eps=-1e-7), "pkt.eps"),
        (lambda: CC(mode="exact"), "cc.mode"),
        (lambda: CC(gamma=0.0), "cc.gamma"),
        (lambda: CC(order=0), "cc.order"),
        (lambda: CC(order=1.5), "cc.order"),
        (lambda: CC(order=True), "cc.order"),
        (lambda: CC(embed="sometimes"), "cc.embed must"),
        (lambda: CC(embed_dim=0), "cc.embed_dim"),
        (lambda: CC(normalize=1), "cc.normalize"),
    ],
)
def test_bad_hyperparameters_refused_with_the_key_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_shapes_refused():
    with pytest.raises(ValueError, match=r"nst: needs .*s gives \(3, 4\)"):
        _bound(NST, (3, 4), (3, 4, 4))
    with pytest.raises(ValueError, match="scalar"):
        _bound(RKD, (), (4,))
    for fn in (rkd_loss, pkt_loss, sp_loss, nst_loss):
        with pytest.raises(ValueError, match="batch"):
            fn(torch.randn(3, 4), torch.randn(4, 4))
