"""Feature-loss unit tests: attention transfer and FitNets hints, hand-computed and golden values."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd.losses.attention import attention_map, attention_transfer_loss
from kd.losses.hint import HintRegressor, hint_loss

# (1, 2, 2, 2): channel 0 = [[1, 2], [0, -1]], channel 1 = [[1, 0], [2, 1]]
A = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]], [[1.0, 0.0], [2.0, 1.0]]]])


def _q_paper(x: torch.Tensor, p: float) -> torch.Tensor:
    q = x.abs().pow(p).sum(1).reshape(x.shape[0], -1)
    return q / q.pow(2).sum(1, keepdim=True).sqrt()


def _q_code(x: torch.Tensor, p: float) -> torch.Tensor:
    q = x.abs().pow(p).mean(1).reshape(x.shape[0], -1)
    return q / q.pow(2).sum(1, keepdim=True).sqrt()


# --- attention map ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_attention_map_hand_computed(mode):
    # squares: ch0 [1, 4, 0, 1], ch1 [1, 0, 4, 1]; sum [2, 4, 4, 2], mean [1, 2, 2, 1]
    # both normalise to [1, 2, 2, 1] / sqrt(10)
    expected = torch.tensor([[1.0, 2.0, 2.0, 1.0]]) / math.sqrt(10.0)
    assert torch.allclose(attention_map(A, 2.0, mode), expected, atol=1e-7)


def test_attention_map_hand_computed_p1_uses_abs():
    # |ch0| + |ch1| = [2, 2, 2, 2] -> [0.5, 0.5, 0.5, 0.5]
    for mode in ("paper", "code"):
        assert torch.allclose(attention_map(A, 1.0, mode), torch.full((1, 4), 0.5), atol=1e-7)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 4.0])
def test_attention_map_matches_independent_formulas_and_modes_agree(p):
    torch.manual_seed(1)
    x = torch.randn(3, 5, 4, 6)
    assert torch.allclose(attention_map(x, p, "paper"), _q_paper(x, p), atol=1e-6)
    assert torch.allclose(attention_map(x, p, "code"), _q_code(x, p), atol=1e-6)
    assert torch.allclose(attention_map(x, p, "paper"), attention_map(x, p, "code"), atol=1e-6)


def test_attention_map_code_mode_equals_authors_at_for_p2():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 5, 5)
    authors = F.normalize(x.pow(2).mean(1).view(x.size(0), -1))
    assert torch.allclose(attention_map(x, 2.0, "code"), authors, atol=1e-7)


def test_attention_map_pools_before_normalising():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8)
    agg = x.pow(2).mean(1)  # (2, 8, 8)
    pooled = agg.reshape(2, 4, 2, 4, 2).mean(dim=(2, 4)).reshape(2, 16)
    expected = pooled / pooled.norm(dim=1, keepdim=True)
    assert torch.allclose(attention_map(x, 2.0, "code", size=(4, 4)), expected, atol=1e-6)
    assert torch.allclose(attention_map(x, 2.0, "code", size=(8, 8)), _q_code(x, 2.0), atol=1e-6)


# --- attention transfer loss -----------------------------------------------------------------


def test_attention_transfer_hand_computed_both_modes():
    teacher = torch.ones(1, 1, 2, 2)  # Q_t = [0.5, 0.5, 0.5, 0.5]
    qs = [1 / math.sqrt(10), 2 / math.sqrt(10), 2 / math.sqrt(10), 1 / math.sqrt(10)]
    sq = [(q - 0.5) ** 2 for q in qs]
    assert attention_transfer_loss(A, teacher, mode="code").item() == pytest.approx(sum(sq) / 4, rel=1e-6)
    paper = attention_transfer_loss(A, teacher, mode="paper").item()
    assert paper == pytest.approx(math.sqrt(sum(sq)), rel=1e-6)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_attention_transfer_matches_independent_formulas(p):
    torch.manual_seed(4)
    s, t = torch.randn(4, 3, 5, 5), torch.randn(4, 7, 5, 5)
    d = _q_paper(s, p) - _q_paper(t, p)
    paper = d.pow(2).sum(1).sqrt().mean()
    code = (_q_code(s, p) - _q_code(t, p)).pow(2).mean()
    assert attention_transfer_loss(s, t, p, "paper").item() == pytest.approx(paper.item(), rel=1e-5)
    assert attention_transfer_loss(s, t, p, "code").item() == pytest.approx(code.item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_attention_transfer_zero_when_equal(mode):
    x = torch.randn(3, 4, 6, 6)
    assert attention_transfer_loss(x, x.clone(), mode=mode).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_attention_transfer_spatial_mismatch_equals_pooling_by_hand(mode):
    torch.manual_seed(5)
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    agg = s.pow(2).mean(1).reshape(2, 4, 2, 4, 2).mean(dim=(2, 4)).reshape(2, 16)
    qs = agg / agg.norm(dim=1, keepdim=True)
    d = qs - _q_code(t, 2.0)
    expected = d.norm(dim=1).mean() if mode == "paper" else d.pow(2).mean()
    assert attention_transfer_loss(s, t, mode=mode).item() == pytest.approx(expected.item(), rel=1e-5)
    # symmetric: a larger teacher is pooled to the student's size
    assert attention_transfer_loss(t, s, mode=mode).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_attention_transfer_gradients_reach_student_only(mode):
    torch.manual_seed(6)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 8, 4, 4, requires_grad=True)  # different channel count
    attention_transfer_loss(s, t, mode=mode).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_attention_rejects_bad_inputs():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="paper"):
        attention_map(x, mode="sum")
    with pytest.raises(ValueError, match="paper"):
        attention_transfer_loss(x, x, mode="fitnet")
    for p in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="p must"):
            attention_transfer_loss(x, x, p=p)
    with pytest.raises(ValueError, match=r"\(2, 12\)"):
        attention_map(torch.randn(2, 12))
    with pytest.raises(ValueError, match="4-D"):
        attention_transfer_loss(x, torch.randn(2, 48))
    with pytest.raises(ValueError, match="batch"):
        attention_transfer_loss(x, torch.randn(3, 3, 4, 4))


# --- hint loss -------------------------------------------------------------------------------


def test_hint_loss_hand_computed_both_modes():
    r = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 3.0]])
    h = torch.zeros(2, 3)
    # paper: per sample 1/2 * 9 = 4.5, batch mean 4.5; mean: 18 / 6 = 3
    assert hint_loss(r, h, "paper").item() == pytest.approx(4.5, rel=1e-7)
    assert hint_loss(r, h, "mean").item() == pytest.approx(3.0, rel=1e-7)


def test_hint_loss_matches_independent_formulas():
    torch.manual_seed(7)
    r, h = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    paper = 0.5 * ((r - h) ** 2).reshape(4, -1).sum(1).mean()
    mean = ((r - h) ** 2).mean()
    assert hint_loss(r, h, "paper").item() == pytest.approx(paper.item(), rel=1e-6)
    assert hint_loss(r, h, "mean").item() == pytest.approx(mean.item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["paper", "mean"])
def test_hint_loss_zero_when_equal(mode):
    x = torch.randn(3, 4, 5, 5)
    assert hint_loss(x, x.clone(), mode).item() == 0.0


@pytest.mark.parametrize("mode", ["paper", "mean"])
def test_hint_gradients_reach_student_and_regressor_only(mode):
    torch.manual_seed(8)
    s = torch.randn(4, 3, 8, 8, requires_grad=True)
    t = torch.randn(4, 6, 4, 4, requires_grad=True)
    reg = HintRegressor((3, 8, 8), (6, 4, 4), kernel_size=3)
    hint_loss(reg(s), t, mode).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.parameters())
    assert t.grad is None


def test_hint_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\) vs \(2, 5, 4, 4\).*HintRegressor"):
        hint_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="paper"):
        hint_loss(torch.randn(2, 3), torch.randn(2, 3), mode="sum")


# --- hint regressor --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("student", "teacher", "k"),
    [
        ((3, 8, 8), (6, 8, 8), 1),
        ((3, 8, 8), (6, 8, 8), 3),
        ((3, 8, 8), (6, 4, 4), 1),
        ((3, 8, 8), (6, 4, 4), 3),
        ((3, 4, 4), (6, 8, 8), 1),
        ((16,), (32,), 1),
    ],
)
def test_regressor_output_shapes(student, teacher, k):
    reg = HintRegressor(student, teacher, kernel_size=k)
    assert reg(torch.randn(2, *student)).shape == (2, *teacher)


def test_regressor_modules():
    conv = HintRegressor((3, 8, 8), (6, 4, 4), kernel_size=3)
    assert isinstance(conv.conv, torch.nn.Conv2d) and conv.conv.kernel_size == (3, 3)
    assert conv.conv.padding == (1, 1) and isinstance(conv.bn, torch.nn.BatchNorm2d)
    lin = HintRegressor((16,), (32,))
    assert isinstance(lin.linear, torch.nn.Linear) and lin.conv is None


def test_regressor_rejects_bad_arguments():
    for k in (0, 2, 5):
        with pytest.raises(ValueError, match="kernel_size"):
            HintRegressor((3, 4, 4), (6, 4, 4), kernel_size=k)
    with pytest.raises(ValueError, match=r"\(3, 4, 4\).*\(6,\)"):
        HintRegressor((3, 4, 4), (6,))
    with pytest.raises(ValueError, match=r"\(16,\).*\(6, 4, 4\)"):
        HintRegressor((16,), (6, 4, 4))
    with pytest.raises(ValueError, match="student_shape"):
        HintRegressor((3, 4), (6, 4))
    with pytest.raises(ValueError, match="student features"):
        HintRegressor((3, 4, 4), (6, 4, 4))(torch.randn(2, 3, 5, 5))


# --- golden values ---------------------------------------------------------------------------


def _golden_features() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)


def test_golden_attention_transfer_paper():
    s, t = _golden_features()
    # golden: change only on purpose
    assert attention_transfer_loss(s, t, mode="paper").item() == pytest.approx(0.8795373439788818, rel=1e-5)


def test_golden_attention_transfer_code():
    s, t = _golden_features()
    # golden: change only on purpose
    assert attention_transfer_loss(s, t, mode="code").item() == pytest.approx(0.04844105616211891, rel=1e-5)


def test_golden_hint_paper():
    torch.manual_seed(0)
    r, h = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    # golden: change only on purpose
    assert hint_loss(r, h, "paper").item() == pytest.approx(48.845184326171875, rel=1e-5)


def test_golden_hint_mean():
    torch.manual_seed(0)
    r, h = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    # golden: change only on purpose
    assert hint_loss(r, h, "mean").item() == pytest.approx(2.0352160930633545, rel=1e-5)
