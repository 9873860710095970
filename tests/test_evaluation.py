import math

import pytest
import torch
from torch import nn

from distill import evaluation as E
from distill.models.deit import build_deit


def test_topk_accuracy_hand_checked():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    # top-1 predictions [1, 0, 2]: only row 0 right. Top-2 sets {1,2}, {0,2}, {2,1}: rows 0 and 1 right.
    assert E.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert E.topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert E.topk_accuracy(logits, labels, 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k=4"):
        E.topk_accuracy(logits, labels, 4)


def test_agreement_share_of_matching_argmax():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # argmax 0 1 0 1
    b = torch.tensor([[5.0, 1.0], [3.0, 1.0], [2.0, 1.0], [0.0, 9.0]])  # argmax 0 0 0 1
    assert E.agreement(a, b) == pytest.approx(0.75)
    assert E.agreement(a, a) == 1.0
    with pytest.raises(ValueError):
        E.agreement(a, b[:3])


def test_ece_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.3, 0.7], [0.55, 0.45]])
    labels = torch.tensor([0, 1, 1, 0])
    # 5 bins of width 0.2. Confidences .9 (right), .7 (wrong), .7 (right), .55 (right).
    # (0.8, 1.0]: {.9}      acc 1.0, conf 0.90 -> |gap| 0.10, weight 1/4 -> 0.025
    # (0.6, 0.8]: {.7, .7}  acc 0.5, conf 0.70 -> |gap| 0.20, weight 2/4 -> 0.100
    # (0.4, 0.6]: {.55}     acc 1.0, conf 0.55 -> |gap| 0.45, weight 1/4 -> 0.1125
    assert E.expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.2375)
    # One bin: |mean acc - mean conf| = |0.75 - 0.7125|.
    assert E.expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.0375)


def test_ece_rejects_logits():
    with pytest.raises(ValueError, match="softmax"):
        E.expected_calibration_error(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))


def test_confusion_matrix_rows_true_cols_predicted():
    preds = torch.tensor([0, 1, 1, 2, 2, 2])
    labels = torch.tensor([0, 0, 1, 2, 1, 2])
    cm = E.confusion_matrix(preds, labels, 3)
    assert cm.dtype == torch.long
    assert cm.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    with pytest.raises(ValueError, match="labels"):
        E.confusion_matrix(preds, torch.tensor([0, 0, 1, 3, 1, 2]), 3)


@pytest.mark.parametrize("num_classes,has_top5", [(3, False), (5, False), (10, True)])
def test_classification_metrics_keys(num_classes, has_top5):
    torch.manual_seed(0)
    logits, labels = torch.randn(40, num_classes), torch.randint(0, num_classes, (40,))
    m = E.classification_metrics(logits, labels, n_bins=10)
    assert set(m) == {"top1", "ece", "nll", "num_samples"} | ({"top5"} if has_top5 else set())
    assert m["num_samples"] == 40 and 0 <= m["top1"] <= 1 and 0 <= m["ece"] <= 1
    assert m["nll"] == pytest.approx(float(nn.functional.cross_entropy(logits, labels)), rel=1e-6)


def test_classification_metrics_two_samples():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # softmax rows [.25, .75] and [.5, .5]
    m = E.classification_metrics(logits, torch.tensor([1, 0]), n_bins=2)
    # Argmax of a tie is the first index, so both right; bins (0, .5]: {.5} gap .5, (.5, 1]: {.75} gap .25.
    assert m["top1"] == 1.0
    assert m["ece"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.25)
    assert m["nll"] == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2)


def test_count_parameters():
    assert E.count_parameters(nn.Linear(4, 3)) == 15


def test_flops_linear_is_two_per_mac():
    assert E.flops_per_image(nn.Linear(4, 3), (4,)) == 2 * 4 * 3


def test_flops_small_cnn_hand_counted():
    # Conv 1->2, 3x3 on 5x5 -> 2x3x3 outputs of 9 MACs each = 162 MACs; Linear 18->3 = 54 MACs.
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3))
    assert E.flops_per_image(model, (1, 5, 5)) == 2 * (162 + 54)


@pytest.mark.parametrize("train", [True, False])
def test_flops_deit_positive_and_mode_restored(train):
    model = build_deit("deit_nano", num_classes=10, in_chans=1).train(train)
    model.blocks[0].eval()  # a mixed state must survive too
    before = [m.training for m in model.modules()]
    flops = E.flops_per_image(model, (1, 16, 16))
    assert [m.training for m in model.modules()] == before
    # Patch embedding alone: 16 patches x 48 channels x 16 MACs x 2 FLOPs.
    assert flops > 2 * 16 * 48 * 16
    assert flops == E.flops_per_image(model.eval(), (1, 16, 16))  # independent of the mode it came in


