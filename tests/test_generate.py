"""`generate` end to end on CPU: real photos, real ONNX Runtime sessions, real worker processes, a
real kill -9, real torchrun. The teacher runs at its default 475 (15 x 15 maps), sharing one export."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAT_CLASSES, COFFEE_CLASS
from PIL import Image

from trt_relabel.cli import main
from trt_relabel.generate import generate, ramp_batches
from trt_relabel.images import ImageEntry, list_images
from trt_relabel.pooling import label_pooling
from trt_relabel.store import LabelStore
from trt_relabel.store_format import StoreError

SIZE = 475
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def engines(bundled_graphs) -> Path:
    """The folder of the teacher's graphs at 475, exported once per test session (runs reuse them)."""
    return bundled_graphs.fp32.parent


def label(data: Path, out: Path, engines: Path, **options):
    options = {"batch_size": 4, "workers": 1, **options}
    return generate(data, out, size=SIZE, backend="onnxruntime", engines_dir=engines, progress=False, **options)


def cli_args(data: Path, out: Path, engines: Path, *extra: str) -> list[str]:
    return ["generate", str(data), "--out", str(out), "--size", str(SIZE), "--backend", "onnxruntime",
            "--engines-dir", str(engines), *extra]  # fmt: skip


def run_main(monkeypatch, capfd, args: list[str]) -> tuple[int, str]:
    """The CLI in this process: (exit code, stderr of this process and its worker processes)."""
    monkeypatch.setattr(sys, "argv", ["trt-relabel", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code or 0, capfd.readouterr().err


def assert_same_store(a: Path, b: Path) -> None:
    first, second = LabelStore(a), LabelStore(b)
    assert np.array_equal(first.values, second.values)
    assert np.array_equal(first.indices, second.indices)
    assert np.array_equal(np.load(a / "status.npy"), np.load(b / "status.npy"))
    for name in ("samples.tsv", "errors.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert first.complete and second.complete


def pooled_top(store: LabelStore, row: int, k: int = 1) -> list[int]:
    """Top-k classes of the row's label map pooled over the whole image (LabelPooling, full box)."""
    values, indices = (torch.from_numpy(a[None].astype(np.float32 if a.dtype == np.float16 else np.int64))
                       for a in store[row])  # fmt: skip
    pooled = label_pooling(values, indices, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), store.num_classes)
    return pooled[0].topk(k).indices.tolist()


@pytest.fixture(scope="module")
def reference(image_folder, engines, tmp_path_factory) -> Path:
    """An uninterrupted one-process run over the ImageFolder: what every other way must equal."""
    out = tmp_path_factory.mktemp("reference") / "store"
    result = label(image_folder, out, engines)
    assert (result.rows, result.labelled, result.failed, result.processed) == (12, 12, 0, 12)
    assert result.complete and result.backend.startswith("onnxruntime")
    warmup_rows, warmup_seconds = result.warmup  # the first batch of 4
    assert warmup_rows == 4 and 0 < warmup_seconds < result.seconds
    assert result.steady_images_per_second == pytest.approx(8 / (result.seconds - warmup_seconds))
    return out


def test_image_folder_labels(reference, image_folder):
    store = LabelStore(reference)
    # cat, coffee, uniform are no ImageNet class ids: rows in listing order, no teacher class.
    assert [s.path for s in store.samples] == [e.path for e in list_images(image_folder)]
    assert {s.class_index for s in store.samples} == {-1}
    assert store.labelled().all() and store.errors() == []
    assert (store.map_size, store.topk, store.manifest["input_size"]) == ((15, 15), 5, SIZE)
    values = store.values.astype(np.float32)
    assert (np.diff(values, axis=1) <= 0).all()  # top-k logits descend along k
    for row, sample in enumerate(store.samples):
        top = pooled_top(store, row, 2)
        if sample.path in ("coffee/coffee.jpg", "coffee/coffee_flip.png"):
            assert top[0] == COFFEE_CLASS, sample.path
        if sample.path.startswith("coffee/"):  # crops and halves: espresso or consomme first
            assert COFFEE_CLASS in top, sample.path
        if sample.path.startswith("cat/"):
            assert top[0] in CAT_CLASSES, sample.path


def test_device_option(reference, image_folder, engines, tmp_path, monkeypatch, capfd):
    """--device cpu labels on the CPU what the default run labelled; a GPU device without CUDA, or cpu
    with the GPU-only backend, is one line and no store."""
    code, err = run_main(monkeypatch, capfd, cli_args(image_folder, tmp_path / "cpu", engines, "--device", "cpu"))
    assert code == 0, err
    assert_same_store(reference, tmp_path / "cpu")
    refused = [(["--device", "cpu", "--backend", "tensorrt"], 2, "--device cpu cannot be combined with --backend")]
    if not torch.cuda.is_available():
        refused.append((["--device", "cuda:0"], 1, "device cuda:0: no CUDA GPU is available here"))
    for extra, exit_code, message in refused:
        code, err = run_main(monkeypatch, capfd, cli_args(image_folder, tmp_path / "refused", engines, *extra))
        assert (code, err.count("error:")) == (exit_code, 1) and message in err and "Traceback" not in err, err
        assert not (tmp_path / "refused").exists()


def test_flat_folder(reference, image_folder, engines, tmp_path):
    """The same picture gets the same labels whatever the layout; rows follow the sorted paths."""
    reference_store = LabelStore(reference)
    row_of = {s.path: i for i, s in enumerate(reference_store.samples)}
    copies = {"coffee.jpg": "coffee/coffee.jpg", "chelsea_flip.png": "cat/chelsea_flip.png",
              "more/grace_hopper_small.JPEG": "uniform/grace_hopper_small.JPEG"}  # fmt: skip
    for name, source in copies.items():
        (tmp_path / "flat" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image_folder / source, tmp_path / "flat" / name)
    label(tmp_path / "flat", tmp_path / "flat_store", engines)
    store = LabelStore(tmp_path / "flat_store")
    assert store.samples == [ImageEntry(name, -1) for name in sorted(copies)]
    expected = reference_store.gather([row_of[copies[name]] for name in sorted(copies)])
    assert np.array_equal(store.values, expected[0]) and np.array_equal(store.indices, expected[1])


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_mixed_folder(root: Path, photo: np.ndarray) -> tuple[list[str], dict[str, str]]:
    """Odd but valid images and bad inputs side by side. Returns (odd names, {bad name: reason part})."""
    root.mkdir()
    img = Image.fromarray(photo).resize((150, 100))
    img.save(root / "plain.jpg")
    img.convert("CMYK").save(root / "cmyk.jpg")
    img.convert("L").save(root / "grey.png")
    img.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette_transparent.png", transparency=0)
    rgba = img.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(img.size))
    rgba.save(root / "alpha.png")
    Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257).save(root / "grey16.png")
    assert Image.open(root / "grey16.png").mode == "I;16"

    png, jpeg = io.BytesIO(), io.BytesIO()
    img.save(png, "PNG")
    img.save(jpeg, "JPEG")
    corrupt = bytearray(png.getvalue())
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 40] = bytes(40)
    (root / "corrupt.png").write_bytes(bytes(corrupt))
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    # A 30000 x 30000 PNG header over a few bytes of data: must be refused, never allocated.
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(bytes(64)))
    (root / "bomb.png").write_bytes(bomb + _chunk(b"IEND", b""))
    # Inputs that cannot be read (chmod 000 does not stop root): named by a file list only, as
    # the folder listing keeps regular files.
    (root / "folder.jpg").mkdir()
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    odd = ["alpha.png", "cmyk.jpg", "grey.png", "grey16.png", "palette_transparent.png", "plain.jpg"]
    bad = {
        "bomb.png": "decompression bomb",
        "corrupt.png": "corrupt",
        "dangling.jpg": "not found",
        "empty.jpg": "empty file",
        "folder.jpg": "directory",
        "gone.jpg": "not found",
        "text.jpg": "not an image",
        "truncated.jpg": "truncated",
    }
    if os.geteuid() != 0:
        (root / "locked.jpg").write_bytes(jpeg.getvalue())
        (root / "locked.jpg").chmod(0)
        bad["locked.jpg"] = "permission denied"
    return odd, bad


