"""The lean trainer: a timm student on an ImageFolder with ReLabel targets (`trt-relabel train`).

Targets per label mode (soft-target cross-entropy ``-(target * log_softmax(logits)).sum(1).mean()``):

- ``relabel``: LabelPooling, ``softmax(roi_align(label map, crop box))`` (trt_relabel.pooling);
- ``original``: one-hot of the folder class; ``smooth``: the one-hot with label smoothing;
- ``relabel+original``: the average of the relabel and the one-hot targets.

CutMix with localized labels. Image A (crop box ``box_A``) receives the rectangle R of image B =
A's batch neighbour under a random permutation (R in output pixels of the S x S crops, as CutMix
draws it); ``lam`` = 1 - area(R) / S^2 is the fraction of A that stays visible. The target is

    lam * softmax(mean of A's map over A's visible region) + (1 - lam) * softmax(pool(B's map, R_B))

where R_B is R mapped into B's image frame through B's crop box (and mirrored when B was flipped),
so B contributes the labels of the pixels it really shows. A's visible region (its crop minus R)
is not a box: it is cut into the (at most 4) boxes above, below, left and right of R, each pooled
with LabelPooling and averaged with its area as weight, which is the mean of A's label map over
the visible region exactly, up to RoIAlign's own discretisation (a fixed number of sampling points
per box, boxes under one map cell stretched to one cell, as ``aligned=False`` does). Mixing is done
after the softmax of each region, with the visible areas as weights. The official ReLabel code
(and timm-style CutMix) mixes by area only: ``lam * target_A + (1 - lam) * target_B`` with each
target pooled over the WHOLE crop of its image, so a pasted patch of a dog's background still
carries "dog" and the covered object of A still counts. Label modes that use the folder classes mix
their one-hot (or smoothed) targets by area as usual.

Local targets (``local_labels = S``): the student's classifier, applied as a 1x1 convolution on
its pre-pool feature map (timm ``forward_features``, adaptive-average-pooled to S x S), predicts
each of S x S cells; each cell's target is ``softmax(label_pooling(..., output_size=S))`` (mirrored
along x for flipped crops; under CutMix, each cell mixes A's and B's cell targets by the fraction
of the cell the patch covers). The loss adds ``local_weight`` times their soft cross-entropy.

Optimisation: SGD with Nesterov momentum, weight decay on weights only (no decay on norms and
biases), linear warmup then cosine decay to 0 per step, AMP on CUDA (bf16, or fp16 with a
GradScaler), channels_last and torch.compile on request. On CUDA the host-to-device copies and
the targets are queued on a side stream, so that they overlap the previous step. Under torchrun
every process trains on its shard of each batch (DDP; nccl on CUDA, gloo on CPU); the global batch
size is split evenly. Only rank 0 writes RUN_DIR/metrics.jsonl and RUN_DIR/checkpoint.pt.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import Tensor, nn

from trt_relabel.data import (
    EvalBatches,
    EvalTransform,
    ShardedBatchSampler,
    TrainBatch,
    TrainBatches,
    TrainTransform,
    aligned_store,
    batch_loader,
    folder_entries,
    real_labels,
    trainable_rows,
)
from trt_relabel.errors import RelabelError, UsageError
from trt_relabel.fileio import atomic_file
from trt_relabel.pooling import label_pooling, soft_target
from trt_relabel.store import LabelStore

LABEL_MODES = ("relabel", "original", "smooth", "relabel+original")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Everything a run depends on (a TOML recipe holds any of these keys). Defaults: the paper's
    ResNet-50 ReLabel recipe.

    `batch_size` is the global batch (split over the torchrun processes) and `lr` the peak learning
    rate for it; `warmup_epochs` may be fractional. `smoothing` is used by label_mode "smooth".
    `cutmix` is the probability of CutMix per batch, `cutmix_beta` its Beta parameter.
    `local_labels` = S > 0 adds the per-cell loss on S x S cells, weighted by `local_weight`.
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


@dataclass
class TrainResult:
    """run_dir; checkpoint path; epochs completed in total; metrics: the metrics.jsonl lines of
    this call (the same dicts on every process); skipped_rows: store rows not trained on (not
    labelled); rank: this process's rank."""

    run_dir: Path
    checkpoint: Path
    epochs: int
    metrics: list[dict] = field(default_factory=list)
    skipped_rows: int = 0
    rank: int = 0


