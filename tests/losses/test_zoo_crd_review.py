"""CRD (contrastive representation distillation) and ReviewKD (knowledge review): hand-written
references of the NCE loss, the memory banks and Z, the hierarchical context loss, the ABF shapes,
the warm-up, resume, gradients and refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import kd.losses.crd as crd_module
from kd.models.features import FeatureHooks, FeatureInfo, FeatureStage, LayerPair
from kd.losses import Objective
from kd.losses.crd import CRD, EPS, contrast_scores, draw_contrast_indices, nce_loss
from kd.losses.protocol import BindContext, TermInputs
from kd.losses.review import ABF, ReviewKD, hcl_loss, resize, review_fuse
from kd.models import MLP, CIFARResNet, LeNet5

PAIR = [{"student": "s", "teacher": "t"}]


def _context(student: dict, teacher: dict, num_samples: int = 100) -> BindContext:
    return BindContext(num_classes=10, num_samples=num_samples,
                       student_shapes={k: torch.Size(v) for k, v in student.items()},
                       teacher_shapes={k: torch.Size(v) for k, v in teacher.items()})  # fmt: skip


def _inputs(fs: torch.Tensor, ft: torch.Tensor, index: torch.Tensor | None = None) -> TermInputs:
    b = fs.shape[0]
    return TermInputs(torch.zeros(b, 10), torch.zeros(b, dtype=torch.long), None, index, {"s": fs}, {"t": ft})


# ============================== CRD ===========================================================

N, K, D, T, M = 6, 3, 3, 0.07, 0.5
ROWS = torch.tensor([[1, 0, 3, 5], [4, 2, 2, 0]])  # (B, 1 + K): column 0 the positive (the index)
INDEX = torch.tensor([1, 4])


def _crd(monkeypatch: pytest.MonkeyPatch | None = None, rows: torch.Tensor = ROWS, **kwargs) -> CRD:
    term = CRD(pairs=PAIR, feat_dim=D, nce_k=K, nce_t=T, nce_momentum=M, **kwargs)
    term.bind(_context({"s": (4,)}, {"t": (5,)}, num_samples=N))
    if monkeypatch is not None:  # fixed negatives instead of the sampler's draw
        monkeypatch.setattr(crd_module, "draw_contrast_indices", lambda index, n, k, sampling, generator=None: rows.clone())
    return term


def _embed(x: torch.Tensor, head) -> list[list[float]]:
    w, b = head.linear.weight.detach().double(), head.linear.bias.detach().double()
    v = x.detach().double() @ w.t() + b
    return (v / v.norm(dim=1, keepdim=True)).tolist()


def _reference_direction(anchors: list[list[float]], bank: list[list[float]], rows: list[list[int]],
                         z: float | None) -> tuple[float, float]:  # fmt: skip
    """-(1/B) sum_b [log h(pos) + sum_k log(1 - h(neg_k))], h = P / (P + K/N + eps), P = e^{s/T} / Z."""
    e = [[math.exp(sum(m * a for m, a in zip(bank[j], anchor)) / T) for j in r] for anchor, r in zip(anchors, rows)]
    if z is None:  # the first batch's estimate: N times the mean over every score of the batch
        z = N * sum(sum(row) for row in e) / sum(len(row) for row in e)
    c = K / N
    total = 0.0
    for row in e:
        p = [x / z for x in row]
        total += math.log(p[0] / (p[0] + c + EPS)) + sum(math.log(c / (q + c + EPS)) for q in p[1:])
    return -total / len(e), z


def _reference_crd(term: CRD, fs, ft, z: tuple[float, float] | None = None) -> tuple[float, tuple[float, float]]:
    v_s, v_t = _embed(fs, term.embed_s), _embed(ft, term.embed_t)
    rows = ROWS.tolist()
    loss_s, z_s = _reference_direction(v_s, term.memory_teacher.double().tolist(), rows, None if z is None else z[0])
    loss_t, z_t = _reference_direction(v_t, term.memory_student.double().tolist(), rows, None if z is None else z[1])
    return loss_s + loss_t, (z_s, z_t)


def test_nce_loss_hand_computed():
    # P = [[0.5, 0.1, 0.2]], N = 4: K/N = 0.5; -(log(.5/1) + log(.5/.6) + log(.5/.7))
    probs = torch.tensor([[0.5, 0.1, 0.2]], dtype=torch.float64)
    expected = -(math.log(0.5 / (1.0 + EPS)) + math.log(0.5 / (0.6 + EPS)) + math.log(0.5 / (0.7 + EPS)))
    assert nce_loss(probs, 4).item() == pytest.approx(expected, rel=1e-12)


def test_crd_loss_matches_hand_written_reference_and_sets_z(monkeypatch):
    torch.manual_seed(0)
    term = _crd(monkeypatch)
    fs, ft = torch.randn(2, 4), torch.randn(2, 5)
    expected, z = _reference_crd(term, fs, ft)  # banks as they are before the step
    loss = term(_inputs(fs, ft, INDEX))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert term.z.tolist() == pytest.approx(list(z), rel=1e-5)


def test_z_stays_fixed_after_the_first_batch(monkeypatch):
    torch.manual_seed(1)
    term = _crd(monkeypatch)
    term(_inputs(torch.randn(2, 4), torch.randn(2, 5), INDEX))
    z_first = term.z.clone()
    fs, ft = torch.randn(2, 4) * 3, torch.randn(2, 5) * 3
    expected, _ = _reference_crd(term, fs, ft, z=tuple(z_first.tolist()))  # divided by the first Z
    loss = term(_inputs(fs, ft, INDEX))
    assert torch.equal(term.z, z_first)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    _, z_new = _reference_crd(term, fs, ft)  # this batch's own estimate differs: it is not used
    assert z_new[0] != pytest.approx(z_first[0].item(), rel=1e-3)


def test_memory_banks_update_at_the_batch_indices_only(monkeypatch):
    torch.manual_seed(2)
    term = _crd(monkeypatch)
    fs, ft = torch.randn(2, 4), torch.randn(2, 5)
    old_s, old_t = term.memory_student.clone(), term.memory_teacher.clone()
    v_s, v_t = torch.tensor(_embed(fs, term.embed_s)).float(), torch.tensor(_embed(ft, term.embed_t)).float()
    term(_inputs(fs, ft, INDEX))
    others = [i for i in range(N) if i not in INDEX.tolist()]
    for bank, old, v in ((term.memory_student, old_s, v_s), (term.memory_teacher, old_t, v_t)):
        mixed = M * old[INDEX] + (1 - M) * v
        assert torch.allclose(bank[INDEX], mixed / mixed.norm(dim=1, keepdim=True), atol=1e-6)
        assert torch.allclose(bank[INDEX].norm(dim=1), torch.ones(2), atol=1e-6)
        assert torch.equal(bank[others], old[others])


def test_state_dict_round_trip_keeps_banks_and_z(monkeypatch):
    torch.manual_seed(3)
    term = _crd(monkeypatch)
    for _ in range(2):
        term(_inputs(torch.randn(2, 4), torch.randn(2, 5), INDEX))
    state = term.state_dict()
    assert {"z", "memory_student", "memory_teacher", "embed_s.linear.weight", "embed_t.linear.weight"} <= set(state)
    fresh = _crd()
    assert not torch.equal(fresh.memory_student, term.memory_student) and (fresh.z < 0).all()
    fresh.load_state_dict(state)
    fs, ft = torch.randn(2, 4), torch.randn(2, 5)
    assert torch.allclose(fresh(_inputs(fs, ft, INDEX)), term(_inputs(fs, ft, INDEX)))
    assert torch.equal(fresh.z, term.z) and torch.equal(fresh.memory_teacher, term.memory_teacher)


def test_banks_cost_no_growth_per_step(monkeypatch):
    term = _crd(monkeypatch)
    shapes = {k: v.shape for k, v in term.state_dict().items() if isinstance(v, torch.Tensor)}
    for _ in range(3):
        term(_inputs(torch.randn(2, 4), torch.randn(2, 5), INDEX))
    assert {k: v.shape for k, v in term.state_dict().items() if isinstance(v, torch.Tensor)} == shapes
    assert term.state_dict()["_extra_state"]["draws"] == 3  # the negatives' stream position, for resume


def test_gradients_reach_student_and_heads_never_the_teacher(monkeypatch):
    term = _crd(monkeypatch)
    fs, ft = torch.randn(2, 4, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    term(_inputs(fs, ft, INDEX)).backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert ft.grad is None
    names = {name for name, _ in term.named_parameters()}
    assert names == {"embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight", "embed_t.linear.bias"}
    for name, p in term.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(b.requires_grad for b in term.buffers())


def test_sampler_exact_excludes_the_positive_uniform_may_not():
    torch.manual_seed(4)
    index = torch.arange(5)
    rows = draw_contrast_indices(index, 5, 400, "exact")
    assert rows.shape == (5, 401) and rows.dtype == torch.long
    assert torch.equal(rows[:, 0], index)
    assert (rows[:, 1:] != index[:, None]).all() and rows.min() >= 0 and rows.max() <= 4
    assert all(set(rows[i, 1:].tolist()) == set(range(5)) - {i} for i in range(5))  # every other sample
    uniform = draw_contrast_indices(index, 5, 400, "uniform")
    assert (uniform[:, 1:] == index[:, None]).any() and uniform.min() >= 0 and uniform.max() <= 4


def test_contrast_scores_both_layouts_match_the_formula():
    torch.manual_seed(5)
    anchor = F.normalize(torch.randn(3, 4), dim=1)
    for n, width in ((8, 5), (50, 2)):  # N (D + B) <= B (1+K) D: all products then gather; else index_select + bmm
        bank, rows = torch.randn(n, 4), torch.randint(0, n, (3, width))
        expected = torch.exp(torch.einsum("bkd,bd->bk", bank[rows], anchor) / T)
        assert torch.allclose(contrast_scores(anchor, bank, rows, T), expected, rtol=1e-5)


@pytest.mark.parametrize(("num_samples", "nce_k"), [(20, 10), (400, 2)])  # the all-products and the gathered layout
def test_backward_after_the_in_place_bank_update(num_samples, nce_k):
    term = CRD(pairs=PAIR, feat_dim=8, nce_k=nce_k)
    term.bind(_context({"s": (6,)}, {"t": (5,)}, num_samples=num_samples))
    for _ in range(2):  # the banks are updated in place inside forward, before this backward
        fs = torch.randn(4, 6, requires_grad=True)
        term(_inputs(fs, torch.randn(4, 5), torch.tensor([0, 3, 5, 19]))).backward()
        assert fs.grad.abs().sum() > 0


def test_crd_compiles_as_one_graph_and_matches_eager(monkeypatch):
    """fullgraph: no .item(), no Python branch on a tensor value (Z's test is a torch.where)."""
    torch.manual_seed(10)
    rows = torch.randint(0, 50, (4, 11))
    index = torch.tensor([3, 9, 20, 41])
    rows[:, 0] = index
    monkeypatch.setattr(crd_module, "draw_contrast_indices", lambda i, n, k, sampling, generator=None: rows.clone())
    eager = CRD(pairs=PAIR, feat_dim=8, nce_k=10)
    eager.bind(_context({"s": (6,)}, {"t": (5,)}, num_samples=50))
    compiled_term = copy.deepcopy(eager)
    # the negatives' generator is seeded on the host before the draw (patched here with fixed rows)
    monkeypatch.setattr(compiled_term, "_stream", lambda device: None)
    compiled = torch.compile(lambda fs, ft: compiled_term(_inputs(fs, ft, index)), fullgraph=True, backend="aot_eager")
    for _ in range(2):
        fs, ft = torch.randn(4, 6), torch.randn(4, 5)
        assert torch.allclose(compiled(fs, ft), eager(_inputs(fs, ft, index)))
    assert torch.equal(compiled_term.z, eager.z) and torch.allclose(compiled_term.memory_student, eager.memory_student)


def test_crd_runs_on_maps_and_refuses_nce_k_not_below_num_samples():
    term = CRD(pairs=PAIR, feat_dim=8, nce_k=16)
    term.bind(_context({"s": (2, 3, 3)}, {"t": (4, 2, 2)}, num_samples=40))
    loss = term(_inputs(torch.randn(4, 2, 3, 3), torch.randn(4, 4, 2, 2), torch.tensor([0, 7, 8, 39])))
    assert loss.dim() == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"nce_k = 40 .*num_samples = 40.*distill\.terms\.crd\.nce_k="):
        CRD(pairs=PAIR, nce_k=40).bind(_context({"s": (4,)}, {"t": (4,)}, num_samples=40))


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"weight": -1.0}, "weight"), ({"feat_dim": 0}, "feat_dim"), ({"nce_k": 0}, "nce_k"),
    ({"nce_k": True}, "nce_k"), ({"nce_t": 0.0}, "nce_t"), ({"nce_t": float("nan")}, "nce_t"),
    ({"nce_momentum": 1.0}, "nce_momentum"), ({"nce_momentum": -0.1}, "nce_momentum"),
    ({"sampling": "relax"}, "sampling"),
    ({"pairs": [{"student": "a", "teacher": "b"}, {"student": "c", "teacher": "d"}]}, "pairs"),
])  # fmt: skip
def test_crd_refuses_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        CRD(**kwargs)


def test_crd_in_an_objective_with_real_models_needs_indices():
    torch.manual_seed(6)
    student, teacher = MLP(10, (1, 8, 8), hidden=(16, 12)), CIFARResNet(10, (1, 8, 8), depth=8, width=(4, 8, 8))
    objective = Objective(1.0, {"crd": CRD(weight=0.8, feat_dim=8, nce_k=10)})
    assert objective.needs_indices
    objective.prepare(student, teacher, (1, 8, 8), 10, 20)
    assert objective.layers("student") == ["head:in"] and objective.layers("teacher") == ["fc:in"]
    x, y, index = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)), torch.tensor([3, 0, 19, 7])
    hs, ht = FeatureHooks(student, objective.layers("student")), FeatureHooks(teacher, objective.layers("teacher"))
    with hs.capture() as fs, ht.capture() as ft:
        logits = student(x)
        with torch.no_grad():
            teacher(x)
    out = objective(logits, y, None, fs, ft, index=index)
    out["loss"].backward()
    assert torch.isfinite(out["loss_crd"]) and student.head.weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_crd_forward_does_not_synchronise_with_the_host():
    term = CRD(pairs=PAIR, feat_dim=8, nce_k=64)
    term.bind(_context({"s": (16,)}, {"t": (12,)}, num_samples=500))
    term = term.cuda()
    batches = [(torch.randn(8, 16, device="cuda", requires_grad=True), torch.randn(8, 12, device="cuda"),
                torch.randint(0, 500, (8,), device="cuda")) for _ in range(3)]  # fmt: skip
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for fs, ft, index in batches:  # the first batch sets Z, the others read it
            term(_inputs(fs, ft, index)).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (term.z > 0).all()


# ============================== ReviewKD ======================================================


def _hcl_reference(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """The authors' HCL written out: levels below the height, weights 1/2, 1/4, 1/8 as used."""
    h = fs.shape[2]
    levels = [lv for lv in (4, 2, 1) if lv < h]
    weights = [0.5**(i + 1) for i in range(len(levels))]
    terms = [((fs - ft) ** 2).mean()]
    for lv, w in zip(levels, weights):
        ps, pt = F.adaptive_avg_pool2d(fs, lv), F.adaptive_avg_pool2d(ft, lv)
        terms.append(w * ((ps - pt) ** 2).mean())
    return sum(terms) / (1 + sum(weights))


@pytest.mark.parametrize("size", [8, 4, 2, 1])
def test_hcl_matches_hand_written_reference(size):
    torch.manual_seed(7)
    fs, ft = torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)
    assert torch.allclose(hcl_loss(fs, ft), _hcl_reference(fs, ft), rtol=1e-6)


def test_hcl_hand_computed_on_a_2x2_map():
    # student 0, teacher [[1, 2], [3, 6]]: MSE 50/4 = 12.5; pooled to 1x1: mean 3, MSE 9, weight 1/2
    fs, ft = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])
    assert hcl_loss(fs, ft).item() == pytest.approx((12.5 + 0.5 * 9.0) / 1.5)


def test_hcl_is_zero_when_the_fused_student_equals_the_teacher():
    t = torch.randn(2, 4, 8, 8)
    assert hcl_loss(t.clone(), t).item() == 0.0


def test_resize_is_nearest_for_whole_upward_factors():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(resize(x, (8, 8)), F.interpolate(x, (8, 8), mode="nearest"))
    assert torch.equal(resize(torch.ones(1, 2, 1, 1) * 3, (5, 5)), torch.full((1, 2, 5, 5), 3.0))


def _review(student: dict, teacher: dict, **kwargs) -> ReviewKD:
    pairs = [{"student": s, "teacher": t} for s, t in zip(student, teacher)]
    term = ReviewKD(pairs=pairs, **kwargs)
    term.bind(_context(student, teacher))
    return term


def test_abf_output_shapes_for_maps_vectors_and_mixed_sizes():
    # maps of the same size, then a student smaller than the teacher, then the vector level
    term = _review({"a": (3, 8, 8), "b": (5, 2, 2), "e": (6,)}, {"A": (4, 8, 8), "B": (7, 4, 4), "E": (9,)})
    assert [abf.att_conv is not None for abf in term.abfs] == [True, True, False]
    assert term.abfs[0].conv1[0].out_channels == 6  # min(512, C_s of the deepest level)
    fused = review_fuse([torch.randn(2, 3, 8, 8), torch.randn(2, 5, 2, 2), torch.randn(2, 6)[:, :, None, None]],
                        list(term.abfs), term._sizes)  # fmt: skip
    assert [tuple(f.shape) for f in fused] == [(2, 4, 8, 8), (2, 7, 4, 4), (2, 9, 1, 1)]
    abf = ABF(3, 5, 4, fuse=False)
    out, residual = abf(torch.randn(2, 3, 8, 8), None, (4, 4))  # a larger student map: averaged down
    assert out.shape == (2, 4, 4, 4) and residual.shape == (2, 5, 4, 4)


