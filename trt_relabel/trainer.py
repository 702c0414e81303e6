"""The lean trainer: a timm student on an ImageFolder with ReLabel targets (`trt-relabel train`).

Targets per label mode (soft-target cross-entropy ``-(target * log_softmax(logits)).sum(1).mean()``):

- ``relabel``: LabelPooling, ``softmax(roi_align(label map, crop box))`` (trt_relabel.pooling);
- ``original``: one-hot of the folder class; ``smooth``: the one-hot with label smoothing;
- ``relabel+original``: the average of the relabel and the one-hot targets.

Targets (LabelPooling, CutMix with localized labels, local targets) live in trt_relabel.targets.

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
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import Tensor, nn

from trt_relabel.checkpoint import (
    CHECKPOINT,
    METRICS,
    keep_metrics_until,
    load_checkpoint,
    restore_checkpoint,
    rng_state,
    save_checkpoint,
)
from trt_relabel.classes import unmapped_advice
from trt_relabel.data import (
    EvalBatch,
    EvalBatches,
    EvalTransform,
    ShardedBatchSampler,
    TrainBatch,
    TrainBatches,
    TrainData,
    TrainTransform,
    batch_loader,
    open_train_data,
    real_labels,
    student_real_labels,
    trainable_rows,
)
from trt_relabel.distributed import Process, process_group
from trt_relabel.errors import RelabelError, UsageError
from trt_relabel.fileio import remove_stale
from trt_relabel.targets import (
    CellTargets,
    CutMix,
    class_targets,
    cutmix_relabel_targets,
    local_targets,
    relabel_targets,
    sample_cutmix,
    soft_cross_entropy,
)
from trt_relabel.terminal import warning
from trt_relabel.train_config import AMP_DTYPES, TrainConfig
from trt_relabel.train_config import load_config as load_config  # the public API: trt_relabel.trainer.load_config

#: Steps between looks at the loss for NaN / inf (each a host sync, and an all-reduce under torchrun).
LOSS_CHECK_STEPS = 10
LOSS_REFRESH_SECONDS = 0.5  # how often the progress bar shows the epoch's mean loss so far


@dataclass
class TrainResult:
    """run_dir; checkpoint path; epochs completed in total; metrics: the metrics.jsonl lines of
    this call (the same dicts on every process); skipped_rows: store rows not trained on (not
    labelled, or non-finite scores); rank: this process's rank."""

    run_dir: Path
    checkpoint: Path
    epochs: int
    metrics: list[dict] = field(default_factory=list)
    skipped_rows: int = 0
    rank: int = 0


# --- targets -------------------------------------------------------------------------------------


def batch_targets(
    batch: TrainBatch, config: TrainConfig, num_classes: int, cutmix: CutMix | None, subset: Tensor | None = None
) -> tuple[Tensor, CellTargets | None]:
    """(targets float32 [B, N], local targets (CellTargets of [B, N, S, S]) or None) of a batch on
    the training device, for the config's label mode, CutMix draw, local_labels and
    target_temperature. `num_classes`: C of the label maps; `subset`: int64 [N], the teacher class
    of each student output (None: N = C, the teacher's classes in order); batch.labels are student
    outputs."""
    parts = []
    if config.label_mode != "relabel":
        smoothing = config.smoothing if config.label_mode == "smooth" else 0.0
        outputs = len(subset) if subset is not None else num_classes
        one_hot = class_targets(batch.labels, outputs, smoothing)
        parts.append(one_hot if cutmix is None else cutmix.mix(one_hot))
    cells = None
    if "relabel" in config.label_mode:
        values, indices = batch.values.float(), batch.indices
        kept = {"classes": subset, "temperature": config.target_temperature}
        if cutmix is None:
            parts.append(relabel_targets(values, indices, batch.boxes, num_classes, **kept))
        else:
            parts.append(
                cutmix_relabel_targets(values, indices, batch.boxes, batch.flipped, cutmix, num_classes, **kept)
            )
        if config.local_labels:
            cells = local_targets(
                values, indices, batch.boxes, batch.flipped, num_classes, config.local_labels, cutmix, **kept
            )
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