# --- targets -------------------------------------------------------------------------------------


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over samples (and cells) of -sum_c target * log_softmax(logits): logits and target
    [B, C] or [B, C, S, S] (classes on dim 1)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def class_targets(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """int64 [B] -> float32 [B, C]: one-hot, with label smoothing (1 - e on the class, e / C
    added everywhere)."""
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes


def relabel_targets(values: Tensor, indices: Tensor, boxes: Tensor, num_classes: int) -> Tensor:
    """LabelPooling soft targets: values float [B, k, h, w], indices int [B, k, h, w], boxes
    [B, 4] (x1, y1, x2, y2 in [0, 1] of the image frame) -> float32 [B, C]."""
    return soft_target(label_pooling(values, indices, boxes, num_classes))


def crop_to_image(rects: Tensor, boxes: Tensor, flipped: Tensor) -> Tensor:
    """Rectangles given as fractions (u1, v1, u2, v2) of the OUTPUT crop (after the flip) ->
    boxes (x1, y1, x2, y2) normalised in the image frame. rects [..., B, 4], boxes [B, 4],
    flipped bool [B]; a flipped crop mirrors u (u -> 1 - u)."""
    u1, v1, u2, v2 = rects.unbind(-1)
    u1, u2 = torch.where(flipped, 1 - u2, u1), torch.where(flipped, 1 - u1, u2)
    x1, y1, x2, y2 = boxes.unbind(-1)
    width, height = x2 - x1, y2 - y1
    return torch.stack([x1 + u1 * width, y1 + v1 * height, x1 + u2 * width, y1 + v2 * height], -1)


@dataclass(frozen=True)
class CutMix:
    """One CutMix draw for a batch: image i receives the pixels [y1:y2, x1:x2] of image perm[i]
    (output pixels of the S x S crops; x2, y2 exclusive)."""

    perm: Tensor  # int64 [B]
    rect: tuple[int, int, int, int]  # x1, y1, x2, y2
    size: int  # S

    @property
    def kept(self) -> float:
        """lam: the fraction of each image that stays visible."""
        x1, y1, x2, y2 = self.rect
        return 1.0 - (x2 - x1) * (y2 - y1) / self.size**2

    @property
    def fractions(self) -> tuple[float, float, float, float]:
        """The rectangle as fractions (u1, v1, u2, v2) of the crop."""
        return tuple(c / self.size for c in self.rect)

    def paste(self, images: Tensor) -> Tensor:
        """Paste the rectangle of image perm[i] into image i of `images` [B, 3, S, S], in place
        (the pasted pixels are read before any is written); returns `images`."""
        x1, y1, x2, y2 = self.rect
        images[:, :, y1:y2, x1:x2] = images[self.perm, :, y1:y2, x1:x2]
        return images

    def mix(self, targets: Tensor) -> Tensor:
        """Area mix of per-image targets [B, C]: lam * t + (1 - lam) * t[perm]."""
        return self.kept * targets + (1.0 - self.kept) * targets[self.perm]

    def cell_coverage(self, cells: int, device: torch.device | None = None) -> Tensor:
        """float32 [cells, cells]: the fraction of each cell of an even cells x cells grid over
        the crop that the rectangle covers."""
        u1, v1, u2, v2 = self.fractions
        edges = torch.arange(cells + 1, dtype=torch.float32, device=device) / cells
        cover_x = (edges[1:].clamp(max=u2) - edges[:-1].clamp(min=u1)).clamp(min=0)
        cover_y = (edges[1:].clamp(max=v2) - edges[:-1].clamp(min=v1)).clamp(min=0)
        return cover_y[:, None] * cover_x[None, :] * cells**2


def sample_cutmix(batch_size: int, image_size: int, beta: float) -> CutMix:
    """CutMix's draw (torch's CPU RNG): lam ~ Beta(beta, beta), a rectangle of side
    S * sqrt(1 - lam) centred uniformly and clipped to the crop, a random permutation of the
    batch."""
    lam = float(torch.distributions.Beta(beta, beta).sample())
    cut = int(image_size * math.sqrt(1.0 - lam)) // 2
    cx, cy = (int(c) for c in torch.randint(image_size, (2,)))
    x1, x2 = max(cx - cut, 0), min(cx + cut, image_size)
    y1, y2 = max(cy - cut, 0), min(cy + cut, image_size)
    return CutMix(torch.randperm(batch_size), (x1, y1, x2, y2), image_size)


def cutmix_relabel_targets(
    values: Tensor, indices: Tensor, boxes: Tensor, flipped: Tensor, cutmix: CutMix, num_classes: int
) -> Tensor:
    """Localized ReLabel targets of a CutMix batch (see the module docstring) -> float32 [B, C].

    values float [B, k, h, w], indices int [B, k, h, w], boxes [B, 4] image-frame crop boxes,
    flipped bool [B]. A's visible region = the 4 boxes around the rectangle (top and bottom bands
    over the full width, left and right pieces beside it), pooled and averaged by area.
    """
    u1, v1, u2, v2 = cutmix.fractions
    pieces = boxes.new_tensor([[0, 0, 1, v1], [0, v2, 1, 1], [0, v1, u1, v2], [u2, v1, 1, v2]])
    areas = boxes.new_tensor([v1, 1 - v2, u1 * (v2 - v1), (1 - u2) * (v2 - v1)])
    batch = boxes.shape[0]
    perm = cutmix.perm
    visible_boxes = crop_to_image(pieces[:, None, :].expand(4, batch, 4), boxes, flipped)  # [4, B, 4]
    patch_boxes = crop_to_image(boxes.new_tensor(cutmix.fractions), boxes[perm], flipped[perm])  # [B, 4]
    pooled = label_pooling(
        torch.cat([values.repeat(4, 1, 1, 1), values[perm]]),
        torch.cat([indices.repeat(4, 1, 1, 1), indices[perm]]),
        torch.cat([visible_boxes.reshape(4 * batch, 4), patch_boxes]),
        num_classes,
    )
    kept = cutmix.kept
    visible = (pooled[: 4 * batch].view(4, batch, -1) * areas[:, None, None]).sum(0) / max(kept, 1e-6)
    return kept * soft_target(visible) + (1.0 - kept) * soft_target(pooled[4 * batch :])


def local_targets(
    values: Tensor,
    indices: Tensor,
    boxes: Tensor,
    flipped: Tensor,
    num_classes: int,
    cells: int,
    cutmix: CutMix | None = None,
) -> Tensor:
    """Per-cell soft targets float32 [B, C, S, S] of the S x S cells of each output crop:
    softmax over classes of label_pooling(..., output_size=S), mirrored along x where the crop
    was flipped; under CutMix each cell mixes its own and its pasted neighbour's target by the
    fraction of the cell the rectangle covers."""
    targets = soft_target(label_pooling(values, indices, boxes, num_classes, output_size=cells))
    targets = torch.where(flipped.to(targets.device)[:, None, None, None], targets.flip(3), targets)
    if cutmix is None:
        return targets
    cover = cutmix.cell_coverage(cells, targets.device)
    return (1.0 - cover) * targets + cover * targets[cutmix.perm]


def batch_targets(
    batch: TrainBatch, config: TrainConfig, num_classes: int, cutmix: CutMix | None
) -> tuple[Tensor, Tensor | None]:
    """(targets float32 [B, C], local targets float32 [B, C, S, S] or None) of a batch on the
    training device, for the config's label mode, CutMix draw and local_labels."""
    parts = []
    if config.label_mode != "relabel":
        smoothing = config.smoothing if config.label_mode == "smooth" else 0.0
        one_hot = class_targets(batch.labels, num_classes, smoothing)
        parts.append(one_hot if cutmix is None else cutmix.mix(one_hot))
    cells = None
    if "relabel" in config.label_mode:
        values, indices = batch.values.float(), batch.indices
        if cutmix is None:
            parts.append(relabel_targets(values, indices, batch.boxes, num_classes))
        else:
            parts.append(cutmix_relabel_targets(values, indices, batch.boxes, batch.flipped, cutmix, num_classes))
        if config.local_labels:
            cells = local_targets(values, indices, batch.boxes, batch.flipped, num_classes, config.local_labels, cutmix)
    return sum(parts) / len(parts), cells


# --- model ---------------------------------------------------------------------------------------


class Student(nn.Module):
    """A timm classifier returning (logits [B, C], cell logits [B, C, S, S] or None).

    With `cells` = S > 0 the classifier (an nn.Linear) is applied as a 1x1 convolution to the
    pre-pool feature map [B, F, H, W] average-pooled to S x S (pooling and the linear map
    commute). One forward serves both, so DDP sees every parameter used.
    """

    def __init__(self, model: nn.Module, cells: int = 0) -> None:
        super().__init__()
        self.model = model
        self.cells = cells
        if cells and not isinstance(model.get_classifier(), nn.Linear):
            raise UsageError(f"local_labels: the classifier of {type(model).__name__} is not a Linear layer")

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.cells:
            return self.model(images), None
        features = self.model.forward_features(images)
        if features.dim() != 4:
            raise UsageError(
                f"local_labels needs a [B, F, H, W] feature map, {type(self.model).__name__} "
                f"gives {list(features.shape)}"
            )
        classifier = self.model.get_classifier()
        cell_features = F.adaptive_avg_pool2d(features, self.cells)
        cell_logits = F.conv2d(cell_features, classifier.weight[:, :, None, None], classifier.bias)
        return self.model.forward_head(features), cell_logits


def create_student(name: str, num_classes: int) -> nn.Module:
    """timm.create_model(name, pretrained=False, num_classes=num_classes); UsageError for an
    unknown name."""
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as e:
        raise UsageError(f"--model {name}: {e}") from None


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay on tensors of 2+ dims only (no decay on norm
    weights and biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warmup to the peak lr over `warmup_steps` (the first step at
    peak / warmup_steps), then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- processes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    """This process in the run: rank, world size, device (cuda:LOCAL_RANK when CUDA is there)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Sum of `values` over the processes (all-reduce)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj: object) -> list[object]:
        """`obj` of every process, in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


@contextlib.contextmanager
def _process_group():
    """The Process of this run; under torchrun (WORLD_SIZE > 1) joins the process group (nccl on
    CUDA, gloo on CPU) for the duration."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    joined = world_size > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield Process(dist.get_rank() if world_size > 1 else 0, world_size, device)
    finally:
        if joined:
            dist.destroy_process_group()


# --- checkpoints ---------------------------------------------------------------------------------


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_file(path) as f:
        torch.save(state, f)


def _load_checkpoint(path: Path, device: torch.device) -> dict:
    if not path.is_file():
        raise RelabelError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is one expected failure
        raise RelabelError(
            f"{path}: cannot load the checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


def _restore(checkpoint: dict, path: Path, model: nn.Module, optimizer, scheduler, scaler, process: Process) -> int:
    """Load the training state of `checkpoint` into the live objects; returns the epochs done."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise RelabelError(f"{path}: does not fit this model ({str(e).splitlines()[0]})") from None
    scheduler.load_state_dict(checkpoint["scheduler"])
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * factor(scheduler.last_epoch)  # this run's schedule: --epochs may have changed
    scaler.load_state_dict(checkpoint["scaler"])
    states = checkpoint["rng"]
    if len(states) == process.world_size:
        torch.set_rng_state(states[process.rank]["torch"].cpu())
        if states[process.rank]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(states[process.rank]["cuda"].cpu())
    return int(checkpoint["epoch"])


def _keep_metrics_until(path: Path, epoch: int) -> None:
    """Drop the metrics lines of epochs after `epoch` (written before a crash, not checkpointed)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(line + "\n" for line in lines if json.loads(line)["epoch"] <= epoch))


# --- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, process: Process, amp, channels_last: bool, real: list[list[int]] | None
) -> dict:
    """Top-1 / top-5 (and ReaL) accuracy in percent over every process's shard of the loader."""
    model.eval()
    counts = np.zeros(5)  # top1, top5, images, real correct, real images
    for batch in loader:
        images = batch.images.to(process.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with amp:
            logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        hits = top5 == batch.labels[:, None]
        counts[:3] += (hits[:, 0].sum().item(), hits.any(1).sum().item(), len(hits))
        if real is not None:
            for position, prediction in zip(batch.positions.tolist(), top5[:, 0].tolist(), strict=True):
                if real[position]:
                    counts[3:] += (prediction in real[position], 1)
    top1, top5, total, real_hits, real_total = process.sum(counts.tolist())
    metrics = {"val_top1": 100 * top1 / max(total, 1), "val_top5": 100 * top5 / max(total, 1)}
    if real is not None:
        metrics["val_real"] = 100 * real_hits / max(real_total, 1)
    return metrics


# --- training ------------------------------------------------------------------------------------


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>7.1f} img/s  loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        console=console,
        disable=console is None,
    )


def train(config: TrainConfig, console=None) -> TrainResult:
    """Train `config.model` on `config.data` with the targets of `config.label_mode`; see the
    module docstring. Writes RUN_DIR/metrics.jsonl (one line per epoch) and RUN_DIR/checkpoint.pt.
    `console` (a rich Console) shows a progress bar and warnings on rank 0; None keeps quiet.
    Expected failures raise RelabelError (UsageError for bad settings)."""
    config.validate()
    with _process_group() as process:
        return _train(config, process, console if process.is_main else None)


def _open_data(config: TrainConfig) -> tuple[list, LabelStore | None, int]:
    """(training entries, store or None, number of classes), aligned and checked."""
    entries = folder_entries(config.data, "--data")
    store = LabelStore(config.labels) if config.labels is not None else None
    if store is not None:
        aligned_store(entries, store, config.data)
    folder_classes = max(e.class_index for e in entries) + 1
    num_classes = store.num_classes if store is not None else folder_classes
    if config.label_mode != "relabel" and folder_classes > num_classes:
        raise RelabelError(f"{config.data}: more class folders than the store's {num_classes} classes")
    return entries, store, num_classes


def _train(config: TrainConfig, process: Process, console) -> TrainResult:
    entries, store, num_classes = _open_data(config)
    uses_maps = "relabel" in config.label_mode
    rows, skipped = trainable_rows(store if uses_maps else None, len(entries))
    if skipped and console is not None:
        console.print(f"[yellow]warning:[/] skipping {skipped} of {len(entries)} images the store has not labelled")
    if config.batch_size % process.world_size:
        raise UsageError(f"batch_size {config.batch_size} is not divisible by {process.world_size} processes")
    batch_size = config.batch_size // process.world_size

    torch.manual_seed(config.seed + process.rank)
    model = create_student(config.model, num_classes)
    data_config = resolve_data_config({}, model=model)
    mean, std = data_config["mean"], data_config["std"]
    transform = TrainTransform(
        config.image_size,
        mean,
        std,
        scale=config.crop_scale,
        color_jitter=config.color_jitter,
        interpolation=config.interpolation,
    )
    sampler = ShardedBatchSampler(
        rows,
        batch_size,
        shuffle=True,
        drop_last=True,
        seed=config.seed,
        rank=process.rank,
        world_size=process.world_size,
    )
    if len(sampler) == 0:
        raise UsageError(f"batch_size {config.batch_size} exceeds the {len(rows)} training images")
    cuda = process.device.type == "cuda"
    generator = torch.Generator()
    dataset = TrainBatches(config.data, entries, transform, store if uses_maps else None)
    loader = batch_loader(dataset, sampler, workers=config.workers, pin_memory=cuda, generator=generator)
    val_loader, real = _val_loader(config, mean, std, batch_size, process, cuda)

    model.to(process.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    student: nn.Module = Student(model, config.local_labels)
    if process.world_size > 1:
        student = nn.parallel.DistributedDataParallel(student, device_ids=[process.device] if cuda else None)
    if config.compile:
        student = torch.compile(student)
    optimizer = build_optimizer(model, config)
    steps = len(sampler)
    scheduler = warmup_cosine(optimizer, config.epochs * steps, round(config.warmup_epochs * steps))
    fp16 = cuda and config.amp and config.amp_dtype == "float16"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    amp = (
        torch.autocast("cuda", dtype=AMP_DTYPES[config.amp_dtype]) if cuda and config.amp else contextlib.nullcontext()
    )

    run_dir = Path(config.out)
    checkpoint_path, metrics_path = run_dir / CHECKPOINT, run_dir / METRICS
    start_epoch = 0
    if config.resume:
        checkpoint = _load_checkpoint(checkpoint_path, process.device)
        start_epoch = _restore(checkpoint, checkpoint_path, model, optimizer, scheduler, scaler, process)
    elif checkpoint_path.exists():
        raise RelabelError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    if process.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.resume:
            _keep_metrics_until(metrics_path, start_epoch)
        else:
            metrics_path.write_text("")

    result = TrainResult(run_dir, checkpoint_path, start_epoch, skipped_rows=skipped, rank=process.rank)
    with _progress(console) as progress:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            generator.manual_seed(int(np.random.SeedSequence([config.seed, epoch, process.rank]).generate_state(1)[0]))
            task = progress.add_task(f"epoch {epoch + 1}/{config.epochs}", total=steps, rate=0.0, loss=float("nan"))
            started = time.perf_counter()
            loss_sum, images_seen, last_lr = _train_epoch(
                student, loader, optimizer, scheduler, scaler, amp, config, num_classes, process, progress, task
            )
            train_time = time.perf_counter() - started
            line = {"epoch": epoch + 1}
            total_loss, total_steps, total_images = process.sum([loss_sum, steps, images_seen])
            line["train_loss"] = total_loss / total_steps
            line["lr"] = last_lr
            line.update({"val_top1": None, "val_top5": None})
            if val_loader is not None:
                line.update(evaluate(model, val_loader, process, amp, config.channels_last, real))
            line["img_per_s"] = total_images / train_time
            line["time"] = time.perf_counter() - started
            rng = process.gather(_rng_state())
            if process.is_main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(line) + "\n")
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "config": config.to_dict(),
                    "rng": rng,
                }
                _save_checkpoint(checkpoint_path, state)
            progress.remove_task(task)
            if console is not None:
                console.print(_summary(line))
            result.metrics.append(line)
            result.epochs = epoch + 1
    return result


