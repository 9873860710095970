"""distill/export.py: the student as ONNX and int8 ONNX, parity with PyTorch, bad input, timing, the CPU's flags.

A tiny distilled DeiT (deit_nano at 16 px, 1 channel, random weights) is exported once for the module; the tests
check the exported files with a real onnxruntime against the PyTorch student as the pyfunc model computes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from distill import export as X
from distill.augment import Augmenter, AugmentSpec
from distill.checkpoint import save_model
from distill.models.deit import build_deit
from distill.serving import probabilities

SIZE, CHANNELS, CLASSES = 16, 1, 10
MEAN, STD = [0.3], [0.35]


def write_checkpoint(path: Path, *, img_size: int = SIZE, image_size: int = SIZE, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_deit("deit_nano", img_size=img_size, in_chans=CHANNELS, num_classes=CLASSES, drop_path_rate=0.0)
    extra = {"image_size": image_size, "mean": MEAN, "std": STD, "num_classes": CLASSES,
             "class_names": [str(i) for i in range(CLASSES)], "data_fingerprint": "f" * 8}
    save_model(path, model, kind="deit", config=model.config.to_dict(), extra=extra)
    return path


def images(n: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, CHANNELS), dtype=np.uint8)


def pytorch_probs(student: X.DeployedStudent, x: np.ndarray) -> np.ndarray:
    """What the served pyfunc model computes (distill.serving.probabilities)."""
    aug = Augmenter(spec=AugmentSpec(), out_size=SIZE, mean=MEAN, std=STD)
    return probabilities(student.model, x, channels=CHANNELS, num_classes=CLASSES, augmenter=aug)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("export")
    student, meta = X.deployable(write_checkpoint(root / "student.safetensors"))
    fp32, int8 = root / "student.onnx", root / "student.int8.onnx"
    X.export_onnx(student, fp32, image_size=SIZE, channels=CHANNELS, opset=18)
    X.quantize_int8(fp32, int8)
    return {"student": student, "meta": meta, "fp32": fp32, "int8": int8}


def test_the_graph_takes_uint8_images_with_a_dynamic_batch_and_gives_probabilities(exported):
    model = onnx.load(str(exported["fp32"]))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    (inp,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert isinstance(dims[0], str) and dims[1:] == [SIZE, SIZE, CHANNELS]  # batch dynamic, the size fixed
    sess = X.session(exported["fp32"])
    for n in (1, 5, 300):
        out = sess.run(None, {"images": images(n)})[0]
        assert out.shape == (n, CLASSES) and out.dtype == np.float32
        np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-5)


def test_fp32_onnx_matches_the_served_pytorch_student_image_for_image(exported):
    x = images(300)
    ref = pytorch_probs(exported["student"], x)
    found = X.compare(ref, X.onnx_probabilities(X.session(exported["fp32"]), x, batch_size=128))
    assert found["top1_disagreements"] == 0 and found["top1_agreement"] == 1.0
    assert found["max_abs_prob_diff"] < 1e-5
    X.check_parity(found, tolerance=1e-4, what="the export")  # does not raise
    # the two heads' mean, not one head: the class head alone gives other probabilities
    with torch.inference_mode():
        cls_only = torch.softmax(exported["student"].model.forward_heads(
            (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - MEAN[0]) / STD[0])[0], -1).numpy()
    assert np.abs(cls_only - ref).max() > 1e-3


def test_int8_quantises_the_matmul_weights_and_stays_close_to_fp32(exported):
    model = onnx.load(str(exported["int8"]))
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops and "ConvInteger" not in ops
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 4 * 3  # qkv, proj, fc1, fc2 of each of deit_nano's 3 blocks
    assert exported["int8"].stat().st_size < 0.6 * exported["fp32"].stat().st_size
    x = images(300)
    fp32 = X.onnx_probabilities(X.session(exported["fp32"]), x)
    int8 = X.onnx_probabilities(X.session(exported["int8"]), x)
    found = X.compare(fp32, int8)
    assert 0 < found["max_abs_prob_diff"] < 0.05  # quantised (not identical), and close
    with pytest.raises(X.ParityError):  # int8 is not fp32: it would fail the fp32 parity bound
        X.check_parity({**found, "top1_disagreements": 0}, tolerance=1e-6, what="int8")


def perturbed(src: Path, dst: Path, bump: float = 0.5) -> Path:
    """The ONNX file with class 3's weights of the class head perturbed: an export that computes something else.

    (A constant added to the row would change nothing: the LayerNorm'd token it multiplies sums to zero.)"""
    model = onnx.load(str(src))
    (head,) = [t for t in model.graph.initializer if t.name.endswith("head.weight")]
    arr = numpy_helper.to_array(head).copy()
    arr[3] += bump * np.random.default_rng(0).standard_normal(arr.shape[1]).astype(arr.dtype)
    head.CopyFrom(numpy_helper.from_array(arr, head.name))
    onnx.save(model, str(dst))
    return dst


def test_a_perturbed_export_fails_parity_naming_the_largest_difference(exported, tmp_path):
    x = images(100)
    ref = pytorch_probs(exported["student"], x)
    bad = X.onnx_probabilities(X.session(perturbed(exported["fp32"], tmp_path / "bad.onnx")), x)
    found = X.compare(ref, bad)
    with pytest.raises(X.ParityError) as err:
        X.check_parity(found, tolerance=1e-4, what="the ONNX export")
    msg = str(err.value)
    worst = np.abs(ref.astype(np.float64) - bad).max()
    assert f"{worst:.3g}" in msg and f"test image {found['worst_image']}, class {found['worst_class']}" in msg
    assert f"PyTorch {ref[found['worst_image'], found['worst_class']]:.6f}" in msg and "allowed 0.0001" in msg


def test_wrong_input_is_refused_naming_the_expected_shape(exported):
    sess = X.session(exported["fp32"])
    expected = f"uint8 (N, {SIZE}, {SIZE}, {CHANNELS})"
    cases = {
        "float": images(2).astype(np.float32),
        "small": np.zeros((2, 8, 8, CHANNELS), np.uint8),
        "rgb": np.zeros((2, SIZE, SIZE, 3), np.uint8),
        "channels first": np.zeros((2, CHANNELS, SIZE, SIZE), np.uint8),
        "no batch": np.zeros((SIZE, SIZE, CHANNELS), np.uint8),
    }
    for name, bad in cases.items():
        with pytest.raises(ValueError) as err:
            X.onnx_probabilities(sess, bad)
        assert expected in str(err.value), name
    with pytest.raises(ValueError, match="channels first"):
        X.check_images(cases["channels first"], image_size=SIZE, channels=CHANNELS)
    with pytest.raises(ValueError, match="resize to 16x16 first"):
        X.check_images(cases["small"], image_size=SIZE, channels=CHANNELS)
    # A plain onnxruntime session refuses them too, naming the expected dimension or type.
    with pytest.raises(Exception, match=f"Expected: {SIZE}"):
        sess.run(None, {"images": cases["small"]})
    with pytest.raises(Exception, match=r"expected: \(tensor\(uint8\)\)"):
        sess.run(None, {"images": cases["float"]})


def test_a_student_built_for_another_size_than_it_serves_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "s.safetensors", img_size=32, image_size=SIZE)
    with pytest.raises(X.ExportError, match="takes 32x32 images .* but its checkpoint serves 16x16"):
        X.deployable(path)