def test_odd_and_bad_inputs(photos, engines, tmp_path, monkeypatch, capfd):
    data = tmp_path / "mixed"
    odd, bad = make_mixed_folder(data, photos["coffee"])
    listed = tmp_path / "list.txt"  # unsorted, with a comment, a blank line and a class index
    names = sorted([*odd, *bad], reverse=True)
    listed.write_text(
        "# odd and bad inputs\n\n" + "".join(f"{n}\t7\n" if n == "plain.jpg" else f"{n}\n" for n in names)
    )
    out = tmp_path / "store"
    code, err = run_main(monkeypatch, capfd, cli_args(data, out, engines, "--file-list", str(listed)))

    assert code == 1
    assert f"{len(bad)} failed (listed in {out / 'errors.jsonl'})" in err
    assert "Traceback" not in err
    store = LabelStore(out)
    assert [s.path for s in store.samples] == sorted(names)
    assert {s.class_index for s in store.samples if s.path != "plain.jpg"} == {-1}
    assert ImageEntry("plain.jpg", 7) in store.samples
    labelled = {s.path for s, ok in zip(store.samples, store.labelled(), strict=True) if ok}
    assert labelled == set(odd)
    errors = store.errors()
    assert [e["path"] for e in errors] == sorted(bad)  # one line each, in row order
    for entry in errors:
        assert bad[entry["path"]] in entry["reason"], entry
    row_of = {s.path: i for i, s in enumerate(store.samples)}
    # CMYK decodes to the picture the plain JPEG holds: the same leading classes.
    assert set(pooled_top(store, row_of["cmyk.jpg"], 2)) == set(pooled_top(store, row_of["plain.jpg"], 2))
    # 16-bit grey scales down to exactly the 8-bit grey picture.
    assert np.array_equal(store.values[row_of["grey16.png"]], store.values[row_of["grey.png"]])