# --- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, process: Process, amp, channels_last: bool, real: list[list[int]] | None
) -> dict:
    """Top-1 / top-5 (and ReaL) accuracy in percent over every process's shard of the loader, and
    val_unreadable: the images left out because they could not be decoded."""
    model.eval()
    counts = np.zeros(6)  # top1, top5, images, real correct, real images, unreadable images
    for batch in loader:
        counts[5] += len(batch.unreadable)
        _check_readable(batch)
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
                    counts[3:5] += (prediction in real[position], 1)
    top1, top5, total, real_hits, real_total, unreadable = process.sum(counts.tolist())
    metrics = {"val_top1": 100 * top1 / max(total, 1), "val_top5": 100 * top5 / max(total, 1)}
    metrics["val_unreadable"] = int(unreadable)
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
        TextColumn("{task.fields[rate]:>7.1f} img/s  loss {task.fields[loss]}"),
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
    with process_group() as process:
        return _train(config, process, console if process.is_main else None)


def _train(config: TrainConfig, process: Process, console) -> TrainResult:
    run_data = open_train_data(config.data, config.labels, config.val, config.class_map, config.label_mode)
    entries, inputs, store, num_classes = run_data.entries, run_data.inputs, run_data.store, run_data.num_classes
    subset = torch.tensor(run_data.classes.teacher) if run_data.classes.teacher is not None else None
    _report_classes(run_data, console)
    uses_maps = "relabel" in config.label_mode
    rows, unlabelled, nonfinite = trainable_rows(store if uses_maps else None, len(entries))
    skipped = unlabelled + nonfinite
    if console is not None:
        if unlabelled:
            console.print(warning(f"skipping {unlabelled} of {len(entries)} images the store has not labelled"))
        if nonfinite:
            message = f"{config.labels}: skipping {nonfinite} images whose labels hold non-finite scores (NaN or inf)"
            console.print(warning(message))
    if config.batch_size % process.world_size:
        raise UsageError(f"batch_size {config.batch_size} is not divisible by {process.world_size} processes")
    batch_size = config.batch_size // process.world_size

    torch.manual_seed(config.seed + process.rank)
    model = create_student(config.model, len(run_data.classes.names))
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
    dataset = TrainBatches(inputs, entries, transform, store if uses_maps else None)
    loader = batch_loader(dataset, sampler, workers=config.workers, pin_memory=cuda, generator=generator)
    val_loader, real = _val_loader(config, run_data, mean, std, batch_size, process, cuda)

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
        checkpoint = load_checkpoint(checkpoint_path, process.device)
        start_epoch = restore_checkpoint(checkpoint, checkpoint_path, model, optimizer, scheduler, scaler, process)
    elif checkpoint_path.exists():
        raise RelabelError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    if process.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale(run_dir, f".{CHECKPOINT}.", ".tmp")  # a checkpoint half-written by a killed run
        if config.resume:
            keep_metrics_until(metrics_path, start_epoch)
        else:
            metrics_path.write_text("")

    result = TrainResult(run_dir, checkpoint_path, start_epoch, skipped_rows=skipped, rank=process.rank)
    with _progress(console) as progress:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            generator.manual_seed(int(np.random.SeedSequence([config.seed, epoch, process.rank]).generate_state(1)[0]))
            task = progress.add_task(f"epoch {epoch + 1}/{config.epochs}", total=steps, rate=0.0, loss="-")
            started = time.perf_counter()
            loss_sum, images_seen, last_lr, bad_step, unreadable = _train_epoch(
                student,
                loader,
                optimizer,
                scheduler,
                scaler,
                amp,
                config,
                (num_classes, subset),
                process,
                progress,
                task,
            )
            if bad_step is not None:
                raise _diverged(run_dir, checkpoint_path, epoch, bad_step)
            train_time = time.perf_counter() - started
            line = {"epoch": epoch + 1}
            total_loss, total_steps, total_images, total_unreadable = process.sum(
                [loss_sum, steps, images_seen, len(unreadable)]
            )
            line["train_loss"] = total_loss / total_steps
            line["lr"] = last_lr
            line.update({"unreadable": int(total_unreadable), "val_top1": None, "val_top5": None})
            line["val_unreadable"] = None
            if val_loader is not None:
                line.update(evaluate(model, val_loader, process, amp, config.channels_last, real))
            _warn_unreadable(console, line, unreadable)
            line["img_per_s"] = total_images / train_time
            line["time"] = time.perf_counter() - started
            rng = process.gather(rng_state())
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
                    "classes": list(run_data.classes.names),
                    "rng": rng,
                }
                save_checkpoint(checkpoint_path, state)
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


