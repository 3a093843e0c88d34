"""Feature terms with parameters or stages of their own: VID, FT, AB, FSP, OFD.

Each equation is written out again here (or computed by hand) and compared with kd's pure loss
functions; the terms are checked for their identities, gradients, parameters, state, stages,
maps and vectors, and the values and shapes they refuse.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from kd.losses import BindContext, Objective, TermInputs
from kd.losses.ab import AB, ab_loss
from kd.losses.fsp import FSP, fsp_loss, fsp_matrix
from kd.losses.ft import FT, ft_loss, reconstruction_loss
from kd.losses.ofd import OFD, ofd_loss, ofd_margin
from kd.losses.vid import VID, vid_loss

ONE = [{"student": "s", "teacher": "t"}]
TWO = [{"student": "s1", "teacher": "t1"}, {"student": "s2", "teacher": "t2"}]


def _ctx(student: dict, teacher: dict) -> BindContext:
    return BindContext(num_classes=10, num_samples=100, student_shapes={k: torch.Size(v) for k, v in student.items()},
                       teacher_shapes={k: torch.Size(v) for k, v in teacher.items()})  # fmt: skip


def _bound(term, s_shape=(4, 3, 3), t_shape=(6, 3, 3)):
    term.bind(_ctx({"s": s_shape}, {"t": t_shape}))
    return term


def _inputs(student: dict, teacher: dict) -> TermInputs:
    return TermInputs(torch.zeros(len(next(iter(student.values()))), 10), torch.zeros(2, dtype=torch.long),
                      student=student, teacher=teacher)  # fmt: skip


def _leaves(*shapes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_(True) for s in shapes]


def _round_trip(make, context: BindContext, inputs: TermInputs):
    first = make()
    first.bind(context)
    first(inputs)  # stateful terms (OFD) gather statistics, BN connectors update running stats
    fresh = make()
    fresh.bind(context)
    fresh.load_state_dict(first.state_dict())
    first.eval(), fresh.eval()
    assert torch.allclose(first(inputs), fresh(inputs))


# --- VID ---------------------------------------------------------------------------------------


def test_vid_loss_hand_computed():
    # one sample, 2 channels at 2 positions; sigma^2 = (1, 4)
    mean = torch.tensor([[[[0.0, 1.0]], [[2.0, 2.0]]]])
    target = torch.tensor([[[[1.0, 1.0]], [[0.0, 2.0]]]])
    var = torch.tensor([1.0, 4.0])
    # 0.5 * ((mu - t)^2 / var + log var) per element: 0.5, 0, 0.5 * (1 + log 4), 0.5 * log 4
    expected = (0.5 + 0.0 + 0.5 * (1.0 + math.log(4.0)) + 0.5 * math.log(4.0)) / 4
    assert vid_loss(mean, target, var).item() == pytest.approx(expected, rel=1e-6)


def test_vid_loss_is_the_gaussian_nll_averaged():
    mean, target = torch.randn(3, 5, 2, 2), torch.randn(3, 5, 2, 2)
    var = torch.rand(5) + 0.1
    normal = torch.distributions.Normal(mean, var.sqrt().view(1, -1, 1, 1))
    reference = (-normal.log_prob(target) - 0.5 * math.log(2 * math.pi)).mean()
    assert torch.allclose(vid_loss(mean, target, var), reference, atol=1e-6)
    vectors = torch.randn(4, 5), torch.randn(4, 5)
    ref_v = (-torch.distributions.Normal(vectors[0], var.sqrt()).log_prob(vectors[1]) - 0.5 * math.log(2 * math.pi))
    assert torch.allclose(vid_loss(*vectors, var), ref_v.mean(), atol=1e-6)


def test_vid_term_matches_the_nll_of_its_regressor_and_starts_at_init_variance():
    term = _bound(VID(pairs=ONE, init_variance=5.0, eps=1e-5))
    assert torch.allclose(term.variance(0), torch.full((6,), 5.0), atol=1e-5)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    mu = term.regressors["0"](s)
    reference = (0.5 * ((mu - t) ** 2 / 5.0 + math.log(5.0))).mean()
    assert torch.allclose(term(_inputs({"s": s}, {"t": t})), reference, atol=1e-5)
    # the regressor width defaults to the teacher's channels (RepDistiller VIDLoss(s, t, t))
    assert term.regressors["0"][0].out_channels == 6
    assert _bound(VID(pairs=ONE, mid_channels=3)).regressors["0"][0].out_channels == 3


def test_vid_gradients_reach_student_regressor_and_variances_not_teacher():
    term = _bound(VID(pairs=ONE))
    s, t = _leaves((2, 4, 3, 3), (2, 6, 3, 3))
    term(_inputs({"s": s}, {"t": t})).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert all(p.grad is not None for p in term.parameters())
    assert term.alphas["0"].grad.abs().sum() > 0


def test_vid_variances_are_parameters_and_state_and_round_trip():
    term = _bound(VID(pairs=ONE))
    names = dict(term.named_parameters())
    assert "alphas.0" in names and names["alphas.0"].shape == (6,)
    assert "alphas.0" in term.state_dict()
    ctx = _ctx({"s": (4, 3, 3)}, {"t": (6, 3, 3)})
    _round_trip(lambda: VID(pairs=ONE), ctx, _inputs({"s": torch.randn(2, 4, 3, 3)}, {"t": torch.randn(2, 6, 3, 3)}))


@pytest.mark.parametrize("s_shape,t_shape", [((4, 6, 6), (6, 3, 3)), ((4, 3, 3), (6, 6, 6)), ((5,), (7,)),
                                             ((4, 3, 3), (7,)), ((5,), (6, 3, 3))])  # fmt: skip
def test_vid_runs_on_maps_vectors_and_mixed_pairs(s_shape, t_shape):
    term = _bound(VID(pairs=ONE), s_shape, t_shape)
    s, t = _leaves((2, *s_shape), (2, *t_shape))
    loss = term(_inputs({"s": s}, {"t": t}))
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss) and s.grad is not None


@pytest.mark.parametrize("kwargs,key", [({"weight": -1.0}, "weight"), ({"init_variance": 0.0}, "init_variance"),
                                        ({"eps": 0.0}, "eps"), ({"init_variance": 1e-6, "eps": 1e-5}, "init_variance"),
                                        ({"mid_channels": 0}, "mid_channels")])  # fmt: skip
def test_vid_refuses_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        VID(pairs=ONE, **kwargs)


def test_vid_refuses_features_that_are_neither_maps_nor_vectors():
    with pytest.raises(ValueError, match="vid.*student layer s"):
        _bound(VID(pairs=ONE), (4, 3), (6, 3, 3))


# --- FT ----------------------------------------------------------------------------------------


def test_ft_loss_hand_computed():
    # F_S = (3, 4) -> (0.6, 0.8); F_T = (1, 0) -> (1, 0); |diff| = (0.4, 0.8)
    f_s, f_t = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    assert ft_loss(f_s, f_t, "paper").item() == pytest.approx(1.2, rel=1e-6)
    assert ft_loss(f_s, f_t, "code").item() == pytest.approx(0.6, rel=1e-6)


def test_ft_loss_matches_the_formula_and_ignores_scale():
    f_s, f_t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    a, b = f_s.reshape(3, -1), f_t.reshape(3, -1)
    diff = (a / a.pow(2).sum(1, keepdim=True).sqrt() - b / b.pow(2).sum(1, keepdim=True).sqrt()).abs()
    assert torch.allclose(ft_loss(f_s, f_t, "paper"), diff.sum(1).mean(), atol=1e-6)
    assert torch.allclose(ft_loss(f_s, f_t, "code"), diff.mean(), atol=1e-6)
    assert ft_loss(2.5 * f_t, f_t).item() == pytest.approx(0.0, abs=1e-6)  # equal factors up to scale: 0


def test_reconstruction_loss_hand_computed():
    rec, x = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    assert reconstruction_loss(rec, x, "l2").item() == pytest.approx((1 + 4) / 2)
    assert reconstruction_loss(rec, x, "l1").item() == pytest.approx((1 + 2) / 2)


def test_ft_pretraining_trains_the_paraphraser_only_then_freezes_it():
    term = _bound(FT(pairs=ONE, paraphraser_epochs=2))
    assert term.pretrain_epochs == 2 and term.keep_after_pretrain is True
    s, t = _leaves((2, 4, 3, 3), (2, 6, 3, 3))
    term.start_epoch(0, 5)
    term.pretrain_loss(_inputs({"s": s}, {"t": t})).backward()
    assert all(p.grad is not None for p in term.paraphrasers.parameters())
    assert s.grad is None and t.grad is None
    assert all(p.grad is None for p in term.translators.parameters())

    term.zero_grad(set_to_none=True)
    term.start_epoch(2, 5)
    assert not any(p.requires_grad for p in term.paraphrasers.parameters())
    term(_inputs({"s": s}, {"t": t})).backward()
    assert all(p.grad is None for p in term.paraphrasers.parameters())
    assert all(p.grad is not None for p in term.translators.parameters())
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_ft_forward_is_the_ft_loss_of_encoder_and_translator_factors():
    term = _bound(FT(pairs=ONE, k=0.5), (4, 3, 3), (6, 3, 3))
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    f_t, f_s = term.paraphrasers["0"].encoder(t), term.translators["0"](s)
    assert f_t.shape == f_s.shape == (2, 3, 3, 3)  # round(0.5 * 6) factor channels
    a, b = F.normalize(f_s.flatten(1)), F.normalize(f_t.flatten(1))
    assert torch.allclose(term(_inputs({"s": s}, {"t": t})), (a - b).abs().mean(), atol=1e-6)


def test_ft_stages_in_the_objective_reconstruction_unweighted_by_beta():
    term = FT(weight=500.0, pairs=ONE, paraphraser_epochs=1, reconstruction_weight=1.0)
    objective = Objective(1.0, {"ft": term})
    objective.bind(_ctx({"s": (4, 3, 3)}, {"t": (6, 3, 3)}))
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    logits, y = torch.randn(2, 10), torch.tensor([1, 2])
    objective.start_epoch(0, 3)
    out = objective(logits, y, None, {"s": s}, {"t": t})
    assert set(out) == {"loss", "loss_ft", "stage"} and out["stage"].item() == 1.0
    assert torch.allclose(out["loss"], out["loss_ft"])  # weight * scale = reconstruction_weight = 1
    objective.start_epoch(1, 3)
    out = objective(logits, y, None, {"s": s}, {"t": t})
    assert out["stage"].item() == 2.0
    assert torch.allclose(out["loss"], out["loss_ce"] + 500.0 * out["loss_ft"])


@pytest.mark.parametrize("s_shape,t_shape", [((4, 3, 3), (6, 3, 3)), ((4, 6, 6), (6, 3, 3)), ((5,), (8,)),
                                             ((4, 3, 3), (8,)), ((5,), (6, 3, 3))])  # fmt: skip
def test_ft_runs_on_maps_vectors_and_mixed_pairs(s_shape, t_shape):
    term = _bound(FT(pairs=ONE, paraphraser_epochs=1), s_shape, t_shape)
    if len(t_shape) == 1:
        assert isinstance(term.paraphrasers["0"].encoder[0], nn.Linear)
    s, t = _leaves((2, *s_shape), (2, *t_shape))
    term.start_epoch(1, 2)
    loss = term(_inputs({"s": s}, {"t": t}))
    loss.backward()
    assert torch.isfinite(loss) and s.grad is not None
    rec = term.pretrain_loss(_inputs({"s": s}, {"t": t}))
    assert torch.isfinite(rec) and rec.dim() == 0


def test_ft_state_round_trip():
    ctx = _ctx({"s": (4, 3, 3)}, {"t": (6, 3, 3)})
    inputs = _inputs({"s": torch.randn(2, 4, 3, 3)}, {"t": torch.randn(2, 6, 3, 3)})
    _round_trip(lambda: FT(pairs=ONE), ctx, inputs)
    assert not any(k.startswith("paraphrasers.") for k in FT(pairs=ONE).state_dict())  # built in bind
    assert any(k.startswith("paraphrasers.0.") for k in _bound(FT(pairs=ONE)).state_dict())


@pytest.mark.parametrize("kwargs,key", [({"weight": -1.0}, "weight"), ({"k": 0.0}, "k"), ({"k": -0.5}, "k"),
                                        ({"paraphraser_epochs": 0}, "paraphraser_epochs"), ({"mode": "l2"}, "mode"),
                                        ({"reconstruction": "huber"}, "reconstruction"),
                                        ({"reconstruction_weight": 0.0}, "reconstruction_weight")])  # fmt: skip
def test_ft_refuses_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        FT(pairs=ONE, **kwargs)


def test_ft_refuses_no_factor_channels_and_bad_shapes_in_bind():
    with pytest.raises(ValueError, match="factor channels"):
        _bound(FT(pairs=ONE, k=0.1), (4, 3, 3), (4, 3, 3))
    with pytest.raises(ValueError, match="teacher layer t"):
        _bound(FT(pairs=ONE), (4, 3, 3), (6, 3))


# --- AB ----------------------------------------------------------------------------------------


def test_ab_loss_hand_computed():
    source = torch.tensor([[-0.5, 2.0, 0.5, -2.0]])
    target = torch.tensor([[-1.0, 1.0, 1.0, -1.0]])
    # off: (s + 1)^2 where s > -1 -> 0.25; on, s = 2 >= 1 -> 0; on: (s - 1)^2 -> 0.25; off, s = -2 -> 0
    assert ab_loss(source, target, 1.0).item() == pytest.approx(0.5)


def test_ab_loss_matches_the_authors_indicator_form():
    s, t, m = torch.randn(3, 4, 2, 2) * 2, torch.randn(3, 4, 2, 2), 0.7
    authors = ((s + m) ** 2 * ((s > -m) & (t <= 0)).float() + (s - m) ** 2 * ((s <= m) & (t > 0)).float()).sum() / 3
    assert torch.allclose(ab_loss(s, t, m), authors, atol=1e-5)


def test_ab_minimum_zero_beyond_the_margin():
    t = torch.tensor([[1.5, -2.0, 3.0, -1.0]])
    assert ab_loss(t, t, 1.0).item() == 0.0  # every |t| >= margin: student = teacher is a minimum
    assert ab_loss(torch.tensor([[0.5]]), torch.tensor([[0.5]]), 1.0).item() == pytest.approx(0.25)


def test_ab_term_stages_and_depth_weights():
    term = AB(pairs=TWO, init_epochs=7, margin=1.0, depth_decay=0.5)
    assert term.pretrain_epochs == 7 and term.keep_after_pretrain is False
    assert term.pre_activation is True and term.default_layers == "stages"
    term.bind(_ctx({"s1": (3, 4, 4), "s2": (5, 2, 2)}, {"t1": (3, 4, 4), "t2": (5, 2, 2)}))
    assert all(isinstance(c, nn.Identity) for c in term.connectors.values())  # equal channels: identity
    s1, s2, t1, t2 = _leaves((2, 3, 4, 4), (2, 5, 2, 2), (2, 3, 4, 4), (2, 5, 2, 2))
    loss = term(_inputs({"s1": s1, "s2": s2}, {"t1": t1, "t2": t2}))
    assert torch.allclose(loss, 0.5 * ab_loss(s1, t1, 1.0) + ab_loss(s2, t2, 1.0))


def test_ab_in_the_objective_alone_during_init_then_dropped():
    objective = Objective(1.0, {"ab": AB(weight=0.003, pairs=ONE, init_epochs=1)})
    objective.bind(_ctx({"s": (4, 3, 3)}, {"t": (6, 3, 3)}))
    feats = ({"s": torch.randn(2, 4, 3, 3)}, {"t": torch.randn(2, 6, 3, 3)})
    objective.start_epoch(0, 3)
    out = objective(torch.randn(2, 10), torch.tensor([0, 1]), None, *feats)
    assert "loss_ce" not in out and torch.allclose(out["loss"], 0.003 * out["loss_ab"])
    objective.start_epoch(1, 3)
    out = objective(torch.randn(2, 10), torch.tensor([0, 1]), None, *feats)
    assert "loss_ab" not in out and torch.allclose(out["loss"], out["loss_ce"])


def test_ab_gradients_reach_student_and_connector_not_teacher():
    term = _bound(AB(pairs=ONE))
    assert isinstance(term.connectors["0"][0], nn.Conv2d) and isinstance(term.connectors["0"][1], nn.BatchNorm2d)
    s, t = _leaves((2, 4, 3, 3), (2, 6, 3, 3))
    term(_inputs({"s": s}, {"t": t})).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    assert all(p.grad is not None for p in term.connectors.parameters())


@pytest.mark.parametrize("s_shape,t_shape", [((4, 6, 6), (6, 3, 3)), ((5,), (7,)), ((4, 3, 3), (7,))])
def test_ab_runs_on_maps_vectors_and_mixed_pairs(s_shape, t_shape):
    term = _bound(AB(pairs=ONE), s_shape, t_shape)
    s, t = _leaves((3, *s_shape), (3, *t_shape))
    loss = term(_inputs({"s": s}, {"t": t}))
    loss.backward()
    assert torch.isfinite(loss) and s.grad is not None


def test_ab_state_round_trip():
    ctx = _ctx({"s": (4, 3, 3)}, {"t": (6, 3, 3)})
    _round_trip(lambda: AB(pairs=ONE), ctx, _inputs({"s": torch.randn(2, 4, 3, 3)}, {"t": torch.randn(2, 6, 3, 3)}))


@pytest.mark.parametrize("kwargs,key", [({"weight": -0.1}, "weight"), ({"margin": -1.0}, "margin"),
                                        ({"init_epochs": -1}, "init_epochs"), ({"depth_decay": 0.0}, "depth_decay")])
def test_ab_refuses_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        AB(pairs=ONE, **kwargs)


def test_ab_refuses_bad_shapes_in_bind():
    with pytest.raises(ValueError, match="ab.*teacher layer t"):
        _bound(AB(pairs=ONE), (4, 3, 3), (6, 3, 3, 1))


# --- FSP ---------------------------------------------------------------------------------------


def test_fsp_matrix_hand_computed():
    f1 = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    f2 = torch.tensor([[[[3.0, 4.0]]]])  # (1, 1, 1, 2)
    # G_i0 = sum_positions f1_i * f2_0 / 2: (3 + 8) / 2, (0 + 4) / 2
    assert torch.allclose(fsp_matrix(f1, f2), torch.tensor([[[5.5], [2.0]]]))


def test_fsp_matrix_matches_einsum_pools_the_larger_and_takes_vectors():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    pooled = F.avg_pool2d(a, 2)
    assert torch.allclose(fsp_matrix(a, b), torch.einsum("bihw,bjhw->bij", pooled, b) / 4, atol=1e-6)
    u, v = torch.randn(2, 3), torch.randn(2, 4)
    assert torch.allclose(fsp_matrix(u, v), u[:, :, None] * v[:, None, :], atol=1e-6)  # h*w = 1


def test_fsp_loss_modes():
    g_s, g_t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    sq = (g_s - g_t) ** 2
    assert torch.allclose(fsp_loss(g_s, g_t, "code"), sq.mean())
    assert torch.allclose(fsp_loss(g_s, g_t, "paper"), sq.sum((1, 2)).mean())


def _fsp_shapes():
    return {"s1": (3, 4, 4), "s2": (5, 2, 2), "s3": (2, 2, 2)}, {"t1": (3, 4, 4), "t2": (5, 2, 2), "t3": (2, 2, 2)}


THREE = [{"student": f"s{i}", "teacher": f"t{i}"} for i in (1, 2, 3)]


def test_fsp_term_consecutive_matrices_zero_for_equal_features_and_gradients():
    s_shapes, t_shapes = _fsp_shapes()
    pairs = [dict(p, weight=w) for p, w in zip(THREE, (1.0, 2.0, 3.0))]
    term = FSP(pairs=pairs, init_epochs=0)
    term.bind(_ctx(s_shapes, t_shapes))
    s = dict(zip(s_shapes, _leaves(*[(2, *v) for v in s_shapes.values()], seed=1)))
    t = dict(zip(t_shapes, _leaves(*[(2, *v) for v in t_shapes.values()], seed=2)))
    loss = term(_inputs(s, t))

    def g(f1, f2):  # independent: pool f1 to f2's size, average the channel products over positions
        f1 = F.adaptive_avg_pool2d(f1, f2.shape[-2:])
        return torch.einsum("bihw,bjhw->bij", f1, f2) / (f2.shape[-1] * f2.shape[-2])

    # matrix (layer 1, layer 2) weighted by pair 2's weight, (2, 3) by pair 3's
    matrices = ((("s1", "s2", "t1", "t2"), 2.0), (("s2", "s3", "t2", "t3"), 3.0))
    expected = sum(w * ((g(s[a], s[b]) - g(t[c], t[d])) ** 2).mean() for (a, b, c, d), w in matrices)
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert all(v.grad is not None for v in s.values()) and all(v.grad is None for v in t.values())
    same = {k.replace("s", "t"): v.detach() for k, v in s.items()}
    assert term(_inputs(s, same)).item() == pytest.approx(0.0, abs=1e-7)


def test_fsp_stages_and_vectors():
    term = FSP(pairs=TWO, init_epochs=30)
    assert term.pretrain_epochs == 30 and term.keep_after_pretrain is False
    one_stage = FSP(pairs=TWO, init_epochs=0)
    assert one_stage.pretrain_epochs == 0 and one_stage.keep_after_pretrain is True
    one_stage.bind(_ctx({"s1": (3,), "s2": (4,)}, {"t1": (3,), "t2": (4,)}))
    s1, s2 = _leaves((2, 3), (2, 4))
    loss = one_stage(_inputs({"s1": s1, "s2": s2}, {"t1": torch.randn(2, 3), "t2": torch.randn(2, 4)}))
    loss.backward()
    assert torch.isfinite(loss) and s1.grad is not None and s2.grad is not None
    assert list(FSP(pairs=TWO).state_dict()) == []  # no parameters of its own


def test_fsp_refuses_channel_mismatch_and_single_pair_in_bind():
    with pytest.raises(ValueError, match=r"fsp: the FSP matrices differ in shape.*s1, s2.*t1, t2"):
        FSP(pairs=TWO).bind(_ctx({"s1": (3, 4, 4), "s2": (5, 2, 2)},
                                 {"t1": (6, 4, 4), "t2": (5, 2, 2)}))
    with pytest.raises(ValueError, match="at least two layer pairs"):
        FSP(pairs=ONE).bind(_ctx({"s": (3, 4, 4)}, {"t": (3, 4, 4)}))
    with pytest.raises(ValueError, match="student layer s1"):
        FSP(pairs=TWO).bind(_ctx({"s1": (3, 4), "s2": (5, 2, 2)}, {"t1": (3, 4, 4), "t2": (5, 2, 2)}))


@pytest.mark.parametrize("kwargs,key", [({"weight": -1.0}, "weight"), ({"init_epochs": -1}, "init_epochs"),
                                        ({"mode": "mean"}, "mode")])  # fmt: skip
def test_fsp_refuses_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        FSP(pairs=TWO, **kwargs)


# --- OFD ---------------------------------------------------------------------------------------


def _negative_mean(mean: float, std: float) -> float:
    """E[x | x < 0] of N(mean, std^2) by numerical integration (trapezoid on a fine grid)."""
    x = torch.linspace(mean - 12 * std, 0.0, 200_001, dtype=torch.float64)
    p = torch.exp(-0.5 * ((x - mean) / std) ** 2)
    return (torch.trapezoid(x * p, x) / torch.trapezoid(p, x)).item()


def test_ofd_margin_is_the_expected_negative_response():
    # N(0, 1): -phi(0) / Phi(0) = -sqrt(2 / pi)
    standard = ofd_margin(torch.tensor([0.0]), torch.tensor([1.0])).item()
    assert standard == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-5)
    for mean, std in ((0.5, 2.0), (-1.0, 0.5), (1.5, 1.0)):
        got = ofd_margin(torch.tensor([mean]), torch.tensor([std])).item()
        assert got == pytest.approx(_negative_mean(mean, std), rel=1e-4)
    # Phi(-10 / 2) < 0.001: the authors' -3 std
    assert ofd_margin(torch.tensor([10.0]), torch.tensor([2.0])).item() == pytest.approx(-6.0)


def test_ofd_loss_hand_computed():
    target = torch.tensor([[[2.0, -1.0, -3.0, -0.2]]])  # (1, 1, 4): one channel, margin -0.5
    source = torch.tensor([[[1.0, -2.0, 0.0, -1.0]]])
    # goal = max(t, -0.5) = (2, -0.5, -0.5, -0.2): (1-2)^2 (goal > 0); skipped (s <= goal <= 0);
    # (0 + 0.5)^2 (s > goal); skipped
    assert ofd_loss(source, target, torch.tensor([-0.5])).item() == pytest.approx(1.25)


def test_ofd_loss_matches_the_partial_l2_formula():
    s, t, m = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), -torch.rand(4)
    goal = torch.maximum(t, m.view(1, -1, 1, 1))
    skip = (s <= goal) & (goal <= 0)
    reference = torch.where(skip, torch.zeros_like(s), (goal - s) ** 2).sum() / 3
    assert torch.allclose(ofd_loss(s, t, m), reference, atol=1e-6)


def test_ofd_zero_for_equal_features_with_identity_connector():
    term = _bound(OFD(pairs=ONE), (6, 3, 3), (6, 3, 3))
    term.connectors["0"] = nn.Identity()
    t = torch.randn(2, 6, 3, 3)
    assert term(_inputs({"s": t.clone()}, {"t": t})).item() == 0.0


def test_ofd_margins_from_the_first_batches_then_fixed_and_in_state():
    term = _bound(OFD(pairs=ONE, margin_batches=2), (4, 3, 3), (6, 3, 3))
    batches = [torch.randn(2, 6, 3, 3) + i for i in range(3)]
    for t in batches:
        term(_inputs({"s": torch.randn(2, 4, 3, 3)}, {"t": t}))
    flat = [b.transpose(0, 1).reshape(6, -1) for b in batches[:2]]  # the third batch is not counted
    mean = (flat[0].mean(1) + flat[1].mean(1)) / 2
    sq = (flat[0].pow(2).mean(1) + flat[1].pow(2).mean(1)) / 2
    assert torch.allclose(term.teacher_mean0, mean, atol=1e-5) and torch.allclose(term.teacher_sq0, sq, atol=1e-5)
    assert torch.allclose(term.margin(0), ofd_margin(mean, (sq - mean**2).sqrt()), atol=1e-5)
    assert term.batches_seen.item() == 3
    state = term.state_dict()
    assert {"teacher_mean0", "teacher_sq0", "batches_seen"} <= set(state)
    ctx = _ctx({"s": (4, 3, 3)}, {"t": (6, 3, 3)})
    _round_trip(lambda: OFD(pairs=ONE), ctx, _inputs({"s": torch.randn(2, 4, 3, 3)}, {"t": torch.randn(2, 6, 3, 3)}))


def test_ofd_gradients_depth_weights_and_flags():
    assert OFD.pre_activation is True and OFD.default_layers == "stages"
    term = OFD(pairs=TWO, depth_decay=0.5)
    term.bind(_ctx({"s1": (3, 4, 4), "s2": (5, 2, 2)}, {"t1": (4, 4, 4), "t2": (6, 2, 2)}))
    s1, s2, t1, t2 = _leaves((2, 3, 4, 4), (2, 5, 2, 2), (2, 4, 4, 4), (2, 6, 2, 2))
    loss = term(_inputs({"s1": s1, "s2": s2}, {"t1": t1, "t2": t2}))
    c1, c2 = term.connectors["0"](s1), term.connectors["1"](s2)
    expected = 0.5 * ofd_loss(c1, t1, term.margin(0)) + ofd_loss(c2, t2, term.margin(1))
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert s1.grad is not None and s2.grad is not None and t1.grad is None and t2.grad is None
    assert all(p.grad is not None for p in term.connectors.parameters())


@pytest.mark.parametrize("s_shape,t_shape", [((4, 6, 6), (6, 3, 3)), ((5,), (7,)), ((4, 3, 3), (7,))])
def test_ofd_runs_on_maps_vectors_and_mixed_pairs(s_shape, t_shape):
    term = _bound(OFD(pairs=ONE), s_shape, t_shape)
    s, t = _leaves((3, *s_shape), (3, *t_shape))
    loss = term(_inputs({"s": s}, {"t": t}))
    loss.backward()
    assert torch.isfinite(loss) and s.grad is not None
    assert torch.all(term.margin(0) <= 0)


@pytest.mark.parametrize("kwargs,key", [({"weight": -1.0}, "weight"), ({"depth_decay": -0.5}, "depth_decay"),
                                        ({"margin_batches": 0}, "margin_batches")])  # fmt: skip
def test_ofd_refuses_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        OFD(pairs=ONE, **kwargs)


def test_ofd_refuses_bad_shapes_in_bind():
    with pytest.raises(ValueError, match="ofd.*student layer s"):
        _bound(OFD(pairs=ONE), (4, 3), (6, 3, 3))


# --- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cls,stage", [("vid", VID, 0), ("ft", FT, 30), ("ab", AB, 30), ("fsp", FSP, 30),
                                            ("ofd", OFD, 0)])  # fmt: skip
def test_configs_build_the_term_with_the_documented_stages(name, cls, stage):
    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "distill" / f"{name}.yaml")
    objective = instantiate(cfg)
    assert isinstance(objective.terms[name], cls) and objective.pretrain_epochs() == stage
    assert objective.ce_weight == 1.0 and objective.logit_standardize is False
