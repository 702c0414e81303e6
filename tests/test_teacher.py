"""Teachers: the bundled weights, checkpoints, the fully convolutional conversion and its refusals."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from conftest import CAT_CLASSES, COFFEE_CLASS
from PIL import Image

from trt_relabel.errors import UsageError
from trt_relabel.images import resize_whole
from trt_relabel.teacher import (
    TeacherError,
    bundled_lite0_path,
    create_teacher,
    get_teacher_config,
    load_checkpoint,
    map_lite0_state_dict,
    to_fully_convolutional,
    weights_hash,
)


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return create_teacher(get_teacher_config("efficientnet_lite0"))


def test_bundled_keys_map_one_to_one_onto_timm():
    source = torch.load(bundled_lite0_path(), map_location="cpu", weights_only=True)
    mapped = map_lite0_state_dict(source)
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert len(source) == len(mapped) == len(target) == 296
    assert set(mapped) == set(target)
    assert all(mapped[k].shape == target[k].shape for k in target)


@pytest.mark.parametrize(
    ("teacher", "size"),
    [("efficientnet_lite0", 224), ("timm:resnet18", 160), ("timm:regnetx_002", 192), ("timm:efficientnet_b0", 224)],
)
def test_label_map_mean_equals_logits(teacher, size):
    config = get_teacher_config(teacher, size)
    model = create_teacher(config, pretrained=teacher == "efficientnet_lite0")
    fcn = to_fully_convolutional(model, size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        label_map = fcn(x)
        logits = model(x)
    assert label_map.shape == (2, 1000, *fcn.map_size)
    assert torch.allclose(label_map.mean(dim=(2, 3)), logits, rtol=0, atol=1e-4 * logits.abs().max().item())


@pytest.mark.parametrize(
    ("architecture", "cause"),
    [("convnext_atto", "not linear after global average pooling"), ("vit_tiny_patch16_224", "token")],
)
def test_non_linear_heads_are_refused(architecture, cause):
    model = timm.create_model(architecture, pretrained=False).eval()
    with pytest.raises(TeacherError, match=cause) as error:
        to_fully_convolutional(model, 224)
    assert type(model).__name__ in str(error.value)


def test_head_with_conv_after_pool_is_refused():
    model = timm.create_model("mobilenetv3_small_100", pretrained=False).eval()
    with pytest.raises(TeacherError, match="MobileNetV3"):
        to_fully_convolutional(model, 224)


def pooled_top1(lite0: torch.nn.Module, photo: np.ndarray) -> int:
    config = get_teacher_config("efficientnet_lite0")
    fcn = to_fully_convolutional(lite0, config.input_size)
    pixels = resize_whole(Image.fromarray(photo), config.input_size, config.interpolation)
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        label_map = fcn(x)
    assert label_map.shape[2:] == (15, 15)
    return int(label_map.mean(dim=(2, 3)).argmax())


def test_bundled_teacher_on_real_photos(lite0, photos):
    assert pooled_top1(lite0, photos["coffee"]) == COFFEE_CLASS
    assert pooled_top1(lite0, photos["chelsea"]) in CAT_CLASSES


def test_checkpoints_safetensors_and_torch_round_trip(lite0, tmp_path):
    from safetensors.torch import save_file

    save_file(lite0.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in lite0.state_dict().items()}}, tmp_path / "w.pth")
    config = get_teacher_config("efficientnet_lite0")
    expected = weights_hash(lite0)
    for name in ("w.safetensors", "w.pth"):
        assert weights_hash(create_teacher(config, tmp_path / name)) == expected


class NotATensor:
    pass


@pytest.mark.parametrize(
    ("content", "cause"), [(b"\x00garbage" * 10, "cannot read checkpoint"), (None, "cannot read checkpoint")]
)
def test_bad_checkpoints_are_one_line_errors(tmp_path, content, cause):
    path = tmp_path / "bad.pth"
    if content is None:
        torch.save({"x": NotATensor()}, path)  # arbitrary objects are refused by weights_only=True
    else:
        path.write_bytes(content)
    with pytest.raises(TeacherError, match=cause) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(TeacherError, match="weights do not fit"):
        create_teacher(get_teacher_config("efficientnet_lite0"), tmp_path / "resnet.pth")


@pytest.mark.parametrize(
    ("env", "cause"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "(HF_HUB_OFFLINE is set)"),
        ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "(127.0.0.1 cannot be reached: "),
    ],
)
def test_hub_weights_offline_fail_at_once_saying_how_to_pass_a_file(tmp_path, env, cause):
    """Offline or with the hub out of reach (HF_* variables are read when huggingface_hub is
    imported: a fresh process), a teacher whose weights live on the hub only fails with one whole
    line that says how to pass a local file, without huggingface_hub's minute of retries."""
    command = [sys.executable, "-m", "trt_relabel", "build-engine", "--teacher", "timm:test_resnet.r160_in1k",
               "--engines-dir", str(tmp_path / "engines")]  # fmt: skip
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HTTPS_PROXY": "", "https_proxy": "", **env}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 1
    assert result.stderr.startswith("error: timm:test_resnet.r160_in1k: cannot fetch the weights of ")
    assert cause in result.stderr and "Retrying" not in result.stderr and result.stderr.count("\n") == 1
    assert result.stderr.endswith("pass --checkpoint PATH (a .safetensors or .pth state dict)\n")
    assert not (tmp_path / "engines").exists()


def test_hub_weights_in_the_local_cache_load_offline(tmp_path, monkeypatch):
    """Weights in the Hugging Face cache load without the hub (read from the cached file)."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    architecture = "test_resnet.r160_in1k"
    weights = timm.create_model(architecture, pretrained=False).state_dict()
    snapshot = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(weights, snapshot / "model.safetensors")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = create_teacher(get_teacher_config(f"timm:{architecture}"))
    for name, tensor in weights.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_registry_configs():
    l2 = get_teacher_config("efficientnet_l2_ns_475")
    assert (l2.architecture, l2.input_size, l2.interpolation) == ("tf_efficientnet_l2.ns_jft_in1k_475", 475, "bicubic")
    assert get_teacher_config("efficientnet_lite0", 320).input_size == 320
    assert get_teacher_config("timm:resnet50").mean == pytest.approx((0.485, 0.456, 0.406))
    with pytest.raises(UsageError, match="unknown teacher 'nope'; known: "):
        get_teacher_config("nope")
    with pytest.raises(UsageError, match="did you mean 'efficientnet_lite0'"):
        get_teacher_config("efficientnet_lite")
    with pytest.raises(UsageError, match="no model named"):
        get_teacher_config("timm:nope_net")
