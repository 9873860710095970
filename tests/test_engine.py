"""A few real training steps through the one engine, for each task kind."""

import pytest
import torch
from torch.utils.data import Dataset

from distill.config import TrainParams
from distill.engine import (EpochSampler, NonFiniteLossError, OnlineTeacher, RandomViews, StepContext,
                            SupervisedTask, fit, make_accelerator, warmup_cosine)
from distill.losses import DistillationLoss
from distill.models.deit import build_deit
from distill.teachers import build_teacher


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


PARAMS = TrainParams(epochs=3, batch_size=16, lr=3e-3, warmup_epochs=1, weight_decay=0.0, label_smoothing=0.0)


def _deit(distilled=True):
    return build_deit("deit_nano", num_classes=4, in_chans=1, img_size=16, drop_path_rate=0.0, distilled=distilled)


def _teacher():
    return build_teacher("resnet_small", num_classes=4, in_chans=1, width=4, blocks=1)


@pytest.mark.parametrize("kind", ["teacher", "baseline", "hard", "soft"])
def test_fit_lowers_loss_for_each_task(kind):
    torch.manual_seed(0)
    aug = ToyAugmenter()
    if kind == "teacher":
        task = SupervisedTask(model=_teacher(), augmenter=aug, criterion=DistillationLoss(mode="none"), views=RandomViews(aug))
    elif kind == "baseline":
        task = SupervisedTask(model=_deit(False), augmenter=aug, criterion=DistillationLoss(mode="none"), views=RandomViews(aug))
    else:
        teacher = _teacher()
        task = SupervisedTask(model=_deit(True), augmenter=aug, criterion=DistillationLoss(mode=kind, tau=2.0),
                              views=OnlineTeacher(teacher, aug))
    res = fit(task, train_set=Blobs(), val_set=Blobs(32, seed=1), params=PARAMS, seed=0, accelerator=make_accelerator(cpu=True))
    losses = [h["train_loss"] for h in res.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert 0.0 <= res.history[-1]["val_acc"] <= 1.0


def test_teacher_stays_frozen_in_eval_mode():
    aug = ToyAugmenter()
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = SupervisedTask(model=_deit(True), augmenter=aug, criterion=DistillationLoss(mode="hard"), views=OnlineTeacher(teacher, aug))
    fit(task, train_set=Blobs(48), val_set=None, params=TrainParams(epochs=1, batch_size=16, warmup_epochs=0), seed=0,
        accelerator=make_accelerator(cpu=True))
    assert not teacher.training
    # BatchNorm running stats would move if the teacher had been in train mode
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_nan_loss_stops_with_epoch_and_step():
    aug = ToyAugmenter()
    model = _deit(False)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    task = SupervisedTask(model=model, augmenter=aug, criterion=DistillationLoss(mode="none"), views=RandomViews(aug))
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1"):
        fit(task, train_set=Blobs(32), val_set=None, params=TrainParams(epochs=1, batch_size=16, warmup_epochs=0), seed=0,
            accelerator=make_accelerator(cpu=True))


def _run(state_dir, stop_after=None):
    torch.manual_seed(123)
    aug = ToyAugmenter()
    task = SupervisedTask(model=_deit(False), augmenter=aug, criterion=DistillationLoss(mode="none"), views=RandomViews(aug))
    return fit(task, train_set=Blobs(64), val_set=None, params=PARAMS, seed=7, accelerator=make_accelerator(cpu=True),
               state_dir=state_dir, stop_after_steps=stop_after)


def test_resume_from_saved_state_matches_uninterrupted(tmp_path):
    ref = _run(None)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "state", stop_after=6)  # 4 steps/epoch: dies in epoch 2, state of epoch 1 saved
    assert any(p.name.startswith("epoch_") for p in (tmp_path / "state").iterdir())
    resumed = _run(tmp_path / "state")
    assert resumed.resumed_from_epoch == 1
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["train_loss"] for h in ref.history] == [h["train_loss"] for h in resumed.history]


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
    kw = dict(warmup_steps=10, total_steps=110, min_ratio=0.01)
    assert warmup_cosine(0, **kw) == pytest.approx(0.1)
    assert warmup_cosine(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine(60, **kw) == pytest.approx(0.505, abs=1e-3)
    assert warmup_cosine(110, **kw) == pytest.approx(0.01)


def test_online_teacher_with_mixup_labels_the_mixed_image():
    from distill.data import AugmentSpec, Augmenter

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
