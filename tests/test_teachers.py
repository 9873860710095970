"""Unit tests of the teachers (distill/teachers.py): architectures by name, weights trained elsewhere, input adapter."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from distill.checkpoint import CheckpointError, read_metadata, save_model
from distill.models.deit import load_deit
from distill.teachers import InputAdapter, build_teacher, load_teacher, load_teacher_weights
from distill.views import freeze
from distill.weights import load_weights_file

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.mark.parametrize("in_chans, size", [(1, 16), (3, 32)])
def test_resnet_small_shapes(in_chans, size):
    m = build_teacher("resnet_small", num_classes=7, in_chans=in_chans, width=8, blocks=1)
    assert m(torch.randn(3, in_chans, size, size)).shape == (3, 7)


def test_torchvision_teacher_by_name_and_gray_input():
    m = build_teacher("resnet18", num_classes=5, in_chans=1)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_unknown_arch_lists_names():
    with pytest.raises(ValueError, match="resnet_small"):
        build_teacher("resnet_huge", num_classes=3)


def test_freeze_is_eval_and_no_grad():
    m = freeze(build_teacher("resnet_small", num_classes=3, in_chans=1, width=4, blocks=1))
    assert not m.training and all(not p.requires_grad for p in m.parameters())


def test_checkpoint_round_trip_identical_outputs(tmp_path):
    cfg = {"arch": "resnet_small", "num_classes": 4, "in_chans": 1, "width": 8, "blocks": 1}
    m = build_teacher(**cfg).eval()
    path = tmp_path / "t.safetensors"
    save_model(path, m, kind="teacher", config=cfg, extra={"mean": [0.5], "std": [0.2]})
    m2, info = load_teacher(path)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(m(x), m2(x))
    assert info["extra"]["mean"] == [0.5] and read_metadata(path)["kind"] == "teacher"


def test_corrupt_and_missing_checkpoint_named(tmp_path):
    cfg = {"arch": "resnet_small", "num_classes": 4, "in_chans": 1, "width": 4, "blocks": 1}
    path = tmp_path / "t.safetensors"
    save_model(path, build_teacher(**cfg), kind="teacher", config=cfg)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_teacher(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_teacher(tmp_path / "missing.safetensors")


def test_each_kind_loads_with_its_own_loader_only(tmp_path):
    cfg = {"arch": "resnet_small", "num_classes": 4, "in_chans": 1, "width": 4, "blocks": 1}
    path = tmp_path / "t.safetensors"
    save_model(path, build_teacher(**cfg), kind="teacher", config=cfg)
    with pytest.raises(CheckpointError, match=r"holds a 'teacher' model, not a 'deit' one"):
        load_deit(path)


@pytest.mark.parametrize(("module", "absent"), [("distill.teachers", ["distill.models.deit"]),
                                                ("distill.models.deit", ["distill.teachers"]),
                                                ("distill.checkpoint", ["distill.models.deit", "distill.teachers"])])
def test_loading_one_kind_does_not_import_the_other(module, absent):
    """A teacher's loader does not import DeiT, nor the student's the teachers, and the checkpoint format neither
    (what a stage imports is what an edit reruns)."""
    code = f"import sys, {module}; print([m for m in {absent!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = {"arch": "resnet_small", "num_classes": 4, "in_chans": 1, "width": 4, "blocks": 1}
    path = tmp_path / "t.safetensors"
    save_model(path, build_teacher(**cfg), kind="teacher", config=cfg)
    before = path.read_bytes()
    import distill.checkpoint

    def boom(tmp, data):  # the disk fills up halfway through the file
        Path(tmp).write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(distill.checkpoint, "_write_canonical", boom)
    with pytest.raises(OSError):
        save_model(path, build_teacher(**cfg), kind="teacher", config=cfg)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temp file left behind


def _resnet_small(num_classes: int = 10, width: int = 4):
    return build_teacher("resnet_small", num_classes=num_classes, in_chans=1, width=width, blocks=1)


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter and BatchNorm statistic off its init, so that equal outputs prove a full load."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.train()(torch.randn(4, *_input_shape(model)))  # updates the running statistics
    return model.eval()


def _input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return (conv.in_channels, 32, 32)


# --------------------------------------------------------------------------------------------------
# timm teachers
# --------------------------------------------------------------------------------------------------


def test_timm_teacher_by_name_and_gray_input():
    pytest.importorskip("timm")
    m = build_teacher("timm/resnet18", num_classes=5, in_chans=1)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    assert next(iter(m.state_dict())).startswith("model.")  # the _GrayToRGB wrapper, as for torchvision


def test_timm_names_errors(monkeypatch):
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet181' .*; close names: resnet18"):
        build_teacher("timm/resnet181", num_classes=3)
    with pytest.raises(ValueError, match="timm/<name>"):
        build_teacher("resnet181", num_classes=3)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ImportError, match="pip install timm"):
        build_teacher("timm/resnet18", num_classes=3)


@pytest.mark.parametrize("in_chans, data_size, input_size", [(3, 32, None), (1, 32, None), (3, 16, 32)])
def test_timm_teacher_used_as_it_is_sees_what_it_was_trained_on(tmp_path, in_chans, data_size, input_size):
    """Epochs-0 mode: the weights load strictly and, through the InputAdapter, the teacher computes exactly what
    the original timm model computes on the same pixels normalised its own way (and resized to its own size)."""
    timm = pytest.importorskip("timm")
    original = _trained_like(timm.create_model("resnet18", pretrained=False, num_classes=10))
    path = tmp_path / "resnet18.safetensors"
    save_file(original.state_dict(), str(path))
    data_mean, data_std = [0.3, 0.4, 0.5][:in_chans], [0.2, 0.25, 0.3][:in_chans]
    adapter = {"data_mean": data_mean, "data_std": data_std, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
               "size": input_size}
    teacher = build_teacher("timm/resnet18", num_classes=10, in_chans=in_chans, input=adapter)
    report = load_teacher_weights(teacher, path, strict=True)
    assert report["mode"] == "as_is" and report["missing"] == report["skipped"] == []
    freeze(teacher)
    assert isinstance(teacher, InputAdapter) and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())

    pixels = torch.rand(2, in_chans, data_size, data_size)
    as_fed = (pixels - torch.tensor(data_mean).view(1, -1, 1, 1)) / torch.tensor(data_std).view(1, -1, 1, 1)
    seen = pixels.expand(-1, 3, -1, -1)
    if input_size:
        seen = F.interpolate(seen, size=(input_size, input_size), mode="bilinear", antialias=True)
    seen = (seen - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(teacher(as_fed), original(seen), atol=1e-5, rtol=1e-5)


def test_adapter_keeps_checkpoints_clean_and_rebuilds_from_config(tmp_path):
    cfg = {"arch": "resnet_small", "num_classes": 4, "in_chans": 1, "width": 4, "blocks": 1,
           "input": {"data_mean": [0.5], "data_std": [0.2], "mean": [0.1], "std": [0.3], "size": 24}}
    teacher = _trained_like(build_teacher(**cfg))
    inner = teacher.model.state_dict()
    assert list(teacher.state_dict()) == [f"model.{k}" for k in inner]  # the statistics are not weights
    assert teacher.mean.dtype == torch.float32 and teacher.double().mean.dtype == torch.float64  # buffers move
    teacher.float()
    path = tmp_path / "t.safetensors"
    save_model(path, teacher, kind="teacher", config=cfg)
    rebuilt, _ = load_teacher(path)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), teacher(x))
    # our own saved teacher (keys model.*) loads strictly into a freshly built one
    fresh = build_teacher(**cfg)
    assert load_teacher_weights(fresh, path, strict=True)["prefixes_removed"] == ["model."]
    with torch.no_grad():
        assert torch.equal(freeze(fresh)(x), teacher(x))


@pytest.mark.parametrize("kwargs, match", [
    ({"mean": [0.5], "std": None}, "mean and std together"),
    ({"mean": [0.5], "std": [0.0]}, "positive"),
    ({"size": 0}, "positive int"),
])
def test_adapter_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InputAdapter(torch.nn.Identity(), data_mean=[0.5], data_std=[0.2], **kwargs)


def test_adapter_statistics_must_fit_the_data():
    with pytest.raises(ValueError, match="do not fit 1-channel data"):
        build_teacher("resnet_small", num_classes=3, in_chans=1, width=4, blocks=1,
                      input={"data_mean": [0.5, 0.5, 0.5], "data_std": [0.2, 0.2, 0.2], "size": 32})
    with pytest.raises(ValueError, match="data_mean and data_std are required"):
        build_teacher("resnet_small", num_classes=3, in_chans=1, width=4, blocks=1, input={"mean": [0.5]})


# --------------------------------------------------------------------------------------------------
# Weights files: wrappings, strict (used as it is) and fine-tuning modes
# --------------------------------------------------------------------------------------------------


def test_torch_file_with_training_wrappings_loads_strictly(tmp_path):
    src = _trained_like(_resnet_small())
    f = tmp_path / "checkpoint.pth.tar"  # what timm's and DeiT's train.py write: args, epoch, DDP prefix
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=0.1, model="resnet_small"),
                "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, f)
    dst = _resnet_small()
    report = load_teacher_weights(dst, f, strict=True)
    assert report["prefixes_removed"] == ["module."] and report["loaded"] == len(src.state_dict())
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(dst.eval()(x), src(x))


def test_gray_wrapper_prefix_and_model_nesting(tmp_path):
    src = build_teacher("resnet18", num_classes=3, in_chans=1)  # _GrayToRGB: keys model.*
    f = tmp_path / "w.pt"
    torch.save({"model": src.state_dict()}, f)
    into_plain = build_teacher("resnet18", num_classes=3)  # a 3-channel one: keys without the prefix
    assert load_teacher_weights(into_plain, f, strict=True)["prefixes_removed"] == ["model."]
    assert torch.equal(into_plain.conv1.weight, src.model.conv1.weight)


@pytest.mark.parametrize("saved, built, expected", [
    ({"num_classes": 10}, {"num_classes": 3}, ["fc.weight: file [10, 16] vs model [3, 16]", "fc.bias",
                                               "has 10 outputs but the data has 3 classes",
                                               "teacher.train.epochs >= 1"]),
    ({"width": 8}, {"width": 4}, ["stem.0.weight: file [8, 1, 3, 3] vs model [4, 1, 3, 3]", "another architecture"]),
])
def test_strict_mode_names_file_keys_shapes_and_what_to_do(tmp_path, saved, built, expected):
    f = tmp_path / "w.safetensors"
    save_file(_resnet_small(**saved).state_dict(), str(f))
    with pytest.raises(ValueError) as err:
        load_teacher_weights(_resnet_small(**built), f, strict=True)
    for text in [str(f), *expected]:
        assert text in str(err.value)


def test_fine_tune_mode_reinitialises_the_head(tmp_path):
    src = _trained_like(_resnet_small(num_classes=10))
    f = tmp_path / "w.pt"
    torch.save(src.state_dict(), f)
    dst = _resnet_small(num_classes=3)
    head_before = dst.fc.weight.detach().clone()
    info = load_teacher_weights(dst, f, strict=False)
    assert info["mode"] == "fine_tune"
    assert info["skipped"] == ["fc.bias", "fc.weight"] and info["missing"] == info["reinitialised"] == ["fc.weight",
                                                                                                   "fc.bias"]
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight)
    assert torch.equal(dst.fc.weight, head_before)  # the fresh model's initialisation
    with pytest.raises(ValueError, match="none of its tensors fit"):
        load_teacher_weights(build_teacher("resnet18", num_classes=3), f, strict=False)


def test_unpickling_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"x": object()}, evil)
    with pytest.raises(ValueError, match="cannot read weights"):
        load_weights_file(evil)
    not_weights = tmp_path / "opt.pt"
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 2}, not_weights)
    with pytest.raises(ValueError, match="does not hold a state dict of tensors.*optimizer"):
        load_weights_file(not_weights)
