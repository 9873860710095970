"""Resume from the engine's saved training state (engine level, no stage involved).

Faults come in through fit's callbacks: an interrupt after an exact optimizer step, NaN written into the
weights (a realistic divergence). A resumed run equals an uninterrupted one bit for bit; corrupt state is an
error, deletion is kill-safe, nothing is unpickled, restored epochs reach the tracker, a state made for
another run (another key) is not resumed.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.checkpoint import CheckpointError
from distill.engine import NonFiniteLossError, _latest_state, discard_state, fit
from distill.runtime import make_accelerator
from distill.stages._training import build_seeded
from distill.teachers import build_teacher

from test_engine import Blobs, EpochRecords, Steps, baseline_task, recipe

STEPS_PER_EPOCH = 4  # Blobs(64), batch 16
TOTAL = 3 * STEPS_PER_EPOCH


class InterruptAt:
    """Raise KeyboardInterrupt (a user's Ctrl-C, a crash) once ``step`` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, info) -> None:
        if info.global_step == self.step:
            raise KeyboardInterrupt(f"interrupted after {info.global_step} steps")


class NanAt:
    """Write NaN into the weights once ``step`` optimizer steps are done: the next loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, info) -> None:
        if info.global_step == self.step:
            with torch.no_grad():
                next(info.model.parameters()).fill_(float("nan"))


def _fit(state_dir, callbacks=(), **kwargs):
    return fit(baseline_task(), train_set=Blobs(64), val_set=None, params=recipe(epochs=3, warmup_epochs=1), seed=7,
               accelerator=make_accelerator(cpu=True), state_dir=state_dir, callbacks=callbacks, **kwargs)


@pytest.fixture()
def saved_state(tmp_path) -> Path:
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "state", [InterruptAt(STEPS_PER_EPOCH + 2)])  # epoch 1 saved, interrupted in epoch 2
    (folder,) = (tmp_path / "state").glob("epoch_*")
    return folder


def test_interrupted_then_resumed_equals_uninterrupted(saved_state):
    full, resumed_steps = Steps(), Steps()
    ref = _fit(None, [full])
    resumed = _fit(saved_state.parent, [resumed_steps])
    # a resume happened: from the end of epoch 1, running only the remaining steps
    assert resumed.resumed_from_epoch == 1 and ref.resumed_from_epoch is None
    assert len(full.seen) == TOTAL and len(resumed_steps.seen) == TOTAL - STEPS_PER_EPOCH
    assert [s.global_step for s in resumed_steps.seen] == list(range(STEPS_PER_EPOCH + 1, TOTAL + 1))
    assert resumed.steps == ref.steps == TOTAL
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [s.loss for s in full.seen[STEPS_PER_EPOCH:]] == [s.loss for s in resumed_steps.seen]
    keys = ("epoch", "steps", "train_loss", "train_base_loss", "lr")
    assert [[h[k] for k in keys] for h in ref.history] == [[h[k] for k in keys] for h in resumed.history]


def test_nan_weights_stop_training_and_keep_the_last_good_state(tmp_path):
    state = tmp_path / "state"
    with pytest.raises(NonFiniteLossError, match=rf"loss is nan at epoch 2, step 2; training stopped\. The last good "
                                                 rf"training state \(end of epoch 1\) is kept in "
                                                 rf"{re.escape(str(state / 'epoch_00000'))}"):
        _fit(state, [NanAt(STEPS_PER_EPOCH + 1)])
    (folder,) = state.glob("epoch_*")
    assert folder.name == "epoch_00000"
    assert all(torch.isfinite(w).all() for w in load_file(folder / "model.safetensors").values())
    resumed = _fit(state)  # the rerun resumes from it and finishes
    assert resumed.resumed_from_epoch == 1 and resumed.steps == TOTAL
    assert all(torch.isfinite(w).all() for w in resumed.model.state_dict().values())


@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.bin", "distill_state.json"])
def test_corrupt_resume_state_is_an_error_not_a_silent_restart(saved_state, damage):
    f = saved_state / damage
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    refused = rf"resume state {re.escape(str(saved_state))} is corrupt or truncated .*rm -r"
    with pytest.raises(CheckpointError, match=refused):
        _fit(saved_state.parent)


def test_state_deletion_killed_midway_is_not_mistaken_for_damage(saved_state, monkeypatch, caplog):
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # killed right after the rename
    discard_state(saved_state)
    assert _latest_state(saved_state.parent) == (None, None)
    monkeypatch.undo()
    discard_state(saved_state)  # the next deletion sweeps the leftovers
    assert list(saved_state.parent.iterdir()) == []
    (saved_state.parent / "epoch_00003").mkdir()  # what a killed plain `rm -r` leaves: no metadata
    with caplog.at_level(logging.WARNING, logger="distill.engine"):
        assert _latest_state(saved_state.parent) == (None, None)
    assert "ignoring incomplete resume state" in caplog.text


def test_a_save_leaves_one_state_and_no_staging(saved_state):
    assert sorted(p.name for p in saved_state.parent.iterdir()) == ["epoch_00000"]
    assert _fit(saved_state.parent).resumed_from_epoch == 1
    assert sorted(p.name for p in saved_state.parent.iterdir()) == ["epoch_00002"]


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
    logged = []
    _fit(saved_state.parent, [EpochRecords(logged)])
    assert [r["epoch"] for r in logged] == [1, 2, 3]
    assert [r["steps"] for r in logged] == [4, 8, 12]


def test_a_seeded_build_fixes_init_and_leaves_global_rng_alone():
    def build():
        return build_teacher("resnet_small", num_classes=3, in_chans=1, width=4, blocks=1)

    torch.manual_seed(1)
    a = build_seeded(build, seed=5)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    b = build_seeded(build, seed=5)
    torch.manual_seed(1)
    build_seeded(build, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
