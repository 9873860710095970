"""Resume from the engine's saved training state: corrupt state is an error, deletion is kill-safe, nothing is
unpickled, restored epochs reach the tracker; and seeded model builds (engine level, no stage involved)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from test_engine import Blobs, ToyAugmenter, _deit

from distill.checkpoint import CheckpointError, build_model
from distill.config import TrainParams
from distill.engine import RandomViews, SupervisedTask, fit, make_accelerator
from distill.losses import DistillationLoss


def _fit(state_dir, stop_after=None):
    aug = ToyAugmenter()
    task = SupervisedTask(model=_deit(False), augmenter=aug, criterion=DistillationLoss(mode="none"), views=RandomViews(aug))
    return fit(task, train_set=Blobs(64), val_set=None, params=TrainParams(epochs=3, batch_size=16, warmup_epochs=1),
               seed=7, accelerator=make_accelerator(cpu=True), state_dir=state_dir, stop_after_steps=stop_after)


@pytest.fixture()
def saved_state(tmp_path) -> Path:
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "state", stop_after=6)  # 4 steps per epoch: epoch 1 saved, killed in epoch 2
    (folder,) = (tmp_path / "state").glob("epoch_*")
    return folder


@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.bin", "distill_state.json"])
def test_corrupt_resume_state_is_an_error_not_a_silent_restart(saved_state, damage):
    f = saved_state / damage
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=rf"resume state {re.escape(str(saved_state))} is corrupt or truncated .*rm -r"):
        _fit(saved_state.parent)


def test_state_deletion_killed_midway_is_not_mistaken_for_damage(saved_state, monkeypatch, capsys):
    from distill.engine import _latest_state, discard_state

    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # killed right after the rename
    discard_state(saved_state)
    assert _latest_state(saved_state.parent) == (None, None)
    monkeypatch.undo()
    discard_state(saved_state)  # the next deletion sweeps the leftovers
    assert list(saved_state.parent.iterdir()) == []
    (saved_state.parent / "epoch_00003").mkdir()  # what a killed plain `rm -r` leaves: no metadata
    assert _latest_state(saved_state.parent) == (None, None)
    assert "ignoring incomplete resume state" in capsys.readouterr().err


def test_resume_never_unpickles_code(saved_state, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert _fit(saved_state.parent).resumed_from_epoch == 1
    assert calls and all(w is True for w in calls), calls
    assert not list(saved_state.parent.rglob("*custom_checkpoint*"))


def test_resume_replays_restored_epochs_to_the_tracker(saved_state):
    aug = ToyAugmenter()
    logged = []
    task = SupervisedTask(model=_deit(False), augmenter=aug, criterion=DistillationLoss(mode="none"), views=RandomViews(aug))
    fit(task, train_set=Blobs(64), val_set=None, params=TrainParams(epochs=3, batch_size=16, warmup_epochs=1), seed=7,
        accelerator=make_accelerator(cpu=True), state_dir=saved_state.parent, on_epoch_end=logged.append)
    assert [r["epoch"] for r in logged] == [1, 2, 3]


def test_build_model_seed_fixes_init_and_leaves_global_rng_alone():
    cfg = {"arch": "resnet_small", "num_classes": 3, "in_chans": 1, "width": 4, "blocks": 1}
    torch.manual_seed(1)
    a = build_model("teacher", cfg, seed=5)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    b = build_model("teacher", cfg, seed=5)
    torch.manual_seed(1)
    build_model("teacher", cfg, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