def test_kill_9_then_resume_equals_an_uninterrupted_run(reference, image_folder, engines, tmp_path):
    out = tmp_path / "store"
    command = [str(BIN / "trt-relabel"), *cli_args(image_folder, out, engines, "--batch-size", "1", "--workers", "0")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for_a_labelled_row(process, out / "status.npy")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    pending = 12 - int(LabelStore(out).labelled().sum())
    assert 0 < pending < 12, "the run was not interrupted mid-way"

    result = label(image_folder, out, engines)
    assert result.processed == pending and result.complete
    assert_same_store(out, reference)


def test_ctrl_c_says_what_is_kept_and_a_rerun_resumes(reference, image_folder, engines, tmp_path):
    """SIGINT to the run's process group (as Ctrl-C in a terminal, decoding worker included): exit
    code 130 and one line with the rows kept; rerunning the same command labels the rest."""
    out = tmp_path / "store"
    command = [str(BIN / "trt-relabel"), *cli_args(image_folder, out, engines, "--batch-size", "1", "--workers", "1")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for_a_labelled_row(process, out / "status.npy")
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    labelled = int(LabelStore(out).labelled().sum())
    assert process.returncode == 130 and 0 < labelled < 12, err.decode()
    assert err.decode().splitlines()[-1] == (
        f"interrupted: {labelled} of 12 images of {out} are labelled and kept; rerun the same command to resume"
    )
    assert "Traceback" not in err.decode()
    result = label(image_folder, out, engines)
    assert result.processed == 12 - labelled and result.complete
    assert_same_store(out, reference)


#: `trt-relabel generate ARGS...` killed with SIGKILL at a moment: "building" (the new store is being
#: preallocated beside --out) or "finishing" (errors.jsonl is being rewritten inside the store).
DYING_GENERATE = """
import os, signal, sys
from trt_relabel import fileio, store
from trt_relabel.cli import main

def die():
    os.kill(os.getpid(), signal.SIGKILL)

preallocate, write_atomic = store._preallocate, store.write_atomic

def preallocate_or_die(path, *args):
    preallocate(path, *args)
    if moment == "building" and path.name == store.INDICES:
        die()

def write_or_die(path, data):
    if moment == "finishing" and path.name == store.ERRORS:
        with fileio.atomic_file(path) as f:
            f.write(data.encode())
            f.flush()
            die()
    write_atomic(path, data)

moment = sys.argv.pop(1)
store._preallocate, store.write_atomic = preallocate_or_die, write_or_die
main()
"""


def test_the_next_run_removes_what_killed_runs_left(reference, image_folder, engines, tmp_path):
    from test_fileio import leftovers, start_writer, stop

    out = tmp_path / "store"
    args = cli_args(image_folder, out, engines, "--workers", "0", "--batch-size", "12")
    for moment, left in (("building", tmp_path), ("finishing", out)):
        done = subprocess.run([sys.executable, "-c", DYING_GENERATE, moment, *args], capture_output=True, timeout=300)
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-3000:]
        assert len(leftovers(left)) == 1, leftovers(left)  # the half-built store, then the errors.jsonl being written
    assert leftovers(tmp_path) == []  # the second run removed the first one's half-built store
    assert leftovers(out)[0].startswith(".errors.jsonl.")

    live = start_writer(out / "manifest.json")  # a live process writing the manifest: its temporary stays
    try:
        result = label(image_folder, out, engines)
        assert result.processed == 0 and result.complete
        assert len(leftovers(out)) == 1 and leftovers(out)[0].startswith(
            f".manifest.json.{socket.gethostname()}-{live.pid}-"
        )
    finally:
        stop(live)
    assert_same_store(out, reference)


def test_a_second_writer_of_the_same_rows_is_refused(reference, image_folder, engines, tmp_path, monkeypatch, capfd):
    out = tmp_path / "store"
    args = cli_args(image_folder, out, engines, "--batch-size", "1", "--workers", "0", "--shard", "0/2")
    first = subprocess.Popen([str(BIN / "trt-relabel"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_a_labelled_row(first, out / "status.npy")
        first.send_signal(signal.SIGSTOP)  # paused mid-run, its rows' lock still held
        status = np.load(out / "status.npy").copy()
        assert 0 < (status == 1).sum() < 6
        holder = f"process {first.pid} on {socket.gethostname()}"
        for same_rows in (args, cli_args(image_folder, out, engines)):  # the same command; every row
            code, err = run_main(monkeypatch, capfd, same_rows)
            assert code == 2 and holder in err and "a second writer of the same rows is refused" in err, err
            assert len(err.strip().splitlines()) == 1 and np.array_equal(np.load(out / "status.npy"), status)
        code, err = run_main(monkeypatch, capfd, [*cli_args(image_folder, out, engines), "--overwrite"])
        assert code == 2 and holder in err and "cannot be deleted now" in err
        other = label(image_folder, out, engines, shard=(1, 2))  # other rows: the store is shared
        assert (other.labelled, other.complete) == (6, False)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-3000:]
    assert_same_store(out, reference)  # the first one labelled the rest and completed the store


def _wait_for_a_labelled_row(process: subprocess.Popen, status_file: Path) -> None:
    """Poll the store's status (every 2 ms) until `process` has labelled a row."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if status_file.exists() and (np.load(status_file, mmap_mode="r") == 1).any():
            return
        time.sleep(0.002)
    raise AssertionError(f"the run ended before labelling a row: {process.stderr.read().decode()[-2000:]}")


def test_first_batches_ramp_up_to_the_batch_size():
    """The first batch is small, so that the progress bar moves soon; the rows stay in order."""
    batches = ramp_batches(300, 64)
    assert [len(b) for b in batches] == [8, 16, 32, 64, 64, 64, 52]
    assert [i for b in batches for i in b] == list(range(300))
    assert [len(b) for b in ramp_batches(5, 4)] == [4, 1] and ramp_batches(0, 64) == []


def test_progress_shows_a_rate_and_an_eta_after_the_first_update():
    from rich.console import Console

    from trt_relabel.progress import EtaColumn, progress_bar

    bar = progress_bar(Console(file=io.StringIO()))
    task_id = bar.add_task("labelling", total=100)
    time.sleep(0.05)
    bar.update(task_id, completed=10)
    task = bar.tasks[0]
    assert bar.columns[3].render(task).plain.endswith(" img/s") and float(bar.columns[3].render(task).plain[:-6]) > 0
    eta = EtaColumn().render(task).plain
    assert eta.startswith("ETA 0:00:") and eta != "ETA -:--:--"


def test_torchrun_two_processes_equal_one(reference, image_folder, engines, tmp_path):
    out = tmp_path / "store"
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python"]
    command = [*torchrun, str(BIN / "trt-relabel"), *cli_args(image_folder, out, engines, "--workers", "1")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "labelled 12 of 12 images" in done.stderr
    assert_same_store(out, reference)


def test_torchrun_refuses_one_gpu_for_every_rank(image_folder, engines, tmp_path):
    """Under torchrun each rank takes its local GPU: --device cuda:N (one GPU for all) is a usage error."""
    out = tmp_path / "store"
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python"]
    command = [*torchrun, str(BIN / "trt-relabel"), *cli_args(image_folder, out, engines, "--device", "cuda:1")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    ranks = done.stderr.split("failed (exitcode: 2)")  # what the ranks printed, then torchrun's own report
    assert done.returncode != 0 and len(ranks) > 1 and "Traceback" not in ranks[0], done.stderr[-3000:]
    assert done.stderr.count("error: --device cuda:1 cannot be combined with torchrun") == 2, done.stderr[-3000:]
    assert not out.exists()


def test_shards_equal_one_run(reference, image_folder, engines, tmp_path):
    out = tmp_path / "store"
    first = label(image_folder, out, engines, shard=(1, 2), batch_size=3)
    assert (first.rows, first.labelled, first.complete) == (6, 6, False)
    assert LabelStore(out).labelled().tolist() == [row % 2 == 1 for row in range(12)]
    second = label(image_folder, out, engines, shard=(0, 2), batch_size=5)
    assert (second.rows, second.labelled, second.complete) == (6, 6, True)
    assert_same_store(out, reference)


def test_retry_failed_labels_the_fixed_inputs(reference, image_folder, engines, tmp_path, monkeypatch, capfd):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    broken = data / "cat" / "chelsea.jpg"
    photo = broken.read_bytes()
    broken.write_bytes(b"not a picture")
    out = tmp_path / "store"
    first = label(data, out, engines)
    assert (first.labelled, first.failed, first.complete) == (11, 1, True)
    still_broken = label(data, out, engines, retry_failed=True)
    assert (still_broken.processed, still_broken.failed, still_broken.complete) == (1, 1, True)
    assert [e["path"] for e in LabelStore(out).errors()] == ["cat/chelsea.jpg"]  # listed once

    broken.write_bytes(photo)
    assert label(data, out, engines).processed == 0  # a plain rerun leaves failed rows alone
    code, err = run_main(monkeypatch, capfd, cli_args(data, out, engines, "--retry-failed"))
    assert code == 0 and "labelled 12 of 12 images; this run: 1 images" in err, err
    assert_same_store(out, reference)
    assert LabelStore(out).manifest["num_failed"] == 0


def test_links_the_listing_cannot_follow_fail_and_are_retried_once_fixed(image_folder, engines, tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "cat").mkdir(parents=True)
    outside.mkdir()
    photo = image_folder / "cat" / "chelsea.jpg"
    shutil.copy(photo, data / "cat" / "a.jpg")
    (data / "cat" / "b.jpg").symlink_to(outside / "b.jpg")  # its target is missing
    (data / "cat" / "c.jpg").symlink_to("c.jpg")  # a loop
    out = tmp_path / "store"
    first = label(data, out, engines)
    assert (first.rows, first.labelled, first.failed, first.complete) == (3, 1, 2, True)
    assert LabelStore(out).errors() == [
        {"path": "cat/b.jpg", "reason": f"broken symbolic link (target not found: {outside / 'b.jpg'})"},
        {"path": "cat/c.jpg", "reason": "symbolic link loop (too many levels of symbolic links)"},
    ]
    shutil.copy(photo, outside / "b.jpg")
    (data / "cat" / "c.jpg").unlink()
    shutil.copy(photo, data / "cat" / "c.jpg")
    fixed = label(data, out, engines, retry_failed=True)
    assert (fixed.processed, fixed.labelled, fixed.failed, fixed.complete) == (2, 3, 0, True)
    store = LabelStore(out)
    assert store.errors() == [] and store.manifest["num_failed"] == 0
    assert np.array_equal(store.values[0], store.values[1]) and np.array_equal(store.values[0], store.values[2])


def test_a_folder_that_could_not_be_listed_is_relabelled_once_fixed(image_folder, engines, tmp_path, monkeypatch):
    """A sub-folder that cannot be listed is one failed row; once readable, --retry-failed takes its
    images into the store (the other rows keep their labels), equal to a store made from scratch."""
    data = tmp_path / "data"
    for name in ("cat/a.jpg", "cat/locked/b.jpg", "cat/locked/c.png", "dog/d.jpg"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(
            image_folder / ("cat/chelsea.jpg" if name.endswith(".jpg") else "coffee/coffee_flip.png"), data / name
        )
    locked = data / "cat" / "locked"
    if os.geteuid() == 0:  # root reads any folder: the listing meets the error chmod 000 gives a user
        scandir = os.scandir

        def refuse_locked(path="."):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return scandir(path)

        monkeypatch.setattr(os, "scandir", refuse_locked)
    locked.chmod(0)
    out = tmp_path / "store"
    try:
        first = label(data, out, engines, workers=0)
    finally:
        locked.chmod(0o755)
        monkeypatch.undo()
    assert (first.rows, first.labelled, first.failed, first.complete) == (3, 2, 1, True)
    reason = "folder that cannot be listed (permission denied); its images are unknown"
    assert LabelStore(out).errors() == [{"path": "cat/locked", "reason": reason}]
    labels_of_a = LabelStore(out)[0]

    with pytest.raises(StoreError, match="'cat/locked' could not be listed when the store was made and now can"):
        label(data, out, engines)
    fixed = label(data, out, engines, retry_failed=True)
    assert (fixed.processed, fixed.rows, fixed.labelled, fixed.failed, fixed.complete) == (2, 4, 4, 0, True)
    store = LabelStore(out)
    assert [s.path for s in store.samples] == [e.path for e in list_images(data)]
    assert all(np.array_equal(a, b) for a, b in zip(store[0], labels_of_a, strict=True))
    label(data, tmp_path / "from_scratch", engines)
    assert_same_store(out, tmp_path / "from_scratch")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left beside the store


def test_mismatched_resume_is_refused(reference, image_folder, engines, tmp_path, monkeypatch, capfd):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    before = (out / "values.npy").read_bytes()
    code, err = run_main(monkeypatch, capfd, cli_args(image_folder, out, engines, "--topk", "3"))
    assert code == 1
    assert err.strip().splitlines() == [f"error: {out}: the store was built with topk=5 (this run: 3); "
                                        "pass --overwrite to start over"]  # fmt: skip
    listed = tmp_path / "list.txt"
    listed.write_text("cat/chelsea.jpg\n")
    code, err = run_main(monkeypatch, capfd, cli_args(image_folder, out, engines, "--file-list", str(listed)))
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "a different input list: 12 inputs (this run: 1)" in err
    assert (out / "values.npy").read_bytes() == before


def test_usage_errors(image_folder, engines, tmp_path, monkeypatch, capfd):
    (tmp_path / "empty").mkdir()
    cases = [
        (cli_args(tmp_path / "missing", tmp_path / "s", engines), "no such directory"),
        (cli_args(tmp_path / "empty", tmp_path / "s", engines), "no image files"),
        (cli_args(image_folder, tmp_path / "s", engines, "--shard", "2/2"), "expected I/N"),
        (cli_args(image_folder, tmp_path / "s", engines, "--shard", "0/2", "--overwrite"), "cannot be combined"),
        (cli_args(image_folder, tmp_path / "s", engines, "--file-list", str(tmp_path / "no.txt")), "no such file"),
    ]
    for args, message in cases:
        code, err = run_main(monkeypatch, capfd, args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_read_only_output_directory(image_folder, engines, tmp_path):
    """Root ignores permission bits, so the run drops the capabilities that let it (setpriv)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    command = [str(BIN / "trt-relabel"), *cli_args(image_folder, locked / "store", engines)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make a directory read-only for this run")
        caps = "-dac_override,-dac_read_search,-fowner"
        command = [setpriv, "--bounding-set", caps, "--inh-caps", caps, *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {locked}: cannot write the store there (permission denied)"
    ]  # fmt: skip
