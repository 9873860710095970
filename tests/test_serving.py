"""The servable student (distill.serving) with real MLflow: raw uint8 images in, the pipeline's probabilities out.

The slow test serves a registered champion with ``mlflow models serve --env-manager local`` and asks it over HTTP.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from PIL import Image

from distill.augment import Augmenter, AugmentSpec
from distill.checkpoint import CheckpointError, save_model
from distill.models.deit import DeiT, load_deit
from distill.models.deit_config import DeiTConfig
from distill.prepare import decode_image
from distill.registry import Score, log_and_register_student
from distill.serving import StudentClassifier, save_servable, servable_checkpoint
from distill.stages._training import build_seeded
from distill.tracking import MlflowTracker

from helpers import background_server, free_port

SIZE, CLASSES = 16, 5
CLASS_NAMES = ["ant", "bee", "cat", "dog", "eel"]
MEANS = {1: [0.3], 3: [0.5, 0.4, 0.3]}
STDS = {1: [0.25], 3: [0.2, 0.25, 0.3]}


def small_deit(channels: int = 3, seed: int = 0) -> DeiT:
    """A small random distilled DeiT (two heads, made distinct so that averaging them shows)."""
    config = {"img_size": SIZE, "patch_size": 4, "in_chans": channels, "num_classes": CLASSES, "embed_dim": 32,
              "depth": 2, "num_heads": 2, "drop_path_rate": 0.0}
    model = build_seeded(lambda: DeiT(DeiTConfig.from_dict(config)), seed=seed)
    with torch.no_grad():
        model.head_dist.weight.mul_(-2.0)
    return model


def student_checkpoint(path: Path, *, channels: int = 3, seed: int = 0) -> Path:
    """A small DeiT saved as the student stage saves it (kind, config, the data's normalisation and classes)."""
    model = small_deit(channels, seed)
    extra = {"stage": "student", "image_size": SIZE, "mean": MEANS[channels], "std": STDS[channels],
             "num_classes": CLASSES, "class_names": CLASS_NAMES, "data_fingerprint": "fp-test"}
    save_model(path, model, kind="deit", config=model.config.to_dict(), extra=extra)
    return path


def raw_images(n: int, height: int = SIZE, width: int = SIZE, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, channels), dtype=np.uint8)


def evaluation_probs(checkpoint: Path, images: np.ndarray) -> np.ndarray:
    """What the evaluate stage computes for prepared images: Augmenter's eval view, both heads averaged, softmax."""
    model, info = load_deit(checkpoint)
    extra = info["extra"]
    augmenter = Augmenter(spec=AugmentSpec(), out_size=extra["image_size"], mean=extra["mean"], std=extra["std"])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # the DataLoader's uint8 (N, C, H, W)
    with torch.no_grad():
        cls, dist = model.forward_heads(augmenter(x, augmenter.eval_params(len(x))))
    return torch.softmax((cls + dist) / 2, dim=-1).numpy()


@pytest.fixture(scope="module")
def rgb(tmp_path_factory) -> tuple[Path, Path]:
    """An RGB student's checkpoint and its saved servable folder."""
    root = tmp_path_factory.mktemp("rgb")
    checkpoint = student_checkpoint(root / "student.safetensors")
    return checkpoint, save_servable(checkpoint, root / "models" / "student_mlflow")


@pytest.fixture(scope="module")
def rgb_model(rgb):
    return mlflow.pyfunc.load_model(str(rgb[1]))


def test_predicts_the_pipelines_probabilities(rgb, rgb_model) -> None:
    checkpoint, _ = rgb
    images = raw_images(6)
    probs = rgb_model.predict(images)
    assert probs.dtype == np.float32 and probs.shape == (6, CLASSES)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(probs, evaluation_probs(checkpoint, images))  # bit-exact: same code, same bits
    # ... and that is the DeiT's own softmax on the normalised images, written out here.
    model, _ = load_deit(checkpoint)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEANS[3]).view(1, 3, 1, 1)) / torch.tensor(STDS[3]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=-1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)
    # model_config: chunks of 4 images give the same rows.
    chunked = mlflow.pyfunc.load_model(str(rgb[1]), model_config={"batch_size": 4})
    assert chunked.unwrap_python_model().batch_size == 4
    np.testing.assert_allclose(chunked.predict(images), probs, rtol=0, atol=1e-6)


def test_folder_is_self_describing(rgb) -> None:
    checkpoint, folder = rgb
    model = Model.load(str(folder))
    (inputs,), (outputs,) = model.signature.inputs.inputs, model.signature.outputs.inputs
    assert (inputs.type, inputs.shape) == (np.dtype(np.uint8), (-1, -1, -1, 3))
    assert (outputs.type, outputs.shape) == (np.dtype(np.float32), (-1, CLASSES))
    example = model.load_input_example(str(folder))
    assert example.dtype == np.uint8 and example.shape[1:] == (SIZE, SIZE, 3)
    assert model.metadata["class_names"] == CLASS_NAMES and model.metadata["image_size"] == SIZE
    assert model.metadata["mean"] == MEANS[3] and model.metadata["data_fingerprint"] == "fp-test"
    assert servable_checkpoint(folder).read_bytes() == checkpoint.read_bytes()
    assert (folder / "code" / "distill" / "serving.py").is_file()  # self-contained: the library travels with it
    requirements = (folder / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in requirements) and any(r.startswith("mlflow==") for r in requirements)