def _report_classes(run_data: TrainData, console) -> None:
    """Say what the student's outputs are when they are not simply the class folders."""
    if console is None or run_data.store is None:
        return
    outputs, teacher = len(run_data.classes.names), run_data.store.spec.teacher
    if run_data.unmapped:
        advice = unmapped_advice(run_data.unmapped, teacher)
        message = f"{advice}; the student learns all {outputs} classes of the teacher"
        console.print(warning(message))
    elif run_data.classes.teacher is not None:
        console.print(f"student: {outputs} outputs, the teacher classes of the {outputs} class folders")


def _val_loader(config: TrainConfig, run_data: TrainData, mean, std, batch_size: int, process: Process, cuda: bool):
    """(loader over this process's shard of --val, ReaL labels or None), or (None, None)."""
    if config.val is None:
        return None, None
    entries, inputs = run_data.val_entries, run_data.val_inputs
    real = real_labels(config.real_labels, entries) if config.real_labels is not None else None
    real = student_real_labels(real, run_data.classes) if real is not None else None
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
    return batch_loader(EvalBatches(inputs, entries, transform), sampler, workers=config.workers, pin_memory=cuda), real


def _check_readable(batch: TrainBatch | EvalBatch) -> None:
    """A one-line RelabelError when not one image of the batch could be decoded."""
    if batch.unreadable and not len(batch.labels):
        raise RelabelError(
            f"every image of a batch of {len(batch.unreadable)} is unreadable, e.g. {batch.unreadable[0]}"
        )


def _warn_unreadable(console, line: dict, unreadable: list[str]) -> None:
    """Report the images an epoch left out (counts of every process; the first of this one's)."""
    if console is None or not (line["unreadable"] or line["val_unreadable"]):
        return
    example = f", e.g. {unreadable[0]}" if unreadable else ""
    counts = f"{line['unreadable']} training images" + (
        f" and {line['val_unreadable']} validation images" if line["val_unreadable"] else ""
    )
    console.print(warning(f"epoch {line['epoch']} skipped {counts} that cannot be decoded{example}"))