def test_measure_throughput_cpu():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).train()
    speed = E.measure_throughput(model, (1, 4, 4), batch_size=8, iters=3, device="cpu", warmup=1)
    assert speed["images_per_sec"] > 0 and speed["latency_ms_batch1"] > 0
    assert "warm-up" in speed["method"] and "batches of 8" in speed["method"] and "cpu" in speed["method"]
    assert model.training
    first_line = E.measure_throughput.__doc__.strip().splitlines()[0]
    assert "warmup" in first_line and "median" in first_line


def test_mean_std_sample_std():
    assert E.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert E.mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        E.mean_std([])


def test_aggregate_runs_flattens_and_skips_non_numbers():
    runs = [
        {"student": {"top1": 0.9, "params": 100}, "device": "cpu", "ok": True},
        {"student": {"top1": 0.8, "params": 100}, "device": "cpu", "extra": 1.0},
    ]
    agg = E.aggregate_runs(runs)
    assert set(agg) == {"student.top1", "student.params", "extra"}
    assert agg["student.top1"]["mean"] == pytest.approx(0.85)
    assert agg["student.top1"]["std"] == pytest.approx(math.sqrt(0.005))
    assert agg["student.top1"]["n"] == 2 and agg["student.top1"]["values"] == [0.9, 0.8]
    extra = dict(agg["extra"])
    assert all(math.isnan(v) for v in extra.pop("ci95"))  # one run: no interval
    assert extra == {"mean": 1.0, "std": 0.0, "n": 1, "values": [1.0]}


def test_t_interval_of_a_paired_difference_matches_a_hand_computation():
    gains = [0.28, 2.51, 0.84, 1.11, 3.06]  # per-seed student minus baseline, points
    mean, low, high = E.t_interval(gains)
    sd = math.sqrt(sum((g - mean) ** 2 for g in gains) / 4)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t(0.975, 4 degrees of freedom)
    assert mean == pytest.approx(1.56) and (low, high) == pytest.approx((mean - half, mean + half))
    assert low < 0.2 < high  # wide: 5 seeds with this spread do not pin the gain down
    assert all(math.isnan(v) for v in E.t_interval([1.0])[1:])


def test_wilson_interval_and_paired_test_set_interval():
    low, high = E.wilson_interval(352, 359)
    assert low < 352 / 359 < high and high < 1.0 and (low, high) == pytest.approx((0.9603, 0.9905), abs=1e-4)
    # Newcombe's paired score interval, against the reference value of Fagerland, Lydersen & Laake's
    # `contingencytables` (Newcombe_square_and_add_CI_paired_2x2 on the table 59, 6 / 16, 80: -0.0621,
    # 95 % CI -0.1186 to -0.0046)
    diff, low, high = E.newcombe_paired_interval(59, 6, 16, 80)
    assert (diff, low, high) == pytest.approx((-0.0621, -0.1186, -0.0046), abs=5e-5)
    # from correctness vectors: the same table, in any order of the images
    a = torch.tensor([True] * 59 + [True] * 6 + [False] * 16 + [False] * 80)
    b = torch.tensor([True] * 59 + [False] * 6 + [True] * 16 + [False] * 80)
    perm = torch.randperm(len(a), generator=torch.Generator().manual_seed(0))
    assert E.paired_accuracy_interval(a[perm], b[perm]) == pytest.approx((diff, low, high))
    assert E.paired_counts(a, b) == (59, 6, 16, 80)
    # two models that never disagree: no difference measured, but the test set still leaves doubt (a Wald
    # interval on the per-image differences would have zero width here)
    diff, low, high = E.paired_accuracy_interval(a, a)
    assert diff == 0.0 and low < -0.005 and high > 0.005 and low == pytest.approx(-high)
    # wider than the Wald interval at these counts (Wald is too narrow: its coverage falls short)
    d = a.float() - b.float()
    wald = 1.959963984540054 * float(d.std()) / math.sqrt(len(d))
    diff, low, high = E.paired_accuracy_interval(a, b)
    assert high - low > 2 * wald
    with pytest.raises(ValueError, match="differ in length"):
        E.paired_counts(a, b[:-1])


def test_interleaved_speed_gives_medians_spreads_and_per_round_ratios():
    models = {"teacher": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 512), torch.nn.Linear(512, 10)),
              "student": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10))}
    out = E.interleaved_speed(models, (3, 4, 4), batch_size=8, iters=3, rounds=3, device="cpu")
    for name in models:
        row = out[name]
        assert row["images_per_sec_min"] <= row["images_per_sec"] <= row["images_per_sec_max"]
        assert row["speedup_vs_teacher_min"] <= row["speedup_vs_teacher"] <= row["speedup_vs_teacher_max"]
    assert out["teacher"]["speedup_vs_teacher"] == 1.0
    assert "3 interleaved rounds" in out["method"] and "median" in out["method"]