def test_reviewkd_runs_on_vectors_only_and_gradients_reach_student_and_abfs():
    term = _review({"h1": (16,), "h2": (12,)}, {"H1": (20,), "H2": (10,)}, mid_channels=4)
    s1, s2 = torch.randn(3, 16, requires_grad=True), torch.randn(3, 12, requires_grad=True)
    t1, t2 = torch.randn(3, 20, requires_grad=True), torch.randn(3, 10, requires_grad=True)
    inputs = TermInputs(torch.zeros(3, 10), torch.zeros(3, dtype=torch.long), None, None,
                        {"h1": s1, "h2": s2}, {"H1": t1, "H2": t2})  # fmt: skip
    loss = term(inputs)
    loss.backward()
    assert loss.dim() == 0 and s1.grad.abs().sum() > 0 and s2.grad.abs().sum() > 0
    assert t1.grad is None and t2.grad is None
    for name, p in term.named_parameters():
        assert p.grad is not None, name
    assert term.abfs[0].conv1[0].out_channels == 4


def test_review_is_top_down_the_deep_level_feeds_the_shallow_one():
    term = _review({"a": (3, 4, 4), "b": (5, 2, 2)}, {"A": (4, 4, 4), "B": (6, 2, 2)})
    shallow, deep = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 5, 2, 2, requires_grad=True)
    fused = review_fuse([shallow, deep], list(term.abfs), term._sizes)
    (g_deep,) = torch.autograd.grad(fused[0].sum(), deep, retain_graph=True)
    assert g_deep.abs().sum() > 0  # the shallow output reviews the deeper stage
    (g_shallow,) = torch.autograd.grad(fused[1].sum(), shallow, allow_unused=True)
    assert g_shallow is None  # the deepest output sees only itself


