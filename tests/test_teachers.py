import pytest
import torch

from distill.checkpoint import CheckpointError, load_model, read_metadata, save_model
from distill.teachers import build_teacher, freeze, load_pretrained, load_weights_file


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
    m2, info = load_model(path)
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
        load_model(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.safetensors")


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = {"arch": "resnet_small", "num_classes": 4, "in_chans": 1, "width": 4, "blocks": 1}
    path = tmp_path / "t.safetensors"
    save_model(path, build_teacher(**cfg), kind="teacher", config=cfg)
    before = path.read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_model(path, build_teacher(**cfg), kind="teacher", config=cfg)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temp file left behind


def test_pretrained_weights_only_and_head_mismatch(tmp_path):
    src = build_teacher("resnet_small", num_classes=10, in_chans=1, width=4, blocks=1)
    f = tmp_path / "w.pt"
    torch.save(src.state_dict(), f)
    dst = build_teacher("resnet_small", num_classes=3, in_chans=1, width=4, blocks=1)
    info = load_pretrained(dst, f)
    assert "fc.weight" in info["skipped"]
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight)
    # a pickled arbitrary object is refused (weights_only=True)
    evil = tmp_path / "evil.pt"
    torch.save({"x": object()}, evil)
    with pytest.raises(ValueError, match="cannot read weights"):
        load_weights_file(evil)
