"""ImageNet scale: the fixed and cold costs of `generate` and the trainer at N rows (issue 15's table).

Run: .venv/bin/python bench/scale.py [--rows 1281167] [--tmp DIR] [--loader-batches M]

Builds, in a temporary folder under --tmp (deleted at the end), an ImageFolder of N tiny JPEGs in
1000 class folders (hard links to one 32 x 32 JPEG: listing and opening cost what real files
cost, decoding does not) and a synthetic store of the same N rows (random top-5 maps of 15 x 15
cells, 1000 classes). Each figure is measured in a fresh process (after its imports), with the
code this checkout holds:

- generate to its first written batch, into a new store and resuming the store half labelled, and
  from the same images as tar shards (1250 a shard, KEY.jpg + KEY.cls) into a new store:
  the teacher is a stub (a backend that returns zeros at once) so that only the start-up counts
  (listing, creating or checking the store, starting the loader workers, decoding one batch of 64
  at 64 px); `list_images` alone too;
- LabelStore open: seconds, and the resident memory it adds (current and peak);
- trainer loader workers: the private dirty memory of each worker (copy-on-write of the parent's
  objects) after its first batches and at the end of an epoch (or --loader-batches batches) of
  the trainer's TrainBatches / ShardedBatchSampler / batch_loader with decoding stubbed (each
  image a constant 8 x 8 crop; the store's gather is real), 2 workers, batch 256;
- 256 random rows gathered from a cold store (its files' pages evicted with
  posix_fadvise(POSIX_FADV_DONTNEED), not a global cache drop) and again warm, with the bytes
  read from disk (/proc/self/io read_bytes) for the cold gather;
- `--local-labels 7` targets of a batch of 256 against the dense way (bench/local_targets.py).

Prints one line per figure and, with --json FILE, writes them all.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TOPK, MAP, CLASSES = 5, 15, 1000
TEACHER, TEACHER_SIZE = "efficientnet_lite0", 64
HERE = Path(__file__).resolve().parent


# --- building the data --------------------------------------------------------------------------


def tiny_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def sample_paths(rows: int) -> list[tuple[str, int]]:
    """(relative path, class) of N images spread over the 1000 ImageNet class folders (wnids, so
    that generate gives each folder its teacher class, as a real ImageNet tree), in sorted path
    order."""
    from trt_relabel.classes import imagenet_synsets

    wnids = imagenet_synsets()
    per_class = -(-rows // CLASSES)
    return [(f"{wnids[row // per_class]}/img_{row:08d}.JPEG", row // per_class) for row in range(rows)]


def build_tree(root: Path, samples: list[tuple[str, int]]) -> None:
    """The ImageFolder: every image a hard link to one tiny JPEG (a copy per class folder: ext4
    allows 65,000 links to a file)."""
    data = tiny_jpeg()
    (root.parent / "tiny.jpg").write_bytes(data)
    sources = root.parent / "sources"
    sources.mkdir()
    for folder in sorted({path.split("/")[0] for path, _ in samples}):
        (root / folder).mkdir(parents=True)
        (sources / folder).write_bytes(data)
    for path, _ in samples:
        os.link(sources / path.split("/")[0], root / path)


def build_shards(root: Path, samples: list[tuple[str, int]], per_shard: int = 1250) -> None:
    """The same images as WebDataset tar shards of `per_shard` images (KEY.jpg + KEY.cls), the
    ustar headers made here (tarfile's addfile is ~10x slower: minutes at a million members)."""
    data = (root.parent / "tiny.jpg").read_bytes()
    root.mkdir()
    for start in range(0, len(samples), per_shard):
        with open(root / f"train-{start // per_shard:06d}.tar", "wb") as tar:
            for path, label in samples[start : start + per_shard]:
                key = path.replace("/", "_").removesuffix(".JPEG")
                for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                    tar.write(ustar_header(name.encode(), len(payload)))
                    tar.write(payload + bytes(-len(payload) % 512))
            tar.write(bytes(1024))  # the end of the archive


def ustar_header(name: bytes, size: int) -> bytes:
    """The 512-byte ustar header of a regular file `name` (< 100 bytes) of `size` bytes."""
    header = bytearray(512)
    header[: len(name)] = name
    header[100:136] = b"0000644\x000000000\x000000000\x00" + b"%011o\x00" % size
    header[136:157] = b"00000000000\x00        0"  # mtime, checksum as spaces, type: a file
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


def stub_spec():
    from trt_relabel.store_format import StoreSpec
    from trt_relabel.teacher import get_teacher_config

    config = get_teacher_config(TEACHER, TEACHER_SIZE)
    return StoreSpec(config.name, "bench-stub", "bench-stub", config.input_size, (MAP, MAP), TOPK, CLASSES)


def build_store(path: Path, samples: list[tuple[str, int]], labelled: int, chunk: int = 8192) -> None:
    """The synthetic store: rows [0, labelled) written with random maps (one random block reused),
    the others pending."""
    from trt_relabel.images import ImageEntry
    from trt_relabel.store import create_store

    rng = np.random.default_rng(0)
    values = -np.sort(-rng.normal(size=(chunk, TOPK, MAP, MAP)).astype(np.float32), axis=1).astype(np.float16)
    indices = rng.integers(0, CLASSES, size=(chunk, TOPK, MAP, MAP), dtype=np.int16)
    writer = create_store(path, stub_spec(), [ImageEntry(p, c) for p, c in samples])
    fill_rows(writer, 0, labelled, values, indices)


def fill_rows(writer, start: int, stop: int, values: np.ndarray, indices: np.ndarray) -> None:
    chunk = len(values)
    for begin in range(start, stop, chunk):
        end = min(begin + chunk, stop)
        writer.write(np.arange(begin, end), values[: end - begin], indices[: end - begin])
    writer.finish()


def complete_store(path: Path, chunk: int = 8192) -> None:
    from trt_relabel.store import LabelStore, StoreWriter

    store = LabelStore(path)
    writer = StoreWriter(store)
    pending = np.flatnonzero(~store.labelled())
    values, indices = store.gather(np.arange(chunk))
    fill_rows(writer, int(pending[0]), len(store), values, indices)


# --- children: one measurement per fresh process ----------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Start the peak resident size (VmHWM) over from the current one (Linux clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def private_dirty_mb(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:")) / 1024


def disk_read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes")).split()[1])


class FirstBatchWritten(Exception):
    pass


def child_generate(data: str, out: str) -> dict:
    """Seconds from the generate() call to its first written batch, with a stub teacher."""
    import trt_relabel.backends as backends
    import trt_relabel.generate as generate_module
    from trt_relabel.export import GraphMetadata
    from trt_relabel.store import StoreWriter
    from trt_relabel.teacher import get_teacher_config

    config = get_teacher_config(TEACHER, TEACHER_SIZE)
    spec = stub_spec()
    metadata = GraphMetadata(
        teacher=spec.teacher, architecture="stub", input_size=spec.input_size, mean=(0.0,) * 3, std=(1.0,) * 3,
        interpolation=config.interpolation, topk=TOPK, num_classes=CLASSES, map_size=(MAP, MAP), precision="fp32",
        teacher_hash=spec.teacher_hash,
    )  # fmt: skip

    class StubBackend(backends.Backend):
        name = "stub"
        graph_sha256 = spec.graph_sha256

        def __init__(self) -> None:
            self.metadata = metadata

        def __call__(self, pixels):
            zeros = np.zeros((len(pixels), TOPK, MAP, MAP), np.float32)
            return zeros, np.broadcast_to(np.arange(TOPK, dtype=np.int32)[:, None, None], zeros.shape).copy()

    backends.open_backend = lambda *args, **kwargs: StubBackend()
    written = {}
    original_write = StoreWriter.write

    def write(self, rows, values, indices):
        original_write(self, rows, values, indices)
        written["seconds"] = time.perf_counter() - started
        raise FirstBatchWritten

    StoreWriter.write = write
    started = time.perf_counter()
    with contextlib.suppress(FirstBatchWritten):
        generate_module.generate(
            data, out, teacher=TEACHER, size=TEACHER_SIZE, batch_size=64, workers=1, progress=False
        )
    return {"first_batch_s": written["seconds"]}


def child_list_images(data: str) -> dict:
    from trt_relabel.images import list_images

    started = time.perf_counter()
    count = len(list_images(data))
    return {"list_images_s": time.perf_counter() - started, "images": count}


def child_open(store: str) -> dict:
    from trt_relabel.store import LabelStore

    reset_peak_rss()
    before = rss_mb()
    started = time.perf_counter()
    opened = LabelStore(store)
    seconds = time.perf_counter() - started
    return {"open_s": seconds, "rss_added_mb": rss_mb() - before, "peak_added_mb": peak_rss_mb() - before,
            "rows": len(opened)}  # fmt: skip


def evict(store: Path) -> None:
    """Drop the page cache of the store's files (POSIX_FADV_DONTNEED after an fsync)."""
    for file in store.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child_gather(store: str, repeats: int = 5) -> dict:
    """Median cold (evicted) and warm ms of gathering 256 random rows, and the cold bytes read."""
    from trt_relabel.store import LabelStore

    rng = np.random.default_rng(0)
    cold, warm, read = [], [], []
    for _ in range(repeats):
        evict(Path(store))
        opened = LabelStore(store)
        rows = rng.choice(len(opened), 256, replace=False)
        before, started = disk_read_bytes(), time.perf_counter()
        opened.gather(rows)
        cold.append(time.perf_counter() - started)
        read.append(disk_read_bytes() - before)
        started = time.perf_counter()
        opened.gather(rows)
        warm.append(time.perf_counter() - started)
    return {"cold_ms": 1e3 * statistics.median(cold), "cold_read_mib": statistics.median(read) / 2**20,
            "warm_ms": 1e3 * statistics.median(warm)}  # fmt: skip


class StubTransform:
    """What TrainTransform returns, for a constant 8 x 8 crop (decoding and augmenting stubbed)."""

    size = (8, 8)

    def __call__(self, picture):
        import torch

        return torch.zeros(3, 8, 8), np.array([0.0, 0.0, 1.0, 1.0], np.float32), False


def child_loader(data: str, store: str, max_batches: int, workers: int = 2, batch: int = 256) -> dict:
    """Private dirty MB of each loader worker after its first batches and at the end."""
    import trt_relabel.data as data_module
    from trt_relabel.data import ShardedBatchSampler, TrainBatches, batch_loader, data_entries, trainable_rows
    from trt_relabel.store import LabelStore

    data_module.load_readable = lambda inputs, entries, positions: (list(positions), [None] * len(positions), ())
    opened = LabelStore(store)
    entries, inputs = data_entries(data, "--data")
    rows, _, _ = trainable_rows(opened, len(entries))
    sampler = ShardedBatchSampler(rows, batch, shuffle=True, drop_last=True)
    loader = batch_loader(TrainBatches(inputs, entries, StubTransform(), opened), sampler, workers=workers)
    batches = min(len(sampler), max_batches)
    first: list[float] = []
    started = time.perf_counter()
    iterator = iter(loader)
    for n in range(batches):
        next(iterator)
        if n == 4 * workers:
            first = [private_dirty_mb(w.pid) for w in iterator._workers]
    last = [private_dirty_mb(w.pid) for w in iterator._workers]
    seconds = time.perf_counter() - started
    del iterator
    return {"batches": batches, "worker_first_mb": first, "worker_last_mb": last,
            "worker_growth_mb": max(b - a for a, b in zip(first, last, strict=True)), "seconds": seconds}  # fmt: skip


def child_local_targets(threads: int) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from local_targets import compare

    if threads:
        torch.set_num_threads(threads)
    return {**compare(256, 7), "threads": torch.get_num_threads()}


CHILDREN = {
    "generate": child_generate,
    "list_images": child_list_images,
    "open": child_open,
    "gather": child_gather,
    "loader": child_loader,
    "local_targets": child_local_targets,
}


def run_child(name: str, *arguments) -> dict:
    """Run CHILDREN[name](*arguments) in a fresh Python process; its JSON result."""
    command = [sys.executable, __file__, "--child", name, *map(str, arguments)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- main ---------------------------------------------------------------------------------------


def measure(root: Path, rows: int, loader_batches: int, threads: int, shards: bool) -> dict:
    figures: dict[str, dict] = {}

    def step(label: str, function, *arguments):
        started = time.perf_counter()
        result = function(*arguments)
        print(f"  [{time.perf_counter() - started:6.1f} s] {label}", file=sys.stderr, flush=True)
        return result

    samples = sample_paths(rows)
    data, store = root / "data", root / "store"
    step(f"built {rows} files", build_tree, data, samples)
    step("built the half-labelled store", build_store, store, samples, rows // 2)
    figures["list_images"] = step("list_images", run_child, "list_images", data)
    figures["generate_new"] = step("generate, new store", run_child, "generate", data, root / "new-store")
    shutil.rmtree(root / "new-store")
    figures["generate_resumed"] = step("generate, resumed store", run_child, "generate", data, store)
    if shards:
        step("built the tar shards", build_shards, root / "shards", samples)
        figures["generate_shards"] = step("generate, tar shards", run_child, "generate", root / "shards", root / "s")
        shutil.rmtree(root / "s")
    step("completed the store", complete_store, store)
    figures["open"] = step("LabelStore open", run_child, "open", store)
    figures["gather"] = step("cold and warm gathers", run_child, "gather", store)
    figures["loader"] = step("loader epoch", run_child, "loader", data, store, loader_batches)
    figures["local_targets"] = step("local-labels targets", run_child, "local_targets", threads)
    return figures


def report(rows: int, figures: dict) -> None:
    g_new, g_res = figures["generate_new"], figures["generate_resumed"]
    o, c, ld, lt = figures["open"], figures["gather"], figures["loader"], figures["local_targets"]
    print(f"N = {rows} rows, {os.cpu_count()} cores")
    print(
        f"generate to its first written batch (stub teacher): new {g_new['first_batch_s']:.1f} s, "
        f"resumed half-done {g_res['first_batch_s']:.1f} s (list_images alone "
        f"{figures['list_images']['list_images_s']:.1f} s)   target <= 10 s"
    )
    if "generate_shards" in figures:
        print(f"generate to its first written batch from tar shards (1250 images a shard, new store): "
              f"{figures['generate_shards']['first_batch_s']:.1f} s (reading every tar header)")  # fmt: skip
    print(
        f"LabelStore open: {o['open_s']:.2f} s, +{o['rss_added_mb']:.0f} MB RSS (peak +{o['peak_added_mb']:.0f} MB)"
        "   target <= 0.5 s, <= +150 MB"
    )
    print(
        f"loader workers ({len(ld['worker_last_mb'])}, {ld['batches']} batches of 256, decoding stubbed): private "
        f"dirty MB {[round(m) for m in ld['worker_first_mb']]} -> {[round(m) for m in ld['worker_last_mb']]}, "
        f"growth {ld['worker_growth_mb']:.0f} MB ({ld['seconds']:.0f} s)   target <= +30 MB a worker"
    )
    print(
        f"256 random rows: cold {c['cold_ms']:.0f} ms reading {c['cold_read_mib']:.1f} MiB, warm {c['warm_ms']:.1f} ms"
        "   target <= 100 ms, <= 10 MiB"
    )
    print(f"--local-labels 7 targets, batch 256, {lt['threads']} threads: {lt['local_ms']:.0f} ms vs dense "
          f"{lt['dense_ms']:.0f} ms = "
          f"{lt['speedup']:.1f}x (with the loss {lt['speedup_with_loss']:.1f}x)   target >= 5x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--tmp", type=Path, default=None, help="parent of the temporary folder (default: $TMPDIR)")
    parser.add_argument("--loader-batches", type=int, default=10**9, help="at most this many loader batches")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the targets (default: torch's)")
    parser.add_argument("--no-shards", action="store_true", help="skip generate's start-up from tar shards")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, *arguments = args.child
        function = CHILDREN[name]
        typed = [int(a) if a.isdigit() else a for a in arguments]
        print(json.dumps(function(*typed)), flush=True)
        os._exit(0)  # no teardown: a stopped generate leaves its loader workers to the exit
    root = Path(tempfile.mkdtemp(prefix="trt-relabel-scale-", dir=args.tmp))
    started = time.perf_counter()
    try:
        figures = measure(root, args.rows, args.loader_batches, args.threads, not args.no_shards)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(args.rows, figures)
    print(f"({time.perf_counter() - started:.0f} s in all)")
    if args.json:
        args.json.write_text(json.dumps({"rows": args.rows, **figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