def test_reviewkd_state_dict_round_trip_gives_the_same_loss():
    torch.manual_seed(8)
    term = _review({"a": (3, 4, 4), "e": (5,)}, {"A": (4, 4, 4), "E": (6,)}).eval()
    fresh = _review({"a": (3, 4, 4), "e": (5,)}, {"A": (4, 4, 4), "E": (6,)}).eval()
    fresh.load_state_dict(term.state_dict())
    student = {"a": torch.randn(2, 3, 4, 4), "e": torch.randn(2, 5)}
    teacher = {"A": torch.randn(2, 4, 4, 4), "E": torch.randn(2, 6)}
    inputs = TermInputs(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long), None, None, student, teacher)
    assert torch.equal(term(inputs), fresh(inputs))


def test_warmup_scale():
    term = ReviewKD(pairs=PAIR, warmup_epochs=20)
    values = []
    for epoch in (0, 5, 10, 20, 30):
        term.start_epoch(epoch, 40)
        values.append(term.scale())
    assert values == pytest.approx([0.0, 0.25, 0.5, 1.0, 1.0])
    no_warmup = ReviewKD(pairs=PAIR, warmup_epochs=0)
    assert no_warmup.scale() == 1.0


def test_default_pairs_read_the_teachers_stages_before_the_relu():
    def info(prefix: str) -> FeatureInfo:
        stages = tuple(FeatureStage(f"{prefix}{i}", f"{prefix}{i}:relu", f"{prefix}{i}", 4, 1) for i in (1, 2))
        return FeatureInfo(stages, f"{prefix}fc:in", 4)

    term = ReviewKD()
    term.resolve(info("s"), info("t"))
    expected = [LayerPair("s1:relu", "t1"), LayerPair("s2:relu", "t2"), LayerPair("sfc:in", "tfc:in")]
    assert term.feature_pairs() == expected
    post = ReviewKD(teacher_pre_activation=False)
    post.resolve(info("s"), info("t"))
    assert [p.teacher for p in post.feature_pairs()] == ["t1:relu", "t2:relu", "tfc:in"]


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"weight": -1.0}, "weight"), ({"warmup_epochs": -1}, "warmup_epochs"), ({"warmup_epochs": 2.5}, "warmup_epochs"),
    ({"mid_channels": 0}, "mid_channels"), ({"teacher_pre_activation": "yes"}, "teacher_pre_activation"),
])  # fmt: skip
def test_reviewkd_refuses_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ReviewKD(**kwargs)


def test_reviewkd_refuses_layers_that_are_neither_maps_nor_vectors():
    with pytest.raises(ValueError, match=r"student s gives \(3, 4\)"):
        _review({"s": (3, 4)}, {"t": (3, 4, 4)})


@pytest.mark.parametrize("pair", ["resnet_lenet", "resnet_mlp"])
def test_reviewkd_with_real_models(pair):
    torch.manual_seed(9)
    teacher = CIFARResNet(10, (1, 28, 28), depth=8, width=(4, 8, 8))
    student = LeNet5(10, (1, 28, 28), channels=(3, 4), hidden=(12,)) if pair == "resnet_lenet" \
        else MLP(10, (1, 28, 28), hidden=(16, 12))  # fmt: skip
    objective = Objective(1.0, {"reviewkd": ReviewKD(weight=1.0, warmup_epochs=2)})
    objective.prepare(student, teacher, (1, 28, 28), 10, 20)
    assert objective.layers("teacher") == ["layer2.0.preact", "layer3.0.preact", "fc:in"]
    objective.start_epoch(1, 4)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    hs, ht = FeatureHooks(student, objective.layers("student")), FeatureHooks(teacher, objective.layers("teacher"))
    with hs.capture() as fs, ht.capture() as ft:
        logits = student(x)
        with torch.no_grad():
            teacher(x)
    out = objective(logits, y, None, fs, ft)
    out["loss"].backward()
    assert torch.isfinite(out["loss_reviewkd"]) and out["loss_reviewkd"] > 0
    assert out["loss"].item() == pytest.approx(out["loss_ce"].item() + 0.5 * out["loss_reviewkd"].item(), rel=1e-5)
