"""The trainer: targets per label mode, CutMix with localized labels, local targets, config
loading, real training runs (loss falls, metrics, checkpoint, resume), torchrun with 2 CPU
processes and the CLI's refusal of a store that does not label the data."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import build_store

from trt_relabel.data import TrainBatch, TrainBatches, TrainTransform
from trt_relabel.errors import RelabelError, UsageError
from trt_relabel.images import list_images
from trt_relabel.pooling import label_pooling
from trt_relabel.shards import FolderInputs
from trt_relabel.store import LabelStore
from trt_relabel.targets import CutMix, cutmix_relabel_targets, local_targets, soft_cross_entropy
from trt_relabel.train_config import TrainConfig, load_config
from trt_relabel.trainer import Student, batch_targets, create_student, train

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "trt-relabel"
# Subprocesses run on the CPU (2 CPU processes), also on a GPU machine.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def label_store(image_folder, tmp_path_factory) -> Path:
    """A store of the 12 photos (maps of test_data.label_maps, 10 classes)."""
    return build_store(image_folder, tmp_path_factory.mktemp("trainer") / "store")


@pytest.fixture
def one_thread():
    """Torch ops on one thread: 2 busy cores make multi-threaded CPU kernels crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def column_maps(classes_of_columns: list[list[int]], logit: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 maps [B, 1, 8, 8] where every cell of column j of image b holds class
    classes_of_columns[b][j] with `logit`."""
    indices = torch.tensor(classes_of_columns)[:, None, None, :].expand(-1, 1, 8, 8)
    return torch.full(indices.shape, logit), indices


def logits_to_target(**scores: float) -> torch.Tensor:
    """softmax over 10 classes of the logits given as c<class>=value (0 elsewhere)."""
    logits = torch.zeros(10)
    for name, value in scores.items():
        logits[int(name[1:])] = value
    return logits.softmax(0)


# --- targets -------------------------------------------------------------------------------------


def test_cutmix_pools_what_each_image_shows():
    # Image 0: column j is class j; its crop is the middle half of the image, not flipped.
    # Image 1: column j is class 9 - j; its crop is the whole image, flipped.
    values, indices = column_maps([list(range(8)), [9 - j for j in range(8)]])
    boxes = torch.tensor([[0.25, 0.0, 0.75, 1.0], [0.0, 0.0, 1.0, 1.0]])
    flipped = torch.tensor([False, True])
    cutmix = CutMix(perm=torch.tensor([1, 0]), rect=(0, 0, 32, 64), size=64)  # the left half is pasted
    assert cutmix.kept == 0.5
    targets = cutmix_relabel_targets(values, indices, boxes, flipped, cutmix, 10)
    # Image 0 shows the right half of its crop (image columns 4, 5) and, on the left, the left
    # half of image 1's flipped crop = image 1's right half (columns 4..7 = classes 5, 4, 3, 2).
    expected0 = 0.5 * logits_to_target(c4=2, c5=2) + 0.5 * logits_to_target(c2=1, c3=1, c4=1, c5=1)
    # Image 1 shows the right half of its flipped crop = its left half (classes 9, 8, 7, 6) and
    # the left half of image 0's crop (image 0's columns 2, 3).
    expected1 = 0.5 * logits_to_target(c6=1, c7=1, c8=1, c9=1) + 0.5 * logits_to_target(c2=2, c3=2)
    torch.testing.assert_close(targets, torch.stack([expected0, expected1]))


def test_cutmix_visible_frame_around_a_central_patch():
    # Image 0: class 0 everywhere but the central 4 x 4 cells (class 1); image 1 the same with 2, 3.
    indices = torch.zeros(2, 1, 8, 8, dtype=torch.int64)
    indices[1] = 2
    indices[:, :, 2:6, 2:6] += 1
    values = torch.full(indices.shape, 4.0)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    cutmix = CutMix(perm=torch.tensor([1, 0]), rect=(16, 16, 48, 48), size=64)
    assert cutmix.kept == 0.75
    targets = cutmix_relabel_targets(values, indices, boxes, torch.tensor([False, False]), cutmix, 10)
    localized = 0.75 * logits_to_target(c0=4) + 0.25 * logits_to_target(c3=4)  # frame of 0, centre of 1
    torch.testing.assert_close(targets[0], localized)
    # The official area mix pools each whole crop: image 0 then also "sees" its covered centre.
    whole = label_pooling(values, indices, boxes, 10).softmax(1)
    area_mix = cutmix.mix(whole)
    torch.testing.assert_close(whole[0], logits_to_target(c0=3, c1=1))
    assert (area_mix[0] - localized).abs().max() > 0.05


def test_cutmix_pastes_pixels_and_mixes_one_hot_targets_by_area():
    images = torch.arange(3.0)[:, None, None, None].repeat(1, 3, 8, 8)
    cutmix = CutMix(perm=torch.tensor([2, 0, 1]), rect=(2, 0, 6, 4), size=8)
    mixed = cutmix.paste(images)
    assert (mixed[0, :, :4, 2:6] == 2).all() and (mixed[0, :, 4:] == 0).all() and (mixed[1, :, :4, 2:6] == 0).all()
    one_hot = torch.eye(3)
    torch.testing.assert_close(cutmix.mix(one_hot)[0], torch.tensor([0.75, 0.0, 0.25]))
    coverage = cutmix.cell_coverage(2)  # cells of 4 x 4 pixels; the patch covers half of the top two
    torch.testing.assert_close(coverage, torch.tensor([[0.5, 0.5], [0.0, 0.0]]))


def test_label_mode_targets():
    values, indices = column_maps([list(range(8))] * 2)
    batch = TrainBatch(
        images=torch.zeros(2, 3, 8, 8),
        labels=torch.tensor([7, 1]),
        boxes=torch.tensor([[0.0, 0.0, 0.25, 1.0], [0.5, 0.0, 1.0, 1.0]]),
        flipped=torch.tensor([False, True]),
        values=values,
        indices=indices,
    )
    targets = {
        mode: batch_targets(batch, TrainConfig(label_mode=mode, smoothing=0.1), 10, None)[0]
        for mode in ("relabel", "original", "smooth", "relabel+original")
    }
    relabel = torch.stack([logits_to_target(c0=2, c1=2), logits_to_target(c4=1, c5=1, c6=1, c7=1)])
    torch.testing.assert_close(targets["relabel"], relabel)  # columns 0-1 and 4-7; flips change nothing
    one_hot = torch.zeros(2, 10)
    one_hot[0, 7] = one_hot[1, 1] = 1
    torch.testing.assert_close(targets["original"], one_hot)
    torch.testing.assert_close(targets["smooth"], one_hot * 0.9 + 0.01)
    torch.testing.assert_close(targets["relabel+original"], (relabel + one_hot) / 2)


def test_local_targets_follow_the_flip():
    values, indices = column_maps([list(range(8))] * 2)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    cells = local_targets(values, indices, boxes, torch.tensor([False, True]), 10, 2).dense()
    assert cells.shape == (2, 10, 2, 2)
    left, right = logits_to_target(c0=1, c1=1, c2=1, c3=1), logits_to_target(c4=1, c5=1, c6=1, c7=1)
    torch.testing.assert_close(cells[0, :, 1, 0], left)
    torch.testing.assert_close(cells[0, :, 0, 1], right)
    torch.testing.assert_close(cells[1, :, 0, 0], right)  # mirrored: the left cell shows the right half
    torch.testing.assert_close(cells[1, :, 1, 1], left)


@pytest.mark.parametrize("with_cutmix", [False, True])
def test_local_targets_equal_the_mirrored_dense_softmax(with_cutmix):
    """Flipped boxes give the targets of softmax(label_pooling(..., S)) mirrored along x (and
    mixed by cell coverage under CutMix), and the loss from the sparse targets is the dense one."""
    generator = torch.Generator().manual_seed(0)
    values = 4 * torch.randn(8, 5, 15, 15, generator=generator)
    indices = torch.rand(8, 100, 15, 15, generator=generator).topk(5, dim=1).indices.to(torch.int16)
    values[1, :, :, :2] = 0.0  # scores of 0 add nothing
    corners = torch.rand(8, 2, 2, generator=generator).sort(dim=1).values
    boxes = torch.cat([torch.tensor([[0.0, 0.0, 1.0, 1.0], [-0.2, 0.1, 0.3, 0.4]]), corners.mT.reshape(8, 4)[2:]])
    flipped = torch.tensor([True, False, True, True, False, False, True, False])
    cutmix = CutMix(torch.randperm(8, generator=generator), (20, 10, 50, 64), 64) if with_cutmix else None

    cells = local_targets(values, indices, boxes, flipped, 100, 7, cutmix)

    # the softmax in float64: a float32 one over all 100 classes rounds more than the sparse one
    expected = label_pooling(values, indices, boxes, 100, output_size=7).double().softmax(1).float()
    expected = torch.where(flipped[:, None, None, None], expected.flip(3), expected)
    if cutmix is not None:
        cover = cutmix.cell_coverage(7)
        expected = (1 - cover) * expected + cover * expected[cutmix.perm]
    torch.testing.assert_close(cells.dense(), expected, atol=1e-7, rtol=1e-6)
    logits = torch.randn(8, 100, 7, 7, generator=generator)
    torch.testing.assert_close(cells.cross_entropy(logits), soft_cross_entropy(logits, expected))


def test_cell_logits_are_the_classifier_on_pooled_features(one_thread):
    torch.manual_seed(0)
    student = Student(create_student("resnet18", 10), cells=1).eval()
    with torch.no_grad():
        logits, cell_logits = student(torch.randn(2, 3, 64, 64))
    assert cell_logits.shape == (2, 10, 1, 1)
    torch.testing.assert_close(cell_logits[:, :, 0, 0], logits, rtol=1e-4, atol=1e-4)


# --- config --------------------------------------------------------------------------------------


def test_recipes_load_and_options_override(tmp_path):
    recipes = {p.stem: load_config(p) for p in sorted((REPO / "train").glob("*.toml"))}
    assert set(recipes) >= {"resnet50_relabel", "resnet50_relabel_cutmix", "resnet50_original"}
    relabel = recipes["resnet50_relabel"]
    assert (relabel.model, relabel.epochs, relabel.batch_size, relabel.lr) == ("resnet50", 300, 1024, 0.1)
    assert (relabel.warmup_epochs, relabel.weight_decay, relabel.image_size) == (5, 1e-4, 224)
    assert relabel.label_mode == "relabel" and relabel.cutmix == 0
    cutmix = recipes["resnet50_relabel_cutmix"]
    assert (cutmix.cutmix, cutmix.cutmix_beta, cutmix.label_mode) == (1.0, 1.0, "relabel")
    assert recipes["resnet50_original"].label_mode == "original"
    overridden = load_config(REPO / "train" / "resnet50_relabel.toml", epochs=3, data="d")
    assert overridden.epochs == 3 and overridden.data == Path("d") and overridden.lr == 0.1

    bad = tmp_path / "bad.toml"
    bad.write_text("lrr = 0.1\n")
    with pytest.raises(RelabelError, match=r"bad.toml: unknown key 'lrr'"):
        load_config(bad)
    bad.write_text('epochs = "ten"\n')
    with pytest.raises(RelabelError, match=r"epochs must be int, got 'ten'"):
        load_config(bad)
    with pytest.raises(UsageError, match="label_mode relabel needs --labels"):
        train(TrainConfig(data=tmp_path, out=tmp_path / "run"))


# --- training runs -------------------------------------------------------------------------------


def tiny_config(image_folder: Path, store: Path, out: Path, **changes) -> TrainConfig:
    """resnet18 at 64 px on the 12 photos, batch 4, 3 steps per epoch, no colour jitter."""
    settings = dict(
        data=image_folder, labels=store, out=out, model="resnet18", epochs=2, batch_size=4, image_size=64,
        lr=0.05, warmup_epochs=0.0, color_jitter=0.0, workers=0,
    )  # fmt: skip
    return TrainConfig(**{**settings, **changes})


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_resumes_exactly(image_folder, label_store, tmp_path, one_thread):
    real = tmp_path / "real.json"  # ReaL-style labels of the 12 photos in file-name order; one empty
    real.write_text(json.dumps([[0]] * 4 + [[1]] * 4 + [[]] + [[2]] * 3))
    # A warmup longer than the runs: the lr of a step does not depend on --epochs, so 2 epochs + a
    # resumed third must equal 3 epochs in one go.
    warmup = {"lr": 0.15, "warmup_epochs": 10.0}
    first = train(
        tiny_config(image_folder, label_store, tmp_path / "run", val=image_folder, real_labels=real, **warmup)
    )
    metrics = read_metrics(tmp_path / "run")
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics == first.metrics
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"] - 0.1
    for m in metrics:
        keys = {"epoch", "train_loss", "lr", "unreadable", "val_top1", "val_top5", "val_unreadable", "val_real"}
        assert set(m) == keys | {"img_per_s", "time"} and m["unreadable"] == m["val_unreadable"] == 0
        assert 0 <= m["val_top1"] <= m["val_top5"] <= 100 and 0 <= m["val_real"] <= 100 and m["img_per_s"] > 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["model"] == "resnet18"
    assert checkpoint["scheduler"]["last_epoch"] == 6 and checkpoint["optimizer"]["state"]

    with pytest.raises(RelabelError, match="already holds a run; pass --resume"):
        train(tiny_config(image_folder, label_store, tmp_path / "run"))
    resumed = train(tiny_config(image_folder, label_store, tmp_path / "run", epochs=3, resume=True, **warmup))
    assert [m["epoch"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3] and resumed.epochs == 3
    after = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert after["epoch"] == 3 and after["scheduler"]["last_epoch"] == 9

    # Resuming restores model, optimizer, schedule and RNG: epoch 3 as if never interrupted.
    straight = train(tiny_config(image_folder, label_store, tmp_path / "straight", epochs=3, **warmup))
    assert resumed.metrics[0]["train_loss"] == pytest.approx(straight.metrics[2]["train_loss"], rel=1e-5)
    reference = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    for name, tensor in reference.items():
        torch.testing.assert_close(after["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_local_labels_and_cutmix_train_with_loader_workers(image_folder, label_store, tmp_path, one_thread):
    config = tiny_config(
        image_folder, label_store, tmp_path / "run", epochs=1, label_mode="relabel+original",
        local_labels=2, local_weight=0.5, cutmix=1.0, workers=1,
    )  # fmt: skip
    result = train(config)
    assert math.isfinite(result.metrics[0]["train_loss"]) and result.metrics[0]["train_loss"] > 0
    assert result.metrics[0]["val_top1"] is None


def test_failed_rows_are_skipped_in_relabel_modes(image_folder, tmp_path, one_thread):
    store = build_store(image_folder, tmp_path / "store", failed=(0, 5, 6, 11))
    result = train(tiny_config(image_folder, store, tmp_path / "run", epochs=1, batch_size=8))
    assert result.skipped_rows == 4 and len(result.metrics) == 1
    baseline = train(tiny_config(image_folder, store, tmp_path / "base", epochs=1, batch_size=8, label_mode="original"))
    assert baseline.skipped_rows == 0


def test_non_finite_store_rows_are_skipped(image_folder, tmp_path, one_thread):
    from test_store import poison

    store = build_store(image_folder, tmp_path / "store", failed=(0, 5))
    poison(store, {6: math.nan, 11: math.inf})  # as an older version or an edit could leave them
    result = train(tiny_config(image_folder, store, tmp_path / "run", epochs=1, batch_size=8))
    assert result.skipped_rows == 4 and math.isfinite(result.metrics[0]["train_loss"])
    weights = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_training_stops_at_a_non_finite_loss_keeping_the_last_good_epoch(
    image_folder, label_store, tmp_path, one_thread
):
    # lr 1e30 makes the weights overflow within two steps. Epoch 1 runs in a warmup of 1e40 epochs
    # (lr ~1e-11); the resumed epoch 2, without warmup, at the full 1e30.
    run = tmp_path / "run"
    train(tiny_config(image_folder, label_store, run, epochs=1, lr=1e30, warmup_epochs=1e40))
    good = torch.load(run / "checkpoint.pt", weights_only=True)
    with pytest.raises(
        RelabelError, match=r"loss is not finite .* at epoch 2, step \d: training stopped; .*checkpoint"
    ):
        train(tiny_config(image_folder, label_store, run, epochs=2, resume=True, lr=1e30))
    assert [m["epoch"] for m in read_metrics(run)] == [1] and math.isfinite(read_metrics(run)[0]["train_loss"])
    kept = torch.load(run / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == 1
    for name, tensor in good["model"].items():
        assert torch.isfinite(tensor).all() and torch.equal(kept["model"][name], tensor), name

    # The CLI: one line, exit 1, nothing saved by a run that diverges in its first epoch.
    command = [str(CLI), "train", "--data", str(image_folder), "--labels", str(label_store), "--out",
               str(tmp_path / "new"), "--model", "resnet18", "--image-size", "64", "--batch-size", "4",
               "--epochs", "1", "--lr", "1e30", "--workers", "0"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
    assert done.returncode == 1, done.stderr[-2000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "loss is not finite" in error[0] and "no checkpoint was saved" in error[0]
    assert "Traceback" not in done.stderr and not (tmp_path / "new" / "checkpoint.pt").exists()
    assert read_metrics(tmp_path / "new") == []


#: `trt-relabel train ARGS...` killed with SIGKILL while it writes its first checkpoint.
DYING_TRAIN = """
import os, signal, sys
from trt_relabel import trainer
from trt_relabel.cli import main
from trt_relabel.fileio import atomic_file

def save_and_die(path, state):
    with atomic_file(path) as f:
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

trainer.save_checkpoint = save_and_die
main()
"""


def test_the_next_run_removes_the_checkpoint_a_killed_run_was_writing(image_folder, label_store, tmp_path, one_thread):
    from test_fileio import leftovers, start_writer, stop

    run = tmp_path / "run"
    args = ["train", "--data", image_folder, "--labels", label_store, "--out", run, "--model", "resnet18",
            "--image-size", "64", "--batch-size", "4", "--epochs", "1", "--workers", "0", "--lr", "0.05"]  # fmt: skip
    command = [sys.executable, "-c", DYING_TRAIN, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV)
    assert done.returncode == -9, done.stderr[-3000:]
    assert len(leftovers(run)) == 1 and leftovers(run)[0].startswith(".checkpoint.pt.")
    live = start_writer(run / "checkpoint.pt")  # another process writing there now: its file stays
    try:
        train(tiny_config(image_folder, label_store, run, epochs=1, color_jitter=0.4))  # the same run
        assert len(leftovers(run)) == 1 and f"-{live.pid}-" in leftovers(run)[0]
    finally:
        stop(live)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_torchrun_two_cpu_processes(image_folder, label_store, tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text('model = "resnet18"\nimage_size = 64\nbatch_size = 4\nlr = 0.05\nepochs = 5\nworkers = 0\n')
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(CLI), "train",
        "--config", str(recipe), "--epochs", "2", "--data", str(image_folder), "--labels", str(label_store),
        "--out", str(tmp_path / "run"), "--val", str(image_folder),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert [m["epoch"] for m in metrics] == [1, 2]  # written once, by rank 0
    assert all(math.isfinite(m["train_loss"]) and m["val_top5"] is not None for m in metrics)
    assert done.stderr.count("trained 2 epochs") == 1
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_cli_refuses_a_store_of_other_images(image_folder, label_store, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "coffee" / "coffee.jpg").rename(data / "coffee" / "coffee_renamed.jpg")
    command = [str(CLI), "train", "--data", str(data), "--labels", str(label_store), "--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
    assert done.returncode == 1
    message = done.stderr.strip()
    assert "\n" not in message and message.startswith("error:")
    assert "first difference at row 4: 'coffee/coffee.jpg' in the store, 'coffee/coffee_crop.jpeg'" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_images_are_skipped_and_counted(image_folder, label_store, tmp_path, one_thread, workers):
    """Images damaged after labelling (an empty file, a cut JPEG) are left out of their batches and
    counted in metrics.jsonl, in the loader process itself and in worker processes; the epoch and
    its checkpoint are kept."""
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "cat" / "chelsea.jpg").write_bytes(b"")
    cut = data / "coffee" / "coffee.jpg"
    cut.write_bytes(cut.read_bytes()[:2000])
    entries = list_images(data)
    bad = [row for row, e in enumerate(entries) if e.path in ("cat/chelsea.jpg", "coffee/coffee.jpg")]
    dataset = TrainBatches(
        FolderInputs(data), entries, TrainTransform(32, (0, 0, 0), (1, 1, 1)), LabelStore(label_store)
    )
    good = [row for row in range(len(entries)) if row not in bad][:2]
    batch = dataset[[good[0], bad[0], good[1]]]
    assert batch.labels.tolist() == [entries[row].class_index for row in good]
    assert np.array_equal(batch.values.numpy(), LabelStore(label_store).values[good])
    assert batch.unreadable == (f"{data / 'cat/chelsea.jpg'}: empty file (0 bytes)",)

    result = train(tiny_config(data, label_store, tmp_path / "run", epochs=1, val=data, workers=workers))
    assert read_metrics(tmp_path / "run") == result.metrics
    assert (result.metrics[0]["unreadable"], result.metrics[0]["val_unreadable"]) == (2, 2)
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_batch_with_no_readable_image_stops_training(image_folder, label_store, tmp_path, one_thread):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    for image in data.rglob("*.*"):
        image.write_bytes(b"")
    with pytest.raises(RelabelError, match=r"^every image of a batch of 4 is unreadable, e\.g\. .*: empty file"):
        train(tiny_config(data, label_store, tmp_path / "run", epochs=1, workers=1))


def test_cli_progress_shows_the_loss_from_the_first_step(image_folder, label_store, tmp_path, monkeypatch, capsys):
    """The bar's loss: '-' before the first step (not nan), then the epoch's mean loss after every
    refresh interval (here 0 s: every step); the summary counts '1 epoch'."""
    import rich.progress

    from trt_relabel import trainer
    from trt_relabel.cli import main

    shown = []
    for method in ("add_task", "update"):
        original = getattr(rich.progress.Progress, method)

        def record(self, *args, _original=original, **fields):
            shown.append(fields.get("loss"))
            return _original(self, *args, **fields)

        monkeypatch.setattr(rich.progress.Progress, method, record)
    monkeypatch.setattr(trainer, "LOSS_REFRESH_SECONDS", 0.0)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text('model = "resnet18"\nimage_size = 64\nbatch_size = 4\nworkers = 0\ncolor_jitter = 0.0\n')
    args = ["train", "--config", recipe, "--epochs", "1", "--data", image_folder, "--labels", label_store]
    monkeypatch.setattr(sys, "argv", ["trt-relabel", *map(str, args), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)
    assert shown[0] == "-" and len(shown) == 4  # add_task, then 3 steps of 4 images
    assert all(math.isfinite(float(loss)) for loss in shown[1:])
    assert f"trained 1 epoch in {tmp_path / 'run'}; last epoch: loss" in capsys.readouterr().err