def test_other_sizes_are_resized_like_the_data_stage(rgb, rgb_model, tmp_path) -> None:
    """A raw image of another size gives what its file gives after the data stage's decode (resize + crop)."""
    checkpoint, _ = rgb
    wide, tall = raw_images(1, 23, 41, seed=1)[0], raw_images(1, 37, 12, seed=2)[0]  # shrink; grow
    for image in (wide, tall):
        Image.fromarray(image).save(tmp_path / "image.png")
        stored = decode_image(tmp_path / "image.png", SIZE).permute(1, 2, 0).numpy()[None]  # (1, S, S, 3)
        np.testing.assert_array_equal(rgb_model.predict(image[None]), evaluation_probs(checkpoint, stored))
    # Images of different sizes in one call (a list, or MLflow's ragged form): rows in input order.
    python_model = rgb_model.unwrap_python_model()
    together = python_model.predict(None, [wide, tall, raw_images(1, seed=3)[0]])
    alone = np.concatenate([rgb_model.predict(im[None]) for im in (wide, tall, raw_images(1, seed=3)[0])])
    np.testing.assert_array_equal(together, alone)
    ragged = np.empty(2, dtype=object)
    ragged[:] = [wide, tall]
    np.testing.assert_array_equal(rgb_model.predict(ragged), alone[:2])
    assert python_model.predict(None, np.zeros((0, SIZE, SIZE, 3), np.uint8)).shape == (0, CLASSES)


