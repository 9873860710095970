import matplotlib.image
import pytest
import torch

from distill import evaluation as E
from distill import plots as P
from distill import report as R

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, expected):
    assert path == expected and path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1024
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _history(n, start_acc):
    return [{"epoch": e + 1, "train_loss": 2.0 / (e + 1), "val_acc": min(start_acc + 0.05 * e, 1.0)} for e in range(n)]


def test_plot_training_curves(tmp_path):
    histories = {"teacher": _history(6, 0.7), "baseline": _history(6, 0.5), "student": []}
    out = tmp_path / "sub" / "curves.png"
    _assert_png(P.plot_training_curves(histories, out), out)


def test_plot_training_curves_all_empty(tmp_path):
    out = tmp_path / "empty.png"
    _assert_png(P.plot_training_curves({"teacher": [], "student": []}, out), out)


def test_plot_confusion_matrix(tmp_path):
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (200,))
    preds = torch.where(torch.rand(200) < 0.8, labels, torch.randint(0, 10, (200,)))
    out = tmp_path / "cm.png"
    cm = E.confusion_matrix(preds, labels, 10)
    _assert_png(P.plot_confusion_matrix(cm, [str(i) for i in range(10)], out, "Student"), out)
    with pytest.raises(ValueError, match="class names"):
        P.plot_confusion_matrix(cm, ["a", "b"], out, "bad")


def test_plot_accuracy_vs_throughput(tmp_path):
    points = [{"name": "teacher", "top1": 0.99, "images_per_sec": 150.0, "params": 700_000},
              {"name": "baseline", "top1": 0.97, "images_per_sec": 2500.0, "params": 200_000},
              {"name": "student", "top1": 0.98, "images_per_sec": 2400.0, "params": 200_000}]
    out = tmp_path / "acc_speed.png"
    _assert_png(P.plot_accuracy_vs_throughput(points, out), out)


@pytest.mark.parametrize("with_dist", [True, False])
def test_plot_head_agreement(tmp_path, with_dist):
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (100,))
    noisy = lambda: torch.nn.functional.one_hot(labels, 5).float() * 2 + torch.randn(100, 5)  # noqa: E731
    out = tmp_path / "heads.png"
    got = P.plot_head_agreement(noisy(), noisy() if with_dist else None, noisy(), labels, out)
    _assert_png(got, out)


def test_plot_seed_summary(tmp_path):
    runs = [{"teacher": {"top1": 0.99 - 0.002 * s}, "baseline": {"top1": 0.97 + 0.003 * s},
             "student": {"top1": 0.975 + 0.002 * s}} for s in range(3)]
    out = tmp_path / "seeds.png"
    _assert_png(P.plot_seed_summary(E.aggregate_runs(runs), out), out)
    with pytest.raises(ValueError, match="nll"):
        P.plot_seed_summary(E.aggregate_runs(runs), out, metric="nll")


def test_results_table_formats():
    rows = [{"name": "teacher", "top1": 0.98833, "top5": 1.0, "ece": 0.0123, "params": 696_042,
             "flops_per_image": 52_578_816, "images_per_sec": 1234.5, "latency_ms_batch1": 2.1549},
            {"name": "student", "top1": 0.9833, "params": 204_000, "flops_per_image": 3.2e9,
             "agreement_with_teacher": 0.975}]
    table = R.results_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| model | top-1 (%)")
    assert "| teacher | 98.83 | 100.00 | 1.23 |" in table
    assert "696.0K" in table and "52.58M" in table and "3.20G" in table and "204.0K" in table
    assert "1,234" in table or "1,235" in table
    assert "97.50" in table and "2.15" in table
    assert lines[3].count("\u2013") == 4  # student: no top-5, ECE, images/s, latency


def test_results_table_drops_absent_columns():
    table = R.results_table([{"name": "a", "top1": 0.5}, {"name": "b"}])
    assert table.splitlines()[0] == "| model | top-1 (%) |"
    assert "| b | \u2013 |" in table


def test_distillation_summary_gain_gap_and_costs():
    metrics = {"teacher": {"top1": 0.9883, "params": 840_000, "images_per_sec": 1000.0},
               "baseline": {"top1": 0.9710, "params": 200_000, "images_per_sec": 3100.0},
               "student": {"top1": 0.9833, "params": 200_000, "images_per_sec": 3100.0},
               "distillation_gain": 0.0123, "gap_to_teacher": 0.0050}
    text = R.distillation_summary(metrics)
    assert "+1.23 points" in text and "98.33 %" in text and "97.10 %" in text
    assert "0.50 points behind the teacher (98.83 %)" in text
    assert "4.2x fewer parameters" in text and "3.1x the teacher's throughput" in text


def test_distillation_summary_negative_gain_without_costs():
    metrics = {"teacher": {"top1": 0.97}, "baseline": {"top1": 0.975}, "student": {"top1": 0.972}}
    text = R.distillation_summary(metrics)
    assert "-0.30 points" in text and "bought" not in text
    assert "0.20 points ahead of the teacher" in text and "fewer" not in text


def test_seed_table():
    runs = [{"student": {"top1": 0.98, "params": 204_000}, "distillation_gain": 0.01},
            {"student": {"top1": 0.97, "params": 204_000}, "distillation_gain": -0.002}]
    table = R.seed_table(E.aggregate_runs(runs))
    # mean ± std, then the 95 % t interval of the mean (12.706 * s / sqrt(2) with 2 seeds), then n
    assert "| student.top1 (%) | 97.50 ± 0.71 | 91.15 to 103.85 | 2 |" in table
    assert "| student.params | 204.0K ± 0 | 204.0K to 204.0K | 2 |" in table
    assert "| distillation_gain (%) | 0.40 ± 0.85 | -7.22 to 8.02 | 2 |" in table
    only = R.seed_table(E.aggregate_runs(runs), keys=["distillation_gain", "missing"])
    assert len(only.splitlines()) == 3


def test_format_count():
    assert [R.format_count(v) for v in (24, 15_300, 2_500_000, 3.6e9)] == ["24", "15.3K", "2.50M", "3.60G"]


def test_per_seed_lines_give_mean_paired_interval_and_each_seed():
    runs = [{"distillation_gain": g, "gap_to_teacher": 0.01} for g in (0.03, 0.04, 0.05)]
    text = R.per_seed_lines(E.aggregate_runs(runs))
    gain, gap = text.splitlines()
    _, low, high = E.t_interval([0.03, 0.04, 0.05])
    assert gain == (f"distillation_gain: mean +4.00 points, 95 % CI {100 * low:+.2f} to {100 * high:+.2f} "
                    "(paired over 3 seeds); per seed: +3.00, +4.00, +5.00")
    assert gap.startswith("gap_to_teacher: mean +1.00 points")
    one_seed = R.per_seed_lines(E.aggregate_runs(runs[:1])).splitlines()[0]
    assert one_seed.endswith("no interval from one seed; per seed: +3.00")
