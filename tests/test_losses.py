import math

import pytest
import torch

from distill.losses import DistillationLoss, soft_distillation_kl


def _softmax(row, tau=1.0):
    e = [math.exp(v / tau) for v in row]
    s = sum(e)
    return [x / s for x in e]


def test_soft_kl_matches_hand_computation_batchmean():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    tau = 2.0
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        ps, pt = _softmax(srow, tau), _softmax(trow, tau)
        total += sum(pti * (math.log(pti) - math.log(psi)) for pti, psi in zip(pt, ps))
    expected = total / 2 * tau**2  # batchmean: divide by the batch size (2), not by batch*classes
    assert soft_distillation_kl(s, t, tau).item() == pytest.approx(expected, rel=1e-6)
    # DeiT's reduction (sum / numel) is ours divided by the number of classes.
    deit = torch.nn.functional.kl_div(torch.log_softmax(s / tau, -1), torch.log_softmax(t / tau, -1),
                                      reduction="sum", log_target=True) * tau**2 / s.numel()
    assert deit.item() == pytest.approx(expected / 3, rel=1e-6)


def test_soft_kl_zero_when_equal():
    x = torch.randn(4, 10)
    assert soft_distillation_kl(x, x.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_hard_distillation_uses_teacher_argmax_without_smoothing():
    cls = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    dist = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1])
    teacher = torch.tensor([[0.1, 3.0], [5.0, 0.0]])  # argmax: [1, 0]
    loss = DistillationLoss(mode="hard", alpha=0.5, label_smoothing=0.1)((cls, dist), labels, teacher)
    # base: CE with smoothing 0.1 on true labels, by hand
    def ce_smooth(row, y, eps):
        lsm = [v - math.log(sum(math.exp(u) for u in row)) for v in row]
        return -((1 - eps) * lsm[y] + eps * sum(lsm) / len(row))
    base = (ce_smooth([2.0, 0.0], 0, 0.1) + ce_smooth([0.0, 1.0], 1, 0.1)) / 2
    distill = (ce_smooth([0.0, 1.0], 1, 0.0) + ce_smooth([1.0, 0.0], 0, 0.0)) / 2
    assert loss["base"].item() == pytest.approx(base, rel=1e-6)
    assert loss["distill"].item() == pytest.approx(distill, rel=1e-6)
    assert loss["loss"].item() == pytest.approx(0.5 * base + 0.5 * distill, rel=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_soft_total_is_convex_combination(alpha):
    torch.manual_seed(0)
    cls, dist, t = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    y = torch.randint(0, 4, (5,))
    out = DistillationLoss(mode="soft", alpha=alpha, tau=3.0, label_smoothing=0.0)((cls, dist), y, t)
    base = torch.nn.functional.cross_entropy(cls, y)
    kd = soft_distillation_kl(dist, t, 3.0)
    assert out["loss"].item() == pytest.approx(((1 - alpha) * base + alpha * kd).item(), rel=1e-6)


def test_none_mode_single_and_tuple():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    y = torch.tensor([0, 1, 2])
    crit = DistillationLoss(mode="none", label_smoothing=0.0)
    assert crit(a, y)["loss"].item() == pytest.approx(torch.nn.functional.cross_entropy(a, y).item())
    both = (torch.nn.functional.cross_entropy(a, y) + torch.nn.functional.cross_entropy(b, y)) / 2
    assert crit((a, b), y)["loss"].item() == pytest.approx(both.item())


def test_single_tensor_with_distillation_is_a_clear_error():
    with pytest.raises(TypeError, match="cls_logits, dist_logits.*student.dist_token"):
        DistillationLoss(mode="hard")(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 3))
    with pytest.raises(TypeError, match="one tensor of logits.*got 2 outputs"):
        DistillationLoss(mode="hard", dist_token=False)((torch.randn(2, 3),) * 2, torch.tensor([0, 1]),
                                                        torch.randn(2, 3))


def test_class_token_only_student_takes_both_terms_on_its_one_head():
    logits, teacher = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.randn(4, 3)
    y = torch.tensor([0, -1, 2, -1])  # two unlabeled images: they learn from the teacher's pseudo-label alone
    crit = DistillationLoss(mode="hard", alpha=0.3, label_smoothing=0.0, dist_token=False)
    out = crit(logits, y, teacher)
    ce = torch.nn.functional.cross_entropy
    base = ce(logits[[0, 2]], y[[0, 2]])
    pseudo = ce(logits, teacher.argmax(1))
    assert out["loss"].item() == pytest.approx((0.7 * base + 0.3 * pseudo).item(), rel=1e-6)


