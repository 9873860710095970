"""A few real training steps through the one engine, for each task kind; the step budget, the callbacks, the
progress bar and the log of :func:`distill.engine.fit`."""

import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from distill.config import TrainParams
from distill.engine import (
    EpochSampler,
    NonFiniteLossError,
    StepInfo,
    SupervisedTask,
    fit,
    loader_length,
    steps_per_epoch,
    warmup_cosine,
)
from distill.losses import DistillationLoss
from distill.models.deit import build_deit
from distill.runtime import make_accelerator
from distill.teachers import build_teacher
from distill.views import OnlineTeacher, RandomViews, StepContext


class ToyAugmenter:
    """Crop-free stand-in: params are a per-image brightness jitter (enough to test the plumbing)."""

    def sample(self, n, generator):
        p = torch.zeros(n, 5)
        p[:, 4] = torch.rand(n, generator=generator)
        return p

    def eval_params(self, n):
        return torch.zeros(n, 5)

    def __call__(self, images, params):
        x = images.float() / 255.0
        return (x + 0.05 * params[:, 4].view(-1, 1, 1, 1)) - 0.5


class Blobs(Dataset):
    """4 classes: a bright quadrant on a dark 16x16 image."""

    def __init__(self, n=96, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        imgs = torch.randint(0, 40, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
        for i, y in enumerate(self.labels.tolist()):
            r, c = divmod(y, 2)
            imgs[i, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 180
        self.images = imgs

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


RECIPE = {"epochs": 3, "batch_size": 16, "lr": 3e-3, "min_lr": 1e-5, "weight_decay": 0.0, "warmup_epochs": 1,
          "label_smoothing": 0.0, "grad_clip": 1.0, "grad_accum": 1, "scale_lr": True, "mixup": 0.0}


def recipe(**changes) -> TrainParams:
    """A complete training recipe (TrainParams has no defaults: params.yaml is their only source)."""
    return TrainParams(**{**RECIPE, **changes})


PARAMS = recipe()


def _deit(distilled=True):
    return build_deit("deit_nano", num_classes=4, in_chans=1, img_size=16, drop_path_rate=0.0, distilled=distilled)


def _teacher():
    return build_teacher("resnet_small", num_classes=4, in_chans=1, width=4, blocks=1)


@pytest.mark.parametrize("kind", ["teacher", "baseline", "hard", "soft"])
def test_fit_lowers_loss_for_each_task(kind):
    torch.manual_seed(0)
    aug = ToyAugmenter()
    if kind == "teacher":
        task = SupervisedTask(model=_teacher(), augmenter=aug, criterion=DistillationLoss(mode="none"),
                              views=RandomViews(aug))
    elif kind == "baseline":
        task = SupervisedTask(model=_deit(False), augmenter=aug, criterion=DistillationLoss(mode="none"),
                              views=RandomViews(aug))
    else:
        teacher = _teacher()
        task = SupervisedTask(model=_deit(True), augmenter=aug, criterion=DistillationLoss(mode=kind, tau=2.0),
                              views=OnlineTeacher(teacher, aug))
    res = fit(task, train_set=Blobs(), val_set=Blobs(32, seed=1), params=PARAMS, seed=0,
              accelerator=make_accelerator(cpu=True))
    losses = [h["train_loss"] for h in res.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert 0.0 <= res.history[-1]["val_acc"] <= 1.0


def test_teacher_stays_frozen_in_eval_mode():
    aug = ToyAugmenter()
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = SupervisedTask(model=_deit(True), augmenter=aug, criterion=DistillationLoss(mode="hard"),
                          views=OnlineTeacher(teacher, aug))
    fit(task, train_set=Blobs(48), val_set=None, params=recipe(epochs=1, warmup_epochs=0), seed=0,
        accelerator=make_accelerator(cpu=True))
    assert not teacher.training
    # BatchNorm running stats would move if the teacher had been in train mode
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def baseline_task(seed=123):
    """The labels-only DeiT on the toy data, initialised from ``seed``."""
    torch.manual_seed(seed)
    aug = ToyAugmenter()
    return SupervisedTask(model=_deit(False), augmenter=aug, criterion=DistillationLoss(mode="none"),
                          views=RandomViews(aug))


class Steps:
    """A callback that records every optimizer step it sees."""

    def __init__(self):
        self.seen: list[StepInfo] = []

    def on_step_end(self, info):
        self.seen.append(info)

    @property
    def lrs(self):
        return [s.lr for s in self.seen]


class EpochRecords:
    """A callback that collects every epoch record fit reports (the tracker's view of a run)."""

    def __init__(self, records: list):
        self.records = records

    def on_epoch_end(self, record):
        self.records.append(record)


def test_nan_loss_stops_with_epoch_and_step():
    task = baseline_task()
    with torch.no_grad():
        task.model.head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1; training stopped\. Earlier outputs"):
        fit(task, train_set=Blobs(32), val_set=None, params=recipe(epochs=1, warmup_epochs=0), seed=0,
            accelerator=make_accelerator(cpu=True), state_dir=None)


def test_sampler_and_step_generators_are_stateless():
    s = EpochSampler(10, seed=3)
    s.set_epoch(2)
    a = list(s)
    s.set_epoch(2)
    assert list(s) == a and sorted(a) == list(range(10))
    s.set_epoch(3)
    assert list(s) != a
    g1 = StepContext(seed=1, epoch=2, step=3).generator()
    g2 = StepContext(seed=1, epoch=2, step=3).generator()
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_warmup_cosine_schedule():
    kw = {"warmup_steps": 10, "total_steps": 110, "min_ratio": 0.01}
    assert warmup_cosine(0, **kw) == pytest.approx(0.1)
    assert warmup_cosine(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine(60, **kw) == pytest.approx(0.505, abs=1e-3)
    assert warmup_cosine(110, **kw) == pytest.approx(0.01)


def test_online_teacher_with_mixup_labels_the_mixed_image():
    from distill.augment import Augmenter, AugmentSpec

    aug = Augmenter(spec=AugmentSpec(), out_size=16, mean=[0.5], std=[0.25])
    teacher = _teacher().eval()
    data = Blobs(8)
    batch = {"image": data.images, "label": data.labels, "index": torch.arange(8)}
    ctx = StepContext(seed=0, epoch=1, step=2)
    params, logits, mix = OnlineTeacher(teacher, aug, mixup=0.4)(batch, ctx)
    assert mix is not None and torch.equal(mix.labels, data.labels.flip(0))
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher(aug(data.images, params, mix)))
    # the same step draws the same crops and weights; without mixup there is no mix
    again = RandomViews(aug, mixup=0.4)(batch, ctx)
    assert torch.equal(again.params, params) and torch.equal(again.mix.lam, mix.lam)
    assert RandomViews(aug)(batch, ctx).mix is None
    # a training step with mixed views runs and mixes the label loss
    task = SupervisedTask(model=_deit(True), augmenter=aug, criterion=DistillationLoss(mode="soft", alpha=0.5),
                          views=OnlineTeacher(teacher, aug, mixup=0.4))
    out = task.training_step(batch, ctx)
    assert torch.isfinite(out["loss"]) and out["logits"].shape == (8, 4)


# ------------------------------------------------------------------------------------------------ step budget
@pytest.mark.parametrize("n, batch, grad_accum", [(64, 16, 1), (70, 16, 1), (80, 16, 2), (70, 16, 3), (33, 8, 4),
                                                  (16, 16, 2), (10, 16, 1), (5, 1, 2)])
def test_loader_length_and_steps_per_epoch_equal_the_prepared_loader(n, batch, grad_accum):
    accelerator = make_accelerator(grad_accum=grad_accum, cpu=True)
    model = nn.Linear(1, 1)
    loader = DataLoader(range(n), batch_size=batch, sampler=EpochSampler(n, seed=0), drop_last=n > batch)
    model, loader = accelerator.prepare(model, loader)
    assert loader_length(n, batch) == len(loader)
    steps = 0
    for _ in range(2):  # two epochs: accelerate's accumulation counter must not carry over
        for _batch in loader:
            with accelerator.accumulate(model):
                steps += accelerator.sync_gradients
    assert steps_per_epoch(n, batch, grad_accum=grad_accum) == math.ceil(len(loader) / grad_accum) == steps / 2


@pytest.mark.parametrize("processes", [2, 3])
@pytest.mark.parametrize("n, batch", [(64, 16), (70, 16), (100, 16), (16, 16), (10, 16), (40, 16)])
def test_loader_length_follows_accelerate_sharding(n, batch, processes):
    from accelerate.data_loader import BatchSamplerShard

    sampler = BatchSampler(SequentialSampler(range(n)), batch, drop_last=n > batch)
    for rank in range(processes):
        shard = BatchSamplerShard(sampler, num_processes=processes, process_index=rank, even_batches=True)
        assert loader_length(n, batch, processes=processes) == len(shard) == len(list(shard))


def test_the_step_budget_and_the_warm_up_are_whole_epochs_of_steps():
    steps = Steps()
    params = recipe(epochs=3, warmup_epochs=1)
    # 48 images, batch 16: 3 optimizer steps an epoch
    res = fit(baseline_task(), train_set=Blobs(48), val_set=Blobs(16, seed=1), params=params, seed=0,
              accelerator=make_accelerator(cpu=True), callbacks=[steps])
    assert (res.steps, res.total_steps, res.warmup_steps, res.steps_per_epoch, res.epochs) == (9, 9, 3, 3, 3)
    assert [s.global_step for s in steps.seen] == list(range(1, 10))
    assert [(s.epoch, s.step) for s in steps.seen] == [(e, i) for e in range(3) for i in range(3)]
    assert [h["steps"] for h in res.history] == [3, 6, 9] and "val_acc" in res.history[-1]
    peak = params.lr  # one process, no accumulation: scale_lr leaves it as it is
    assert steps.lrs[:3] == pytest.approx([peak / 3, 2 * peak / 3, peak])  # warm-up: exactly one epoch's 3 steps
    assert max(steps.lrs) == pytest.approx(peak)
    assert all(a >= b for a, b in zip(steps.lrs[2:], steps.lrs[3:]))  # then the cosine decay
    assert res.history[-1]["lr"] == pytest.approx(params.min_lr)  # reached at the budget's last step


def test_grad_accum_steps_at_the_end_of_the_loader():
    steps = Steps()
    params = recipe(epochs=2, warmup_epochs=1, grad_accum=2, scale_lr=False)
    # 80 images, batch 16: 5 batches per epoch, so 3 optimizer steps (2 + 2 + the ragged 1), not 5 // 2
    res = fit(baseline_task(), train_set=Blobs(80), val_set=None, params=params, seed=0,
              accelerator=make_accelerator(grad_accum=2, cpu=True), callbacks=[steps])
    assert (res.steps_per_epoch, res.steps, res.warmup_steps) == (3, 6, 3)
    assert [(s.epoch, s.step) for s in steps.seen] == [(0, 1), (0, 3), (0, 4), (1, 1), (1, 3), (1, 4)]
    assert [h["steps"] for h in res.history] == [3, 6]
    assert res.history[-1]["lr"] == pytest.approx(params.min_lr)


def test_an_accelerator_with_another_grad_accum_is_refused():
    with pytest.raises(ValueError, match=r"accumulates 1 batches per step but params\.grad_accum is 2"):
        fit(baseline_task(), train_set=Blobs(32), val_set=None, params=recipe(grad_accum=2), seed=0,
            accelerator=make_accelerator(cpu=True))


# ------------------------------------------------------------------------------------------ progress and log
def test_one_progress_bar_per_fit_and_epochs_go_to_the_log(monkeypatch, capsys, caplog):
    monkeypatch.setenv("DISTILL_PROGRESS", "1")
    records = []
    with caplog.at_level(logging.INFO, logger="distill.engine"):
        fit(baseline_task(), train_set=Blobs(64), val_set=Blobs(16, seed=1), params=PARAMS, seed=0,
            accelerator=make_accelerator(cpu=True), desc="toyfit", callbacks=[EpochRecords(records)])
    out, err = capsys.readouterr()
    assert out == ""  # no print per epoch
    assert "12/12" in err and "epoch=3/3" in err and "val_acc=" in err
    assert "toyfit 1/3" not in err and err.count("\n") <= 1  # one bar for the whole run, not one per epoch
    logged = [r.getMessage() for r in caplog.records if r.name == "distill.engine"]
    assert [m.split(" train_loss")[0] for m in logged] == [f"[toyfit] epoch {e}/3 steps={4 * e}" for e in (1, 2, 3)]
    assert [r["epoch"] for r in records] == [1, 2, 3] and [r["steps"] for r in records] == [4, 8, 12]


def test_an_epoch_longer_than_the_set_draws_permutation_after_permutation():
    """The step-matched baseline's epoch: ``length`` samples, each image as evenly as possible, seeded per epoch."""
    plain = EpochSampler(10, seed=3)
    plain.set_epoch(2)
    longer = EpochSampler(10, seed=3, length=25)
    longer.set_epoch(2)
    order = list(longer)
    assert len(order) == len(longer) == 25
    assert order[:10] == list(plain)  # the first pass is the plain epoch's order
    counts = torch.bincount(torch.tensor(order), minlength=10)
    assert sorted(set(order[:20])) == list(range(10)) and int(counts.max() - counts.min()) <= 1
    again = EpochSampler(10, seed=3, length=25)
    again.set_epoch(2)
    assert list(again) == order
    again.set_epoch(3)
    assert list(again) != order