def _summary(line: dict) -> str:
    parts = [f"epoch {line['epoch']}", f"loss {line['train_loss']:.4f}", f"lr {line['lr']:.4g}"]
    parts += [f"{k[4:]} {line[k]:.2f}%" for k in ("val_top1", "val_top5", "val_real") if line.get(k) is not None]
    parts += [f"{line['img_per_s']:.1f} img/s", f"{line['time']:.1f} s"]
    return "  ".join(parts)


def _val_loader(config: TrainConfig, mean, std, batch_size: int, process: Process, cuda: bool):
    """(loader over this process's shard of --val, ReaL labels or None), or (None, None)."""
    if config.val is None:
        return None, None
    entries = folder_entries(config.val, "--val")
    real = real_labels(config.real_labels, entries) if config.real_labels is not None else None
    transform = EvalTransform(
        config.image_size, mean, std, crop_pct=config.crop_pct, interpolation=config.interpolation
    )
    sampler = ShardedBatchSampler(
        range(len(entries)),
        batch_size,
        shuffle=False,
        drop_last=False,
        rank=process.rank,
        world_size=process.world_size,
    )
    return batch_loader(
        EvalBatches(config.val, entries, transform), sampler, workers=config.workers, pin_memory=cuda
    ), real


def _train_epoch(student, loader, optimizer, scheduler, scaler, amp, config, num_classes, process, progress, task):
    """One pass over the loader; returns (sum of the step losses, images seen, lr of the last step)
    of this process."""
    student.train()
    side_stream = torch.cuda.Stream(process.device) if process.device.type == "cuda" else None
    loss_sum = torch.zeros((), dtype=torch.float64, device=process.device)
    images_seen = 0
    started = time.perf_counter()
    for step, batch in enumerate(loader):
        lr = optimizer.param_groups[0]["lr"]
        loss = train_step(student, batch, optimizer, scaler, amp, config, num_classes, process.device, side_stream)
        scheduler.step()
        loss_sum += loss.detach()
        images_seen += len(batch.labels)
        fields_ = {"rate": images_seen * process.world_size / (time.perf_counter() - started)}
        if step % 10 == 0:
            fields_["loss"] = loss.item()
        progress.update(task, advance=1, **fields_)
    return loss_sum.item(), images_seen, lr


def _move(tensor: Tensor | None, device: torch.device) -> Tensor | None:
    return None if tensor is None else tensor.to(device, non_blocking=True)


def train_step(
    student,
    batch: TrainBatch,
    optimizer,
    scaler,
    amp,
    config: TrainConfig,
    num_classes: int,
    device: torch.device,
    side_stream: torch.cuda.Stream | None = None,
) -> Tensor:
    """One optimisation step on a loader batch: CutMix, targets, forward, loss, backward, update.

    With `side_stream` (CUDA), the host-to-device copies and the targets are queued on that stream:
    they overlap the previous step's kernels, and the synchronisations inside label_pooling wait
    for that stream only, so the host keeps queuing work ahead of the GPU. Returns the loss (a
    0-dim tensor on `device`).
    """
    cutmix = None
    if config.cutmix and float(torch.rand(())) < config.cutmix:
        cutmix = sample_cutmix(len(batch.labels), config.image_size, config.cutmix_beta)
    with torch.cuda.stream(side_stream) if side_stream is not None else contextlib.nullcontext():
        if cutmix is not None:
            cutmix = replace(cutmix, perm=_move(cutmix.perm, device))
        maps = TrainBatch(*(_move(t, device) for t in batch._replace(images=None)))
        targets, cell_targets = batch_targets(maps, config, num_classes, cutmix)
        images = _move(batch.images, device)
    if side_stream is not None:
        main = torch.cuda.current_stream(device)
        main.wait_stream(side_stream)
        for tensor in (images, targets, cell_targets, cutmix.perm if cutmix is not None else None):
            if tensor is not None:
                tensor.record_stream(main)
    if cutmix is not None:
        images = cutmix.paste(images)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with amp:
        logits, cell_logits = student(images)
    loss = soft_cross_entropy(logits.float(), targets)
    if cell_targets is not None:
        loss = loss + config.local_weight * soft_cross_entropy(cell_logits.float(), cell_targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss
