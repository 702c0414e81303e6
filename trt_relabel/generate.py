"""`generate`: label every image of a data set with the teacher into a label store.

Pipeline: DataLoader worker processes decode (:func:`trt_relabel.images.load_rgb`) and resize the
whole image to S x S (:func:`trt_relabel.images.resize_whole`, the teacher's interpolation) while
the main process runs the teacher on the previous batch; each batch's top-k maps go straight into
the store's memmaps. An input that cannot be decoded becomes one line of errors.jsonl, never a
crash. Rows are the inputs in sorted relative-path order; the images of tar shards
(:mod:`trt_relabel.shards`) are read from their members, rows ordered by (shard, key).

Resume: the store's status array says which rows are done, so rerunning the same command after a
crash (even kill -9) labels only the missing rows. ONNX Runtime's CPU results of an image do not
depend on the batch it is in, so a resumed store equals an uninterrupted one bit for bit.

Several processes: under `torchrun --nproc-per-node N` rank r labels the rows with row % N == r of
one store (rank 0 creates and finishes it); `shard=(i, n)` does the same split without a process
group, and the shard that ends last marks the store complete. Each process holds the lock of its
rows (:mod:`trt_relabel.locks`): a second writer of the same rows is refused (exit code 2). Ranks
and shards split rows, not tar files, so every split writes the same store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from trt_relabel.classes import classes_metadata, read_class_names, unmapped_advice
from trt_relabel.errors import Interrupted, RelabelError, UsageError
from trt_relabel.generate_checks import check_existing_store, check_not_busy, check_same_teacher, check_writable
from trt_relabel.generate_inputs import Inputs, open_data, teacher_class_indices
from trt_relabel.images import ImageEntry, ImageLoadError, resize_whole
from trt_relabel.locks import claim_rows
from trt_relabel.progress import progress_bar
from trt_relabel.shards import FolderInputs
from trt_relabel.store import StoreWriter, create_store
from trt_relabel.store_format import ERRORS, FAILED, LABELLED, StoreSpec
from trt_relabel.terminal import console, warning

if TYPE_CHECKING:
    from trt_relabel.backends import Backend


@dataclass(frozen=True)
class GenerateResult:
    """What a `generate` call did. Counts cover the rows this call is responsible for: the whole
    store for a plain or torchrun run (rank 0), its own rows for a shard or another rank."""

    store: Path
    backend: str
    rows: int  # rows this call is responsible for
    labelled: int  # of those, labelled (by this or earlier runs)
    failed: int  # of those, failed (listed in errors.jsonl)
    processed: int  # inputs decoded and labelled or failed by this run (all ranks)
    seconds: float  # wall time of the labelling loop
    complete: bool  # the whole store is labelled (every row labelled or failed)
    rank: int = 0  # torchrun rank of this process (rank 0 reports for the whole store)
    warmup: tuple[int, float] = (0, 0.0)  # (inputs, seconds) until the first batch was written (all ranks)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_second(self) -> float:
        """The rate after the first batch: without the pipeline fill (worker start, first decode) and
        the backend's first-run warm-up, which a short run cannot amortise."""
        inputs, seconds = self.warmup
        return (self.processed - inputs) / (self.seconds - seconds) if self.seconds > seconds else 0.0

    @property
    def errors_path(self) -> Path:
        return self.store / ERRORS


class DecodedBatch(NamedTuple):
    """A collated batch. `rows` int64 [B] with `pixels` uint8 [B, S, S, 3] decoded on the CPU (a torch
    tensor, which a worker process hands over in shared memory rather than through a pipe);
    `jpeg_rows` with `jpegs`, the raw files left for the GPU decoder (`decode="gpu"` only);
    `failures`, (row, reason) of inputs that could not be read. Any part may be empty."""

    rows: np.ndarray
    pixels: torch.Tensor
    jpeg_rows: list[int]
    jpegs: list[bytes]
    failures: list[tuple[int, str]]


class PendingImages:
    """Map-style dataset over pending rows: item i -> (row, pixels uint8 [S, S, 3] or None, JPEG bytes
    for the GPU decoder or None, failure reason or None). Never raises for a bad input."""

    def __init__(
        self,
        inputs: Inputs,
        samples: Sequence[ImageEntry],
        rows: np.ndarray,
        size: int,
        interpolation: str,
        decode: str = "cpu",
    ):
        self.inputs = inputs
        self.samples = samples
        self.rows = rows
        self.size = size
        self.interpolation = interpolation
        self.decode = decode

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, bytes | None, str | None]:
        row = int(self.rows[i])
        if self.decode == "gpu":
            data = _gpu_jpeg(self.inputs, row, self.samples[row])
            if data is not None:
                return row, None, data, None
        pixels, reason = decode_cpu(self.inputs, row, self.samples[row], self.size, self.interpolation)
        return row, pixels, None, reason


def decode_cpu(
    inputs: Inputs, row: int, sample: ImageEntry, size: int, interpolation: str
) -> tuple[np.ndarray | None, str | None]:
    """(pixels uint8 [S, S, 3], None) or (None, the one-line reason the input cannot be labelled)."""
    try:
        return resize_whole(inputs.load(row, sample), size, interpolation), None
    except ImageLoadError as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not stop the run
        return None, f"cannot decode image: {type(e).__name__}: {e}"


def _gpu_jpeg(inputs: Inputs, row: int, sample: ImageEntry) -> bytes | None:
    """The input's bytes when nvJPEG can decode them; None sends it (and any read error) to the CPU path."""
    from trt_relabel.gpu_decode import is_gpu_decodable

    try:
        data = inputs.read(row, sample)
    except OSError:
        return None
    return data if is_gpu_decodable(data) else None


def collate(items: list[tuple[int, np.ndarray | None, bytes | None, str | None]]) -> DecodedBatch:
    decoded = [(row, pixels) for row, pixels, _, _ in items if pixels is not None]
    jpegs = [(row, data) for row, _, data, _ in items if data is not None]
    pixels = [torch.from_numpy(p) for _, p in decoded]
    return DecodedBatch(
        rows=np.array([row for row, _ in decoded], dtype=np.int64),
        pixels=default_collate(pixels) if pixels else torch.empty(0, 0, 0, 3, dtype=torch.uint8),
        jpeg_rows=[row for row, _ in jpegs],
        jpegs=[data for _, data in jpegs],
        failures=[(row, reason) for row, _, _, reason in items if reason is not None],
    )


def default_workers() -> int:
    """Decoding processes: every core this process may use but the one that feeds the teacher."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def _relabel_error(message: str, exit_code: int) -> RelabelError:
    """Another rank's RelabelError, raised again on this rank."""
    error = RelabelError(message)
    error.exit_code = exit_code
    return error


class _Group:
    """The torchrun process group (gloo, for barriers; created unless the caller made one), or a
    single process without one."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        if self.world > 1:
            import torch.distributed as dist

            self.dist = dist
            if not dist.is_initialized():
                # Ranks wait for each other at the end of labelling: allow for days of uneven work.
                dist.init_process_group("gloo", timeout=timedelta(days=7))
                self.owned = True

    def rank0_first(self, fn: Callable[[], object]) -> object:
        """Run `fn` on rank 0, then (once it succeeded) on the other ranks. A RelabelError of rank 0
        is raised on every rank."""
        if self.world == 1:
            return fn()
        outcome = [None]
        if self.rank == 0:
            try:
                result = fn()
            except RelabelError as e:
                outcome = [(str(e), e.exit_code)]
                self.dist.broadcast_object_list(outcome, src=0)
                raise
        self.dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise _relabel_error(*outcome[0])
        return result if self.rank == 0 else fn()

    def on_every_rank(self, fn: Callable[[], object]) -> None:
        """Run `fn` on every rank; when it raises a RelabelError on some rank, raise the first
        rank's on every rank (a barrier)."""
        if self.world == 1:
            fn()
            return
        try:
            fn()
            outcome = None
        except RelabelError as e:
            outcome = (str(e), e.exit_code)
        gathered = [None] * self.world
        self.dist.all_gather_object(gathered, outcome)
        failure = next((o for o in gathered if o is not None), None)
        if failure is not None:
            raise _relabel_error(*failure)

    def sum_and_max(self, count: int, seconds: float) -> tuple[int, float]:
        """Total `count` and longest `seconds` over the ranks (a barrier)."""
        if self.world == 1:
            return count, seconds
        gathered = [None] * self.world
        self.dist.all_gather_object(gathered, (count, seconds))
        return sum(c for c, _ in gathered), max(s for _, s in gathered)

    def device(self) -> str | None:
        """The CUDA device of this rank under torchrun (None: the backend's default)."""
        if self.world == 1 or not torch.cuda.is_available():
            return None
        device = f"cuda:{self.local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
        return device

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()


def generate(
    data: str | Path,
    out: str | Path,
    *,
    teacher: str = "efficientnet_lite0",
    checkpoint: str | Path | None = None,
    size: int | None = None,
    topk: int = 5,
    backend: str = "auto",
    device: str | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    file_list: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    engines_dir: str | Path = "engines",
    decode: str = "cpu",
    compile: bool = False,
    progress: bool = True,
    data_format: str = "auto",
    class_names: str | Path | None = None,
    class_map: str | Path | None = None,
) -> GenerateResult:
    """Label the images under `data` (or those of `file_list`) into the store `out`; resume it when
    it exists. `size`: teacher input side (default: the teacher's). `device`: "cpu", "cuda" or
    "cuda:N" (None: this torchrun rank's GPU, else the backend's default; "cuda:N" is refused
    under torchrun with several ranks, which each take their local GPU). `workers`: decoding processes
    (default: one per core but one; 0 decodes in this process). `shard=(i, n)`: label only rows
    with row % n == i. `decode="gpu"`: JPEGs are decoded and resized on the GPU (nvJPEG), other
    files on the CPU; not bit-identical to the CPU path (see :mod:`trt_relabel.gpu_decode`).
    `compile`: `torch.compile` the teacher of the torch backend. `retry_failed`: label again the
    inputs that earlier runs failed on (those of this shard), e.g. after fixing the files.
    `data_format`: "folder", "wds" (tar shards: `data` is one or a folder of them, `file_list`
    names them) or "auto" (shards when `data` is a .tar or a folder of only .tar files).
    `class_names`: the classes of a teacher fine-tuned on its own classes (see
    :func:`trt_relabel.classes.read_class_names`). Class folders get the teacher's class index
    (samples.tsv): folders named by a class id, or mapped by the `class_map` file
    (:func:`trt_relabel.classes.read_class_map`); other folders get -1, with a warning. A file
    list and tar shards give their class indices themselves.
    Raises UsageError for bad arguments, RelabelError (StoreError, ...) for
    expected failures; inputs that cannot be decoded are listed in errors.jsonl, not raised.
    """
    samples, inputs = open_data(data, file_list, data_format)
    classes = read_class_names(class_names) if class_names is not None else None
    listed = file_list is None and isinstance(inputs, FolderInputs)
    samples, unmapped = teacher_class_indices(samples, teacher, size, classes, class_map, listed)
    workers = default_workers() if workers is None else workers
    if batch_size < 1 or workers < 0:
        raise UsageError(f"batch size must be >= 1 and workers >= 0 (got {batch_size} and {workers})")
    if not 0 <= shard[0] < shard[1]:
        raise UsageError(f"shard {shard[0]}/{shard[1]}: expected I/N with 0 <= I < N")
    if decode not in ("cpu", "gpu"):
        raise UsageError(f"--decode {decode!r}: expected cpu or gpu")
    if decode == "gpu" and not torch.cuda.is_available():
        raise UsageError("--decode gpu needs a CUDA GPU; none is available here")
    if device == "cpu" and (decode == "gpu" or backend == "tensorrt"):
        raise UsageError("--device cpu cannot be combined with --backend tensorrt or --decode gpu (they run on a GPU)")
    if shard[1] > 1 and overwrite:
        raise UsageError("--overwrite cannot be combined with --shard (a shard would delete the others' work)")
    out = Path(out)
    check_writable(out)
    existing = check_existing_store(out, Path(data), samples, teacher, size, topk, overwrite, retry_failed, shard)
    if existing is not None:
        samples = existing.samples  # equal to the listed ones (checked); reopening it reuses the parsed table
    from trt_relabel.backends import open_backend, parse_device

    group = _Group()
    rows_lock = contextlib.ExitStack()
    try:
        if group.world > 1 and shard[1] > 1:
            raise UsageError("--shard cannot be combined with torchrun (the ranks already split the rows)")
        if group.world > 1 and device not in (None, "cpu", "cuda"):
            raise UsageError(f"--device {device} cannot be combined with torchrun (each rank takes its local GPU)")
        device = device if device == "cpu" else group.device() or device
        split = (group.rank, group.world) if group.world > 1 else shard
        group.on_every_rank(lambda: check_not_busy(out, split, len(samples), overwrite))
        show = progress and group.rank == 0
        log = console.print if show else (lambda _: None)
        if unmapped:
            advice = unmapped_advice(unmapped, teacher)
            log(warning(f"{advice}; their images get class -1"))
        runtime = group.rank0_first(
            lambda: open_backend(
                backend,
                teacher=teacher,
                checkpoint=checkpoint,
                size=size,
                topk=topk,
                engines_dir=engines_dir,
                device=device,
                max_batch=batch_size,
                compile=compile,
                log=log,
                classes=classes,
            )
        )
        writer = group.rank0_first(
            lambda: create_store(
                out,
                _spec(runtime),
                samples,
                overwrite=overwrite and group.rank == 0,
                extra_manifest={"source": "generate", **classes_metadata(classes)},
            )
        )
        check_same_teacher(writer, runtime)
        samples = writer.samples  # the store's SampleTable: decoding workers share its pages
        group.on_every_rank(lambda: rows_lock.enter_context(claim_rows(out, split, len(samples))))
        if retry_failed:  # rank 0 reopens the failed rows of every rank before any rank lists its own
            reopen = split if group.world == 1 else (0, 1)
            group.rank0_first(lambda: writer.retry_failed(reopen) if group.rank == 0 else 0)
        pending = writer.pending_rows(split)
        share = f" (rank 0's share; {group.world} ranks)" if group.world > 1 else ""
        log(f"labelling {len(pending)} of {len(samples)} images{share} with {runtime.name} into {out}")
        try:
            decode_on = torch.device("cuda", parse_device(device)) if decode == "gpu" else None
            timing = _label_rows(writer, runtime, inputs, samples, pending, batch_size, workers, show, decode_on)
        except KeyboardInterrupt:
            labelled = int((writer.status() == LABELLED).sum())
            raise Interrupted(
                f"interrupted: {labelled} of {len(samples)} images of {out} are labelled and kept; "
                "rerun the same command to resume"
            ) from None
        processed, seconds = group.sum_and_max(timing.processed, timing.seconds)
        warmup = group.sum_and_max(*timing.warmup)
        complete = writer.finish() if group.rank == 0 else False
        scope = (0, 1) if group.world > 1 and group.rank == 0 else split
        result = _result(writer, runtime.name, scope, processed, seconds, complete)
        return dataclasses.replace(result, rank=group.rank, warmup=warmup)
    finally:
        rows_lock.close()
        group.close()


def _spec(backend: Backend) -> StoreSpec:
    meta = backend.metadata
    return StoreSpec(
        teacher=meta.teacher,
        teacher_hash=meta.teacher_hash,
        graph_sha256=backend.graph_sha256,
        input_size=meta.input_size,
        map_size=meta.map_size,
        topk=meta.topk,
        num_classes=meta.num_classes,
    )


def _result(
    writer: StoreWriter, backend: str, scope: tuple[int, int], processed: int, seconds: float, complete: bool
) -> GenerateResult:
    status = writer.status()[scope[0] :: scope[1]]
    return GenerateResult(
        store=writer.path,
        backend=backend,
        rows=len(status),
        labelled=int((status == LABELLED).sum()),
        failed=int((status == FAILED).sum()),
        processed=processed,
        seconds=seconds,
        complete=complete,
    )


#: The first batch of a run: the progress bar moves (and shows a rate and an ETA) after this many images.
FIRST_BATCH = 8


def ramp_batches(count: int, batch_size: int, first: int = FIRST_BATCH) -> list[range]:
    """Batches of dataset items 0..count-1 in order: `first`, then doubling up to `batch_size`, then
    `batch_size` each, so that a large batch does not keep the progress bar at 0 for its whole first
    batch (the pipeline fill). ONNX Runtime's CPU labels do not depend on the batch an image is in."""
    batches, start, size = [], 0, min(first, batch_size)
    while start < count:
        batches.append(range(start, min(start + size, count)))
        start, size = start + size, min(2 * size, batch_size)
    return batches


class _LoopTiming(NamedTuple):
    processed: int  # rows labelled or failed
    seconds: float
    warmup: tuple[int, float]  # (rows, seconds) until the first batch was written


def _label_rows(
    writer: StoreWriter,
    backend: Backend,
    inputs: Inputs,
    samples: list[ImageEntry],
    rows: np.ndarray,
    batch_size: int,
    workers: int,
    show: bool,
    gpu_decode: torch.device | None = None,
) -> _LoopTiming:
    """Decode `rows` in `workers` processes while the teacher labels earlier batches
    (`backend.stream` overlaps transfers and compute where it can); write each batch into the store.
    `gpu_decode`: the backend's GPU, where JPEGs are decoded (None: every image on the CPU).
    Returns how many rows were labelled or failed, and how long it took."""
    start = time.perf_counter()
    warmup = None
    meta = backend.metadata
    decode = "cpu" if gpu_decode is None else "gpu"
    dataset = PendingImages(inputs, samples, rows, meta.input_size, meta.interpolation, decode)
    loader = DataLoader(
        dataset, batch_sampler=ramp_batches(len(rows), batch_size), num_workers=workers, collate_fn=collate
    )
    done = 0
    with progress_bar(console, show) as bar:
        task = bar.add_task("labelling", total=len(rows))

        def advance(count: int) -> None:
            nonlocal done
            done += count
            bar.update(task, completed=done)

        def batches():
            for batch in loader:
                for row, reason in batch.failures:
                    writer.mark_failed(row, reason)
                advance(len(batch.failures))
                labelled, pixels = (
                    _on_gpu(batch, gpu_decode, inputs, samples, meta, writer, advance) if batch.jpegs else batch[:2]
                )
                if len(labelled):
                    yield labelled, pixels

        for labelled, values, indices in backend.stream(batches()):
            writer.write(labelled, values, indices)
            advance(len(labelled))
            warmup = warmup or (done, time.perf_counter() - start)
    return _LoopTiming(done, time.perf_counter() - start, warmup or (0, 0.0))


def _on_gpu(
    batch: DecodedBatch,
    device: torch.device,
    inputs: Inputs,
    samples: list[ImageEntry],
    meta,
    writer: StoreWriter,
    advance,
):
    """Decode the batch's JPEGs on GPU `device` and join them with its CPU-decoded pixels.

    Returns (rows int64 [B], pixels uint8 [B, S, S, 3] on the GPU). JPEGs nvJPEG rejects take the CPU
    path here; those that fail there too are marked failed.
    """
    from trt_relabel.gpu_decode import decode_resize_jpegs

    gpu_pixels, rejected = decode_resize_jpegs(batch.jpegs, meta.input_size, meta.interpolation, device)
    rejected = set(rejected)
    gpu_rows = [row for n, row in enumerate(batch.jpeg_rows) if n not in rejected]
    cpu_rows, pixels = list(batch.rows), list(batch.pixels)
    for n in sorted(rejected):
        row = batch.jpeg_rows[n]
        decoded, reason = decode_cpu(inputs, row, samples[row], meta.input_size, meta.interpolation)
        if decoded is None:
            writer.mark_failed(row, reason)
            advance(1)
        else:
            cpu_rows.append(row)
            pixels.append(decoded)
    cpu_pixels = torch.stack([torch.as_tensor(p) for p in pixels]).to(device) if pixels else gpu_pixels[:0]
    return np.array(gpu_rows + cpu_rows, dtype=np.int64), torch.cat([gpu_pixels, cpu_pixels])