def test_wrong_dtype_or_channels_is_a_clear_error(rgb_model) -> None:
    images = raw_images(2)
    python_model = rgb_model.unwrap_python_model()
    with pytest.raises(MlflowException, match="dtype of input float32 does not match expected dtype uint8"):
        rgb_model.predict(images.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"expected raw uint8 images .* got dtype float32"):
        python_model.predict(None, images.astype(np.float32))
    with pytest.raises(MlflowException, match=r"does not match expected shape \(-1, -1, -1, 3\)"):
        rgb_model.predict(images[..., :1])
    with pytest.raises(ValueError, match=r"3-channel images \(N, H, W, 3\), channels last; got shape \(2, 16, 16, 1\)"):
        python_model.predict(None, images[..., :1])
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 16, 16\) \(channels first\?"):
        python_model.predict(None, np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with pytest.raises(ValueError, match="integers 0..255"):
        python_model.predict(None, [[[[300, 0, 0]]]])


def test_one_channel_model_refuses_rgb_naming_the_shape_it_expects(tmp_path) -> None:
    """The default model (digits) has one channel: an RGB image, a float or a channels-first batch is refused by
    MLflow's signature check, with the expected shape and dtype in the message."""
    folder = save_servable(student_checkpoint(tmp_path / "gray.safetensors", channels=1), tmp_path / "gray_mlflow")
    model = mlflow.pyfunc.load_model(str(folder))
    with pytest.raises(MlflowException, match=r"Shape of input \(2, 20, 20, 3\) does not match expected shape "
                                              r"\(-1, -1, -1, 1\)"):
        model.predict(raw_images(2, 20, 20, channels=3))
    with pytest.raises(MlflowException, match="dtype of input float32 does not match expected dtype uint8"):
        model.predict(raw_images(2, channels=1).astype(np.float32) / 255)
    with pytest.raises(MlflowException, match=r"Shape of input \(2, 1, 16, 16\) does not match expected shape"):
        model.predict(np.ascontiguousarray(raw_images(2, channels=1).transpose(0, 3, 1, 2)))


def test_request_script_converts_files_to_the_models_channels(tmp_path) -> None:
    """scripts/serving_request.py: a colour file becomes (1, H, W, 1) for a 1-channel model, (1, H, W, 3) for RGB."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from serving_request import request_body

    colour = raw_images(1, 12, 10, seed=4)[0]
    Image.fromarray(colour).save(tmp_path / "colour.png")
    gray = np.asarray(request_body([str(tmp_path / "colour.png")], 1)["inputs"], dtype=np.uint8)
    np.testing.assert_array_equal(gray[0, ..., 0], np.asarray(Image.fromarray(colour).convert("L")))
    rgb = np.asarray(request_body([str(tmp_path / "colour.png")] * 2, 3)["inputs"], dtype=np.uint8)
    assert gray.shape == (1, 12, 10, 1) and rgb.shape == (2, 12, 10, 3)
    np.testing.assert_array_equal(rgb[1], colour)
    Image.fromarray(raw_images(1, 5, 5)[0]).save(tmp_path / "small.png")
    with pytest.raises(SystemExit, match="different sizes"):
        request_body([str(tmp_path / "colour.png"), str(tmp_path / "small.png")], 3)


def test_one_channel_model_takes_nhw_and_nhwc(tmp_path) -> None:
    checkpoint = student_checkpoint(tmp_path / "gray.safetensors", channels=1)
    folder = save_servable(checkpoint, tmp_path / "gray_mlflow")
    model = mlflow.pyfunc.load_model(str(folder))
    images = raw_images(3, channels=1)
    probs = model.predict(images)
    np.testing.assert_array_equal(probs, evaluation_probs(checkpoint, images))
    np.testing.assert_array_equal(model.unwrap_python_model().predict(None, images[..., 0]), probs)  # (N, H, W)
    assert model.predict(raw_images(2, 8, 8, channels=1)).shape == (2, CLASSES)  # 8x8 digits, upscaled


def test_save_is_atomic_and_checks_the_checkpoint(tmp_path) -> None:
    out = tmp_path / "student_mlflow"
    first = student_checkpoint(tmp_path / "a.safetensors", seed=0)
    second = student_checkpoint(tmp_path / "b.safetensors", seed=1)
    save_servable(first, out)
    save_servable(second, out)  # replaces the folder: staging, then a swap; nothing left beside it
    assert servable_checkpoint(out).read_bytes() == second.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "student_mlflow"]
    model, bare = small_deit(), tmp_path / "bare.safetensors"
    save_model(bare, model, kind="deit", config=model.config.to_dict(), extra={"image_size": SIZE})
    with pytest.raises(CheckpointError, match="lacks mean, std, num_classes"):
        save_servable(bare, tmp_path / "bare_mlflow")
    assert not (tmp_path / "bare_mlflow").exists()
    with pytest.raises(CheckpointError, match="not a servable student model folder"):
        servable_checkpoint(tmp_path)


def test_dataframe_of_images(rgb) -> None:
    """StudentClassifier also takes a one-column DataFrame of images (what MLflow may hand a custom caller)."""
    import pandas as pd

    checkpoint, folder = rgb
    python_model = mlflow.pyfunc.load_model(str(folder)).unwrap_python_model()
    assert isinstance(python_model, StudentClassifier)
    images = raw_images(2)
    frame = pd.DataFrame({"image": list(images)})
    np.testing.assert_array_equal(python_model.predict(None, frame), evaluation_probs(checkpoint, images))


@pytest.mark.slow
@pytest.mark.parametrize("channels", [3, 1])  # an RGB model, and one like the default (digits)
def test_mlflow_models_serve_the_registered_champion(tmp_path, base_env, channels) -> None:
    """``mlflow models serve -m models:/<name>@champion --env-manager local``: a request made as the README says
    (``scripts/serving_request.py`` on an image file) answers as ``predict``; a wrong channel count is a 400 that
    names the expected shape."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    checkpoint = student_checkpoint(tmp_path / "student.safetensors", channels=channels)
    folder = save_servable(checkpoint, tmp_path / "student_mlflow")
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("serve-test", artifact_location=(tmp_path / "artifacts").as_uri())
    tracker = MlflowTracker(client.create_run(experiment).info.run_id, uri=uri)
    registered = log_and_register_student(tracker, folder, model_name="served-student",
                                          score=Score(0.9, "fp-test:test", baseline=0.8))
    assert registered["alias"] == "champion"

    image = raw_images(1, 20, 24, seed=5)[0]  # a colour file of another size: the server resizes and crops
    Image.fromarray(image).save(tmp_path / "my_image.png")
    env = {**base_env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    script = Path(__file__).resolve().parents[1] / "scripts" / "serving_request.py"
    made = subprocess.run([sys.executable, str(script), str(tmp_path / "my_image.png"), "--model",
                           "models:/served-student@champion"], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert made.returncode == 0, made.stderr[-3000:]
    body = made.stdout.encode()
    sent = np.asarray(json.loads(body)["inputs"], dtype=np.uint8)
    assert sent.shape == (1, 20, 24, channels)
    expected = mlflow.pyfunc.load_model(str(folder)).predict(sent)
    port = free_port()
    args = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/served-student@champion",
            "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with background_server(args, f"http://127.0.0.1:{port}/ping", env=env, log=tmp_path / "serve.log", timeout=240):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            served = np.asarray(json.loads(resp.read())["predictions"], dtype=np.float32)
        wrong = raw_images(1, 20, 24, channels=4 - channels, seed=5) if channels == 1 else sent[..., :1]
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps({"inputs": wrong.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=120)
        message = err.value.read().decode()
        assert err.value.code == 400 and f"does not match expected shape (-1, -1, -1, {channels})" in message, message
    assert served.shape == (1, CLASSES)
    np.testing.assert_array_equal(served.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)