def _train_epoch(student, loader, optimizer, scheduler, scaler, amp, config, classes, process, progress, task):
    """One pass over the loader; returns (sum of the step losses, images seen, lr of the last step,
    None, "path: reason" of the images left out as unreadable) of this process. Stops early when
    the loss of any process is not finite (looked at every LOSS_CHECK_STEPS steps and at the end, on
    every process at once); the fourth item is then the first step (0-based) with a non-finite loss.
    `classes`: (C of the label maps, teacher class per output or None)."""
    num_classes, subset = classes
    student.train()
    side_stream = torch.cuda.Stream(process.device) if process.device.type == "cuda" else None
    loss_sum = torch.zeros((), dtype=torch.float64, device=process.device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=process.device)
    images_seen = 0
    unreadable: list[str] = []
    started = shown = time.perf_counter()
    for step, batch in enumerate(loader):
        unreadable += batch.unreadable
        _check_readable(batch)
        lr = optimizer.param_groups[0]["lr"]
        loss = train_step(
            student, batch, optimizer, scaler, amp, config, num_classes, process.device, side_stream, subset
        )
        scheduler.step()
        loss = loss.detach()
        loss_sum += loss
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        images_seen += len(batch.labels)
        now = time.perf_counter()
        fields_ = {"rate": images_seen * process.world_size / (now - started)}
        if step % LOSS_CHECK_STEPS == 0 and not _finite_everywhere(loss_sum, process):
            break
        if step == 0 or now - shown >= LOSS_REFRESH_SECONDS:  # .item() waits for the GPU: not every step
            fields_["loss"] = f"{loss_sum.item() / (step + 1):.4f}"
            shown = now
        progress.update(task, advance=1, **fields_)
    if not _finite_everywhere(loss_sum, process):
        bad = int(first_bad.item())
        return loss_sum.item(), images_seen, lr, bad if bad >= 0 else step, unreadable
    return loss_sum.item(), images_seen, lr, None, unreadable


def _finite_everywhere(loss_sum: Tensor, process: Process) -> bool:
    """Whether the loss sum of every process is finite (an all-reduce: call on every process)."""
    return math.isfinite(process.sum([loss_sum.item()])[0])


def _diverged(run_dir: Path, checkpoint: Path, epoch: int, step: int) -> RelabelError:
    if checkpoint.exists():
        kept = f"{checkpoint} (epoch {epoch}) and {run_dir / METRICS} keep the last good state"
    else:
        kept = "no checkpoint was saved"
    return RelabelError(
        f"{run_dir}: the training loss is not finite (NaN or inf) at epoch {epoch + 1}, step {step + 1}: "
        f"training stopped; {kept} (lower --lr, or check the labels and images)"
    )


def _move(tensor: Tensor | object, device: torch.device) -> Tensor | object:
    """A tensor on `device`; anything else (None, the unreadable names) as it is."""
    return tensor.to(device, non_blocking=True) if isinstance(tensor, Tensor) else tensor


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
    subset: Tensor | None = None,
) -> Tensor:
    """One optimisation step on a loader batch: CutMix, targets, forward, loss, backward, update.

    With `side_stream` (CUDA), the host-to-device copies and the targets are queued on that stream:
    they overlap the previous step's kernels, and the synchronisations inside label_pooling wait
    for that stream only, so the host keeps queuing work ahead of the GPU. Returns the loss (a
    0-dim tensor on `device`). `num_classes` and `subset`: see :func:`batch_targets`.
    """
    cutmix = None
    if config.cutmix and float(torch.rand(())) < config.cutmix:
        cutmix = sample_cutmix(len(batch.labels), config.image_size, config.cutmix_beta)
    with torch.cuda.stream(side_stream) if side_stream is not None else contextlib.nullcontext():
        if cutmix is not None:
            cutmix = replace(cutmix, perm=_move(cutmix.perm, device))
        maps = TrainBatch(*(_move(t, device) for t in batch._replace(images=None)))
        targets, cell_targets = batch_targets(maps, config, num_classes, cutmix, _move(subset, device))
        images = _move(batch.images, device)
    if side_stream is not None:
        main = torch.cuda.current_stream(device)
        main.wait_stream(side_stream)
        for tensor in (images, targets, cutmix.perm if cutmix is not None else None):
            if tensor is not None:
                tensor.record_stream(main)
        if cell_targets is not None:
            cell_targets.record_stream(main)
    if cutmix is not None:
        images = cutmix.paste(images)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with amp:
        logits, cell_logits = student(images)
    loss = soft_cross_entropy(logits.float(), targets)
    if cell_targets is not None:
        loss = loss + config.local_weight * cell_targets.cross_entropy(cell_logits.float())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss
