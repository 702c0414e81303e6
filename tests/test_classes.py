"""Class folders and the teacher's classes: wnid folders of any subset, --class-map, the N-way student
of a subset (targets keep those N classes), --target-temperature, and what `stats` says about them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import NUM_CLASSES, build_store
from test_trainer import tiny_config

from trt_relabel.classes import (
    ClassList,
    imagenet_classes,
    map_folder_classes,
    read_class_map,
    read_class_names,
    student_classes,
)
from trt_relabel.cli import main
from trt_relabel.data import TrainBatch
from trt_relabel.errors import RelabelError
from trt_relabel.images import list_images
from trt_relabel.pooling import label_pooling, soft_target
from trt_relabel.store import LabelStore
from trt_relabel.targets import cutmix_relabel_targets, local_targets, relabel_targets
from trt_relabel.train_config import TrainConfig
from trt_relabel.trainer import batch_targets, train
from trt_relabel.visualize import store_stats

TABBY, ESPRESSO, SPACE_SHUTTLE = "n02123045", "n07920052", "n04266014"  # ImageNet classes 281, 967, 812


@pytest.fixture
def run_cli(monkeypatch, capfd):
    """The CLI in this process (no interpreter start per command): args -> CompletedProcess with
    the exit code, stdout and stderr."""

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["trt-relabel", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        captured = capfd.readouterr()
        return subprocess.CompletedProcess(args, exit_info.value.code or 0, captured.out, captured.err)

    return run


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def wnid_folder(image_folder, tmp_path) -> Path:
    """The sample photos with two class folders renamed to ImageNet wnids (a 2-of-1000 subset) and
    the third left as `uniform` (no ImageNet class id)."""
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "cat").rename(data / TABBY)
    (data / "coffee").rename(data / ESPRESSO)
    return data


# --- folder names -> teacher classes -------------------------------------------------------------


def test_wnid_folders_of_a_subset_get_imagenet_indices(wnid_folder, tmp_path):
    listed = list_images(wnid_folder)
    assert {e.class_index for e in listed} == {0, 1, 2}  # the listing: folder positions
    mapped, unmapped = map_folder_classes(listed, imagenet_classes())
    assert [e.path for e in mapped] == [e.path for e in listed]
    by_folder = {e.path.split("/")[0]: e.class_index for e in mapped}
    assert by_folder == {TABBY: 281, ESPRESSO: 967, "uniform": -1} and unmapped == ["uniform"]

    # A class map names the teacher class by id, name or index; it wins over the folder name.
    class_map = write(tmp_path / "map.tsv", f"# folder -> class\nuniform\tmilitary uniform\n{ESPRESSO}\t967\n")
    mapping = read_class_map(class_map, imagenet_classes())
    assert mapping == {"uniform": 652, ESPRESSO: 967}
    mapped, unmapped = map_folder_classes(listed, imagenet_classes(), mapping)
    assert {e.path.split("/")[0]: e.class_index for e in mapped} == {TABBY: 281, ESPRESSO: 967, "uniform": 652}
    assert unmapped == []
    assert read_class_map(write(tmp_path / "id.tsv", f"x\t{SPACE_SHUTTLE}\n"), imagenet_classes()) == {"x": 812}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("uniform 652\n", r"map.tsv:1: expected 'folder<TAB>teacher class'"),
        ("a\t1\nb\tno such class\n", r"map.tsv:2: 'no such class' is no class id, name or index of the teacher"),
        ("a\tcrane\n", r"class name 'crane' names 2 classes \(134, 517\); use its id"),
        ("a\t1000\n", r"'1000' is no class id, name or index"),
        ("a\t1\na\t2\n", r"map.tsv:2: folder 'a' is mapped twice"),
    ],
)
def test_bad_class_maps(tmp_path, text, message):
    with pytest.raises(RelabelError, match=message):
        read_class_map(write(tmp_path / "map.tsv", text), imagenet_classes())


def test_class_names_file(tmp_path):
    classes = read_class_names(write(tmp_path / "names.txt", "# my classes\ncat\ttabby cat\n\ncoffee\nuniform\t\n"))
    assert classes == ClassList(("cat", "coffee", "uniform"), ("tabby cat", "coffee", "uniform"))
    assert classes.index("tabby cat") == 0 and classes.index("uniform") == 2 and classes.index("1") == 1
    with pytest.raises(RelabelError, match=r"names.txt:3: class id 'cat' repeats line 1"):
        read_class_names(write(tmp_path / "names.txt", "cat\ncoffee\ncat\n"))
    with pytest.raises(RelabelError, match=r"lists no class"):
        read_class_names(write(tmp_path / "names.txt", "# nothing\n"))


def test_student_classes():
    imagenet = imagenet_classes()
    subset = student_classes([ESPRESSO, TABBY], ["n01440764", TABBY], classes=imagenet, teacher="t")
    assert subset.names == (ESPRESSO, TABBY) and subset.teacher == (967, 281)
    assert subset.labels == {ESPRESSO: 0, TABBY: 1, "n01440764": -1}  # a val folder the student lacks
    assert subset.output_of_teacher_class(281) == 1 and subset.output_of_teacher_class(0) == -1
    everything = student_classes(list(imagenet.ids), classes=imagenet)
    assert everything.teacher is None and len(everything.names) == 1000  # all 1000: the teacher's order
    with pytest.raises(RelabelError, match=r"1 class folder \('cat'\) is no class of the teacher t, so folder labels"):
        student_classes(["cat", TABBY], classes=imagenet, teacher="t")
    teacher_space = student_classes(["cat", TABBY], classes=imagenet, teacher="t", folder_labels=False)
    assert teacher_space.teacher is None and teacher_space.labels == {"cat": -1, TABBY: 281}
    with pytest.raises(RelabelError, match=r"'kitty' and 'n02123045' both map to the teacher class tabby \(281\)"):
        student_classes(["kitty", TABBY], classes=imagenet, class_map={"kitty": 281})
    no_teacher = student_classes(["b", "a"], ["a", "z"])
    assert no_teacher.names == ("b", "a") and no_teacher.labels == {"b": 0, "a": 1, "z": -1}


# --- targets: a subset and a temperature ---------------------------------------------------------


def random_maps(seed: int, batch: int = 4, classes: int = NUM_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-3 maps [B, 3, 4, 4]: logits descending, 3 distinct classes per cell."""
    generator = torch.Generator().manual_seed(seed)
    values = (torch.randn(batch, 3, 4, 4, generator=generator) * 2).sort(dim=1, descending=True).values
    indices = torch.stack([torch.randperm(classes, generator=generator)[:3] for _ in range(batch * 16)])
    return values, indices.view(batch, 4, 4, 3).permute(0, 3, 1, 2).contiguous()


def test_temperature_one_is_todays_target_bit_for_bit_and_lower_sharpens():
    values, indices = random_maps(0)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.7, 0.9], [0.5, 0.0, 1.0, 0.5], [0.0, 0.3, 0.4, 1.0]])
    pooled = label_pooling(values, indices, boxes, NUM_CLASSES)
    assert torch.equal(relabel_targets(values, indices, boxes, NUM_CLASSES, temperature=1.0), soft_target(pooled))
    flipped = torch.tensor([False, True, False, True])
    # Cell targets (computed sparsely): the same temperature and subset, up to rounding.
    subset = torch.tensor([3, 0, 7, 1])
    cells = local_targets(values, indices, boxes, torch.zeros(4, dtype=torch.bool), NUM_CLASSES, 2,
                          classes=subset, temperature=0.5)  # fmt: skip
    pooled_cells = label_pooling(values, indices, boxes, NUM_CLASSES, output_size=2)
    torch.testing.assert_close(cells.dense(), torch.softmax(pooled_cells[:, subset] / 0.5, dim=1))

    sharp = relabel_targets(values, indices, boxes, NUM_CLASSES, temperature=0.5)
    torch.testing.assert_close(sharp, torch.softmax(pooled * 2, dim=1))
    entropy = lambda p: -(p * p.log()).sum(1)  # noqa: E731
    today = soft_target(pooled)
    assert (entropy(sharp) < entropy(today)).all() and (sharp.max(1).values > today.max(1).values).all()
    assert torch.equal(sharp.argmax(1), today.argmax(1))
    config = TrainConfig(label_mode="relabel", target_temperature=0.5)
    batch = TrainBatch(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), boxes, flipped, values, indices)
    torch.testing.assert_close(batch_targets(batch, config, NUM_CLASSES, None)[0], sharp)


def test_subset_targets_keep_the_scores_of_the_students_classes_before_the_softmax():
    # A 3-way student for the teacher classes 7, 2, 5 (outputs 0, 1, 2). Image 0 is mostly class 2
    # with a strong class 0 (not a student class); image 1 is all class 5.
    subset = torch.tensor([7, 2, 5])
    indices = torch.tensor([[2, 0, 7], [5, 1, 3]])[:, :, None, None].expand(2, 3, 4, 4).contiguous()
    values = torch.tensor([[6.0, 5.0, 1.0], [4.0, 1.0, 0.5]])[:, :, None, None].expand(2, 3, 4, 4).contiguous()
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    targets = relabel_targets(values, indices, boxes, NUM_CLASSES, classes=subset)
    pooled = label_pooling(values, indices, boxes, NUM_CLASSES)
    assert targets.shape == (2, 3)
    torch.testing.assert_close(targets, torch.softmax(pooled[:, [7, 2, 5]], dim=1))
    assert targets.argmax(1).tolist() == [1, 2]  # the mass lands on the outputs of classes 2 and 5
    torch.testing.assert_close(targets[0], torch.softmax(torch.tensor([1.0, 6.0, 0.0]), 0))  # class 0 dropped
    torch.testing.assert_close(targets[1], torch.softmax(torch.tensor([0.0, 0.0, 4.0]), 0))

    # Every target of the trainer goes through the subset: one-hot at student outputs, CutMix, cells.
    batch = TrainBatch(
        torch.zeros(2, 3, 8, 8), torch.tensor([1, 2]), boxes, torch.tensor([False, True]), values, indices
    )
    mixed, cells = batch_targets(batch, TrainConfig(label_mode="relabel+original", local_labels=2), 10, None, subset)
    torch.testing.assert_close(mixed, (targets + torch.eye(3)[[1, 2]]) / 2)
    assert cells.dense().shape == (2, 3, 2, 2)
    torch.testing.assert_close(cells.dense()[:, :, 0, 0], targets)  # uniform maps: each cell = the whole image
    from trt_relabel.targets import CutMix

    cutmix = CutMix(perm=torch.tensor([1, 0]), rect=(0, 0, 4, 8), size=8)
    mixed = cutmix_relabel_targets(values, indices, boxes, batch.flipped, cutmix, NUM_CLASSES, classes=subset)
    torch.testing.assert_close(mixed, 0.5 * targets + 0.5 * targets[[1, 0]])


# --- training on a subset and on folders that are no teacher class -------------------------------


def tiny(data: Path, store: Path, out: Path, **changes) -> TrainConfig:
    """test_trainer's tiny run: one epoch at 32 px."""
    return tiny_config(data, store, out, **{"epochs": 1, "image_size": 32, **changes})


@pytest.fixture(scope="module")
def shuffled_teacher_store(image_folder, tmp_path_factory) -> Path:
    """A store of the sample folders by a 10-class teacher whose classes 7, 2, 5 are cat, coffee,
    uniform (the maps of test_data.label_maps, which point at classes 0..2 and others)."""
    ids = [f"c{i}" for i in range(NUM_CLASSES)]
    ids[7], ids[2], ids[5] = "cat", "coffee", "uniform"
    classes = ClassList(tuple(ids), tuple(ids))
    return build_store(image_folder, tmp_path_factory.mktemp("subset") / "store", classes=classes)


def test_training_on_three_of_ten_teacher_classes_trains_a_three_way_student(
    image_folder, shuffled_teacher_store, tmp_path
):
    store = LabelStore(shuffled_teacher_store)
    assert [s.class_index for s in store.samples[:4]] == [7] * 4  # samples.tsv: teacher classes
    result = train(
        tiny(image_folder, shuffled_teacher_store, tmp_path / "run", val=image_folder, label_mode="relabel+original")
    )
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["model"]["fc.weight"].shape[0] == 3
    assert checkpoint["classes"] == ["cat", "coffee", "uniform"]
    assert result.metrics[0]["val_top1"] is not None


def test_folders_that_are_no_teacher_class(image_folder, tmp_path, run_cli):
    store = build_store(image_folder, tmp_path / "store", classes=None)  # teacher ids '0'..'9'
    assert {s.class_index for s in LabelStore(store).samples} == {-1}
    with pytest.raises(RelabelError, match=r"--label-mode relabel\+original: 3 class folders \('cat', 'coffee', "
                       r"'uniform'\) are no class of the teacher test-teacher, so folder labels cannot be compared "
                       r"with the teacher's; pass --class-map FILE"):  # fmt: skip
        train(tiny(image_folder, store, tmp_path / "mixed", label_mode="relabel+original"))
    # relabel alone: the student learns the teacher's 10 classes, and says so.
    done = run_cli("train", "--data", image_folder, "--labels", store, "--out", tmp_path / "run",
                   "--model", "resnet18", "--epochs", "1", "--batch-size", "4", "--image-size", "32",
                   "--workers", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "are no class of the teacher test-teacher" in done.stderr and "learns all 10 classes" in done.stderr
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]["fc.weight"].shape[0] == 10
    # --class-map maps them (by teacher index): a 3-way student of classes 4, 0, 9.
    class_map = write(tmp_path / "map.tsv", "cat\t4\ncoffee\t0\nuniform\t9\n")
    train(tiny(image_folder, store, tmp_path / "mapped", label_mode="relabel+original", class_map=class_map))
    checkpoint = torch.load(tmp_path / "mapped" / "checkpoint.pt", weights_only=True)
    assert checkpoint["model"]["fc.weight"].shape[0] == 3


# --- stats ---------------------------------------------------------------------------------------


def test_stats_report_target_sharpness_unmapped_folders_and_the_class_map(
    image_folder, shuffled_teacher_store, tmp_path, run_cli
):
    unmapped = build_store(image_folder, tmp_path / "store", classes=None)
    stats = store_stats(LabelStore(unmapped))
    assert stats.num_with_class == 0 and stats.unmapped_folders == ["cat", "coffee", "uniform"]
    class_map = write(tmp_path / "map.tsv", "cat\t0\ncoffee\t1\nuniform\t2\n")  # label_maps' classes
    mapped = store_stats(LabelStore(unmapped), class_map=class_map)
    assert mapped.num_with_class == 12 and mapped.unmapped_folders == [] and mapped.num_agree > 6

    done = run_cli("stats", unmapped)
    assert done.returncode == 0, done.stderr
    assert "warning: 3 class folders ('cat', 'coffee', 'uniform') are no class of the teacher" in done.stderr
    assert "pass --class-map FILE" in done.stderr

    # Top probability and entropy, at T = 1 and sharper at T < 1; a warning when nearly uniform.
    store = LabelStore(shuffled_teacher_store)
    warm, cold = store_stats(store), store_stats(store, temperature=0.5)
    assert warm.top_prob_mean < cold.top_prob_mean and warm.entropy_mean > cold.entropy_mean
    assert warm.entropy_max == pytest.approx(np.log(NUM_CLASSES)) and not warm.near_uniform
    hot = store_stats(store, temperature=20.0)
    assert hot.near_uniform and hot.entropy_mean > 0.9 * np.log(NUM_CLASSES)
    done = run_cli("stats", shuffled_teacher_store, "--json", "--target-temperature", "20")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["near_uniform"] is True and printed["target_temperature"] == 20.0
    assert printed["top_prob_mean"] == pytest.approx(hot.top_prob_mean, rel=1e-6)
    assert "warning: the targets are close to uniform" in done.stderr and "--target-temperature T" in done.stderr
    assert "close to uniform" not in run_cli("stats", shuffled_teacher_store).stderr


# --- generate and import on class folders --------------------------------------------------------


@pytest.fixture
def three_photos(image_folder, tmp_path) -> Path:
    """One photo each in the wnid folders of tabby (281) and espresso (967), and in `uniform`."""
    data = tmp_path / "photos"
    photos = {TABBY: "cat/chelsea.jpg", ESPRESSO: "coffee/coffee.jpg", "uniform": "uniform/grace_hopper.jpg"}
    for folder, photo in photos.items():
        (data / folder).mkdir(parents=True)
        shutil.copy(image_folder / photo, data / folder)
    return data


def test_generate_writes_teacher_classes_of_wnid_folders(three_photos, bundled_graphs, tmp_path, run_cli):
    engines = bundled_graphs.fp32.parent
    common = ["--backend", "onnxruntime", "--engines-dir", engines, "--workers", "0"]
    done = run_cli("generate", three_photos, "--out", tmp_path / "store", *common)
    assert done.returncode == 0, done.stderr
    assert "1 class folder ('uniform') is no class of the teacher efficientnet_lite0" in done.stderr
    store = LabelStore(tmp_path / "store")
    assert [s.class_index for s in store.samples] == [281, 967, -1]  # before: folder positions 0, 1, 2
    stats = store_stats(store)
    assert stats.num_with_class == 2 and stats.num_agree >= 1 and stats.unmapped_folders == ["uniform"]

    class_map = write(tmp_path / "map.tsv", "uniform\tmilitary uniform\n")
    done = run_cli("generate", three_photos, "--out", tmp_path / "mapped", "--class-map", class_map, *common)
    assert done.returncode == 0, done.stderr and "no class of the teacher" not in done.stderr
    store = LabelStore(tmp_path / "mapped")
    assert [s.class_index for s in store.samples] == [281, 967, 652]
    assert store_stats(store).num_agree >= 2  # espresso and military uniform, at least


def test_import_relabel_gives_wnid_folders_their_imagenet_index(three_photos, tmp_path):
    from trt_relabel.interop import import_relabel

    relabel = tmp_path / "relabel"
    relabel.mkdir()
    summary = import_relabel(relabel, three_photos, tmp_path / "store")
    assert summary.failed == 3  # no map files: every row failed, but the classes are written
    assert [s.class_index for s in LabelStore(tmp_path / "store").samples] == [281, 967, -1]


# --- a teacher fine-tuned on its own classes -----------------------------------------------------


def fine_tune(image_folder: Path, path: Path, steps: int = 40) -> None:
    """timm's test_resnet with 3 classes, fitted on the 12 sample photos (whole images at 64 px,
    as the teacher sees them); its state dict saved to `path`."""
    import timm

    from trt_relabel.images import load_rgb, resize_whole
    from trt_relabel.teacher import get_teacher_config

    config = get_teacher_config("timm:test_resnet", 64)
    entries = list_images(image_folder)
    pixels = np.stack([resize_whole(load_rgb(image_folder / e.path), 64, config.interpolation) for e in entries])
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255 - torch.tensor(config.mean)[:, None, None]) / torch.tensor(
        config.std
    )[:, None, None]
    y = torch.tensor([e.class_index for e in entries])
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(model.state_dict(), path)


def test_fine_tuned_teacher_end_to_end(image_folder, tmp_path, run_cli):
    fine_tune(image_folder, tmp_path / "my.pth")
    names = write(tmp_path / "names.txt", "cat\ttabby cat\ncoffee\tespresso\nuniform\tuniform\n")
    teacher = ["--teacher", "timm:test_resnet", "--checkpoint", tmp_path / "my.pth", "--size", "64", "--topk", "2"]
    done = run_cli("build-engine", *teacher, "--out", tmp_path / "engines")
    assert done.returncode == 1 and "weights do not fit" in done.stderr and "--class-names FILE" in done.stderr
    done = run_cli("build-engine", *teacher, "--class-names", names, "--out", tmp_path / "engines")
    assert done.returncode == 0, done.stderr
    assert "of 3 classes" in done.stderr

    done = run_cli("generate", image_folder, "--out", tmp_path / "store", *teacher, "--class-names", names,
                   "--engines-dir", tmp_path / "engines", "--backend", "onnxruntime", "--workers", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "exporting" not in done.stderr  # the graphs of build-engine are reused
    store = LabelStore(tmp_path / "store")
    assert store.num_classes == 3 and store.manifest["class_names"] == ["tabby cat", "espresso", "uniform"]
    assert [s.class_index for s in store.samples] == [e.class_index for e in list_images(image_folder)]

    done = run_cli("stats", tmp_path / "store", "--json")
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["num_with_class"] == 12 and stats["agreement"] >= 0.5 and stats["unmapped_folders"] == []

    done = run_cli("show", "coffee/coffee.jpg", "--labels", tmp_path / "store", "--data", image_folder,
                   "--out", tmp_path / "show.png")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "folder class: espresso (1)" in done.stderr

    done = run_cli("train", "--data", image_folder, "--labels", tmp_path / "store", "--out", tmp_path / "run",
                   "--model", "resnet18", "--epochs", "1", "--batch-size", "4", "--image-size", "32",
                   "--workers", "0", "--label-mode", "relabel+original")  # fmt: skip
    assert done.returncode == 0, done.stderr
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["model"]["fc.weight"].shape[0] == 3 and checkpoint["classes"] == ["cat", "coffee", "uniform"]


def test_merge_keeps_the_teachers_classes_and_refuses_other_ones(image_folder, shuffled_teacher_store, tmp_path):
    from test_data import TEACHER_CLASSES

    from trt_relabel.interop import merge_stores

    other = build_store(image_folder, tmp_path / "other", classes=TEACHER_CLASSES)
    with pytest.raises(RelabelError, match=r"other: class 0 is 'cat', in .* 'c0': the teachers have different classes"):
        merge_stores([shuffled_teacher_store, other], tmp_path / "merged")
    twin = shutil.copytree(shuffled_teacher_store, tmp_path / "twin")
    merge_stores([shuffled_teacher_store, twin], tmp_path / "merged")
    merged = LabelStore(tmp_path / "merged")
    assert merged.manifest["class_ids"] == LabelStore(shuffled_teacher_store).manifest["class_ids"]
    assert merged.samples == LabelStore(shuffled_teacher_store).samples
