"""The training settings: TrainConfig, read from a TOML recipe and command-line options (load_config)."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from trt_relabel.errors import RelabelError, UsageError

LABEL_MODES = ("relabel", "original", "smooth", "relabel+original")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    """Everything a run depends on (a TOML recipe holds any of these keys). Defaults: the paper's
    ResNet-50 ReLabel recipe.

    `batch_size` is the global batch (split over the torchrun processes) and `lr` the peak learning
    rate for it; `warmup_epochs` may be fractional. `smoothing` is used by label_mode "smooth".
    `cutmix` is the probability of CutMix per batch, `cutmix_beta` its Beta parameter.
    `local_labels` = S > 0 adds the per-cell loss on S x S cells, weighted by `local_weight`.
    `target_temperature` T: relabel targets are the softmax of the pooled logits / T (1: the
    official targets). `class_map`: TSV mapping class folders to teacher classes
    (trt_relabel.classes.read_class_map).
    `crop_scale` is RandomResizedCrop's range of area fractions; `crop_pct` the validation centre
    crop's share of the resized short side. `workers` are loader processes per training process.
    `amp` (CUDA only) uses `amp_dtype` "bfloat16" or "float16" (with a GradScaler).
    """

    data: Path | None = None
    out: Path | None = None
    labels: Path | None = None
    model: str = "resnet50"
    epochs: int = 300
    batch_size: int = 1024
    image_size: int = 224
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 5.0
    label_mode: str = "relabel"
    smoothing: float = 0.1
    cutmix: float = 0.0
    cutmix_beta: float = 1.0
    local_labels: int = 0
    local_weight: float = 1.0
    target_temperature: float = 1.0
    class_map: Path | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    color_jitter: float = 0.4
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    val: Path | None = None
    real_labels: Path | None = None
    workers: int = 8
    amp: bool = True
    amp_dtype: str = "bfloat16"
    compile: bool = False
    channels_last: bool = False
    seed: int = 0
    resume: bool = False

    def to_dict(self) -> dict:
        """JSON- and torch.load(weights_only=True)-safe: paths as str, tuples as lists."""
        return {
            k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
            for k, v in asdict(self).items()
        }

    def validate(self) -> None:
        """Raise UsageError (one line) for missing or out-of-range settings."""
        problems = [
            (self.data is None, "--data DIR is required"),
            (self.out is None, "--out RUN_DIR is required"),
            (self.label_mode not in LABEL_MODES, f"label_mode must be one of {', '.join(LABEL_MODES)}"),
            (self.labels is None and "relabel" in self.label_mode, f"label_mode {self.label_mode} needs --labels"),
            (self.epochs < 1 or self.batch_size < 1, "epochs and batch_size must be >= 1"),
            (self.image_size < 8, "image_size must be >= 8"),
            (
                self.lr <= 0 or self.warmup_epochs < 0 or self.weight_decay < 0,
                "lr must be > 0, warmup_epochs and weight_decay >= 0",
            ),
            (not 0 <= self.cutmix <= 1 or self.cutmix_beta <= 0, "cutmix must be a probability, cutmix_beta > 0"),
            (self.local_labels < 0 or self.local_weight < 0, "local_labels and local_weight must be >= 0"),
            (not self.target_temperature > 0, "target_temperature must be > 0"),
            (self.class_map is not None and "relabel" not in self.label_mode, "class_map needs a relabel label_mode"),
            (self.local_labels > 0 and "relabel" not in self.label_mode, "local_labels needs a relabel label_mode"),
            (not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale must be 0 < min <= max <= 1"),
            (self.real_labels is not None and self.val is None, "--real-labels needs --val"),
            (self.amp_dtype not in AMP_DTYPES, f"amp_dtype must be one of {', '.join(AMP_DTYPES)}"),
            (
                not 0 <= self.smoothing < 1 or not 0 < self.crop_pct <= 1,
                "smoothing must lie in [0, 1), crop_pct in (0, 1]",
            ),
            (self.workers < 0, "workers must be >= 0"),
        ]
        for failed, message in problems:
            if failed:
                raise UsageError(f"train config: {message}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _coerce(name: str, kind: str, value: object, source: str) -> object:
    """A config value checked against its field's annotation (a string: `from __future__`)."""
    if value is None and kind.endswith("| None"):
        return None
    base = kind.removesuffix(" | None")
    if base == "Path" and isinstance(value, str | Path):
        return Path(value)
    if base == "float" and _is_number(value):
        return float(value)
    if base == "int" and _is_number(value) and isinstance(value, int):
        return value
    if (base == "bool" and isinstance(value, bool)) or (base == "str" and isinstance(value, str)):
        return value
    pair = isinstance(value, list | tuple) and len(value) == 2
    if base == "tuple[float, float]" and pair and all(_is_number(v) for v in value):
        return (float(value[0]), float(value[1]))
    raise RelabelError(f"{source}: {name} must be {base}, got {value!r}")


def load_config(path: str | Path | None = None, **overrides: object) -> TrainConfig:
    """A TrainConfig from the TOML file `path` (keys = TrainConfig fields), then `overrides`
    (the command-line options given). Unknown keys and wrong types raise a one-line RelabelError."""
    values: dict = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise RelabelError(f"{path}: cannot read the config ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise RelabelError(f"{path}: not valid TOML ({e})") from None
    kinds = {f.name: str(f.type) for f in fields(TrainConfig)}
    for source, given in ((path, values), ("options", overrides)):
        unknown = sorted(set(given) - set(kinds))
        if unknown:
            raise RelabelError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(kinds)})")
    coerced = {k: _coerce(k, kinds[k], v, str(path)) for k, v in values.items()}
    coerced.update({k: _coerce(k, kinds[k], v, "option") for k, v in overrides.items()})
    return TrainConfig(**coerced)