class _WithSvd(torch.nn.Module):
    """A classifier whose forward uses an operator ONNX has no conversion for (an SVD)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(SIZE, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.linalg.svdvals(x[:, 0]))


def test_an_operator_onnx_lacks_is_named(tmp_path):
    student = X.DeployedStudent(_WithSvd(), mean=MEAN, std=STD)
    with pytest.raises(X.ExportError, match=r"operator aten\._linalg_svd has no ONNX conversion"):
        X.export_onnx(student, tmp_path / "svd.onnx", image_size=SIZE, channels=CHANNELS, opset=18)
    assert not (tmp_path / "svd.onnx").exists() or (tmp_path / "svd.onnx").stat().st_size == 0


def test_a_student_that_does_not_run_at_the_size_is_refused_naming_it(exported, tmp_path):
    with pytest.raises(X.ExportError, match=r"does not run on uint8 images of shape \(N, 8, 8, 1\).*16x16"):
        X.export_onnx(exported["student"], tmp_path / "x.onnx", image_size=8, channels=CHANNELS, opset=18)


def test_latency_times_the_three_runtimes_in_interleaved_rounds_at_the_stated_threads(exported):
    files = {"onnxruntime_fp32": exported["fp32"], "onnxruntime_int8": exported["int8"]}
    out = X.latency(exported["student"], files, batch_size=8, iters=2, rounds=2, threads=1)
    assert out["threads"] == 1 and "1 threads on every side" in out["method"]
    assert "2 interleaved rounds" in out["method"]
    for side in ("pytorch_fp32", "onnxruntime_fp32", "onnxruntime_int8"):
        row = out[side]
        assert row["images_per_sec_min"] <= row["images_per_sec"] <= row["images_per_sec_max"]
        assert row["latency_ms_batch1"] > 0
    assert set(out["onnxruntime_int8"]) >= {"speedup_vs_pytorch_fp32", "batch1_speedup_vs_pytorch_fp32",
                                            "speedup_vs_onnxruntime_fp32", "batch1_speedup_vs_onnxruntime_fp32"}
    assert "speedup_vs_onnxruntime_int8" not in out["onnxruntime_fp32"]
    assert torch.get_num_threads() >= 1  # restored (whatever it was)


def test_cpu_info_reads_the_int8_flags(tmp_path):
    info = X.cpu_info()
    assert info["name"]
    if Path("/proc/cpuinfo").is_file():
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
        assert info["vnni"] == bool(flags & {"avx512_vnni", "avx_vnni"}) and info["amx"] == ("amx_int8" in flags)
        assert set(info["flags"]) == flags & set(X.INT8_FLAGS)


def test_the_mlflow_spec_names_the_cpu_provider_and_the_fixed_signature(exported):
    spec = X.mlflow_onnx_spec(exported["fp32"], exported["meta"], precision="fp32", opset=18)
    assert spec["onnx_execution_providers"] == ["CPUExecutionProvider"]
    (inp,), (out,) = spec["signature"].inputs.inputs, spec["signature"].outputs.inputs
    assert (inp.name, inp.type, inp.shape) == ("images", np.dtype(np.uint8), (-1, SIZE, SIZE, CHANNELS))
    assert (out.name, out.type, out.shape) == ("probabilities", np.dtype(np.float32), (-1, CLASSES))
    assert spec["input_example"].shape == (2, SIZE, SIZE, CHANNELS) and spec["metadata"]["precision"] == "fp32"
    assert "no resize" in spec["metadata"]["preprocessing"]
    assert ort.get_available_providers()  # the provider exists in this onnxruntime