def test_alpha_balances_the_two_averages_not_each_images_two_targets():
    """The documented averaging: a labeled image weighs (1 - alpha) / n_labeled in the label term and alpha / B
    in the distillation term (alpha 0.9, 8 labeled of 64: an effective 0.53 on the teacher)."""
    batch, labeled, alpha = 64, 8, 0.9
    y = torch.full((batch,), -1)
    y[:labeled] = 0
    cls = torch.zeros(batch, 3, requires_grad=True)
    dist = torch.zeros(batch, 3, requires_grad=True)
    teacher = torch.tensor([[0.0, 5.0, 0.0]]).expand(batch, 3)
    DistillationLoss(mode="hard", alpha=alpha, label_smoothing=0.0)((cls, dist), y, teacher)["loss"].backward()
    label_pull = cls.grad[0, 0].abs().item()  # the gradient of a labeled image's label term
    teacher_pull = dist.grad[0, 1].abs().item()  # and of its distillation term
    third = 2 / 3  # d CE / d logit of the target at uniform logits over 3 classes
    assert label_pull == pytest.approx((1 - alpha) / labeled * third, rel=1e-5)
    assert teacher_pull == pytest.approx(alpha / batch * third, rel=1e-5)
    assert teacher_pull / (label_pull + teacher_pull) == pytest.approx(0.53, abs=0.005)
    assert cls.grad[labeled:].abs().sum().item() == 0.0  # unlabeled images: no label term


def test_missing_teacher_and_shape_mismatch():
    out = (torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="teacher logits"):
        DistillationLoss(mode="soft")(out, torch.tensor([0, 1]), None)
    with pytest.raises(ValueError, match="number of classes"):
        DistillationLoss(mode="soft")(out, torch.tensor([0, 1]), torch.randn(2, 4))


@pytest.mark.parametrize("kwargs", [{"mode": "medium"}, {"alpha": 1.5}, {"tau": 0.0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        DistillationLoss(**kwargs)


def test_mixup_label_loss_is_the_lam_weighted_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    y, y2, lam = torch.tensor([0, 2]), torch.tensor([1, 1]), torch.tensor([0.7, 0.2])
    crit = DistillationLoss(mode="none", label_smoothing=0.0)

    def ce(row, c):
        return -math.log(_softmax(row)[c])

    want = sum(w * ce(r, a) + (1 - w) * ce(r, b) for r, a, b, w in
               zip(logits.tolist(), y.tolist(), y2.tolist(), lam.tolist())) / 2
    assert crit(logits, y, mix=(y2, lam))["loss"].item() == pytest.approx(want, rel=1e-6)
    # lam 1 everywhere is plain CE, also with label smoothing and on both heads of a student
    smooth = DistillationLoss(mode="none", label_smoothing=0.1)
    assert torch.allclose(smooth((logits, logits.flip(1)), y, mix=(y2, torch.ones(2)))["loss"],
                          smooth((logits, logits.flip(1)), y)["loss"])
    # distillation modes mix the class-head labels the same way; the teacher term is unchanged
    hard = DistillationLoss(mode="hard", alpha=0.5, label_smoothing=0.0)
    teacher = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    out = hard((logits, logits), y, teacher, mix=(y2, lam))
    assert out["base"].item() == pytest.approx(want, rel=1e-6)
    assert out["distill"].item() == pytest.approx(hard((logits, logits), y, teacher)["distill"].item())


def test_unlabeled_images_add_no_label_term():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    crit = DistillationLoss(mode="none", label_smoothing=0.1)
    mixed = crit(logits, torch.tensor([-1, 2, -1]))["loss"]
    assert mixed.item() == pytest.approx(crit(logits[1:2], torch.tensor([2]))["loss"].item(), rel=1e-6)
    assert crit(logits, torch.tensor([-1, -1, -1]))["loss"].item() == 0.0
    # with mixup, an unlabeled partner drops its share: only lam * CE(y) of a labeled sample remains
    out = crit(logits[:1], torch.tensor([0]), mix=(torch.tensor([-1]), torch.tensor([0.3])))["loss"]
    assert out.item() == pytest.approx(crit(logits[:1], torch.tensor([0]))["loss"].item(), rel=1e-6)
    # the student's distillation term still sees every image
    soft = DistillationLoss(mode="soft", alpha=0.5, label_smoothing=0.0)
    teacher = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    res = soft((logits, logits), torch.tensor([-1, -1, -1]), teacher)
    assert res["base"].item() == 0.0 and res["distill"].item() > 0
