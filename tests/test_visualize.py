"""show / stats on a hand-made label store over real photos, checked against independent numpy
(and torchvision roi_align) computations, plus the real CLI in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import roi_align

from trt_relabel.classes import imagenet_classes
from trt_relabel.errors import RelabelError, UsageError
from trt_relabel.images import ImageEntry, list_images
from trt_relabel.store import LabelStore, create_store
from trt_relabel.store_format import StoreSpec
from trt_relabel.visualize import (
    _draw_bars,
    _draw_legend,
    _top1_colours,
    locate_image,
    plot_stats,
    show_label_map,
    store_stats,
)

CLI = Path(sys.executable).parent / "trt-relabel"
MAP_SIZE = (6, 8)  # not square: catches swapped axes
TOPK = 3
FAILED_ROW = 2
THRESHOLD = 0.2


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


def hand_made_maps(samples: list[ImageEntry]) -> tuple[np.ndarray, np.ndarray]:
    """Per row: a main class (the folder class for two rows in three, another class otherwise),
    a second class whose strength varies by row (some rows multi-label) and leads in the left
    quarter of the map, and a weak third class. float32 [N, 3, h, w], int64 [N, 3, h, w]."""
    rng = np.random.default_rng(0)
    height, width = MAP_SIZE
    values = np.empty((len(samples), TOPK, height, width), np.float32)
    indices = np.empty((len(samples), TOPK, height, width), np.int64)
    for row, sample in enumerate(samples):
        main = sample.class_index if row % 3 and sample.class_index >= 0 else 400 + row
        second, third = 700 + row, 900 - row
        logits = np.stack(
            [
                np.full(MAP_SIZE, 9.0),
                np.full(MAP_SIZE, 9.0 - 0.6 * (row % 6)),
                np.full(MAP_SIZE, 3.0),
            ]
        ) + rng.normal(0, 0.3, (TOPK, *MAP_SIZE))
        classes = np.stack([np.full(MAP_SIZE, c) for c in (main, second, third)])
        logits[1, :, : width // 4] = logits[0, :, : width // 4] + 2  # the second class leads on the left
        order = np.argsort(-logits, axis=0)
        values[row] = np.take_along_axis(logits, order, axis=0)
        indices[row] = np.take_along_axis(classes, order, axis=0)
    return values, indices


@pytest.fixture(scope="module")
def labelled(image_folder, tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, store): the conftest photos plus three flat-folder rows (class -1); row 2 failed."""
    samples = list_images(image_folder) + [ImageEntry(f"flat/extra{i}.jpg", -1) for i in range(3)]
    values, indices = hand_made_maps(samples)
    store = tmp_path_factory.mktemp("visualize") / "store"
    writer = create_store(store, StoreSpec("hand", "hand-1", "", 224, MAP_SIZE, TOPK), samples)
    good = np.array([r for r in range(len(samples)) if r != FAILED_ROW])
    writer.write(good, values[good], indices[good])
    writer.mark_failed(FAILED_ROW, "test failure")
    writer.finish()
    return image_folder, store


def dense_maps(store: LabelStore) -> np.ndarray:
    """float64 [N, C, h, w]: the top-k scattered into zeros, as the trainer sees it."""
    dense = np.zeros((len(store), store.num_classes, *store.map_size))
    np.put_along_axis(dense, store.indices.astype(np.int64), store.values.astype(np.float64), axis=1)
    return dense


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def test_stats_match_numpy(labelled):
    _, path = labelled
    store = LabelStore(path)
    stats = store_stats(store, threshold=THRESHOLD, chunk_rows=4)

    rows = np.flatnonzero(store.labelled())
    targets = softmax(dense_maps(store)[rows].mean(axis=(2, 3)))
    classes = np.array([s.class_index for s in store.samples])[rows]
    ranked = np.sort(targets, axis=1)[:, ::-1]
    assert (np.abs(ranked[:, 1] - THRESHOLD) > 1e-3).all() and (ranked[:, 0] - ranked[:, 1] > 1e-3).all()
    with_class = classes >= 0
    entropies = -(targets * np.log(targets)).sum(axis=1)

    assert (stats.num_samples, stats.num_labelled, stats.num_failed, stats.num_pending) == (15, 14, 1, 0)
    assert stats.num_with_class == with_class.sum() == 11
    assert stats.num_agree == (targets.argmax(1) == classes)[with_class].sum()
    assert 0 < stats.num_agree < stats.num_with_class
    assert stats.num_multi_label == (ranked[:, 1] > THRESHOLD).sum()
    assert 0 < stats.num_multi_label < stats.num_labelled
    assert stats.agreement == stats.num_agree / stats.num_with_class
    np.testing.assert_allclose(stats.entropies, entropies, rtol=1e-4)
    assert stats.entropy_mean == pytest.approx(entropies.mean(), rel=1e-4)
    np.testing.assert_allclose(stats.entropy_quartiles, np.quantile(entropies, [0.25, 0.5, 0.75]), rtol=1e-4)


def test_stats_cli_json_and_plot(labelled, tmp_path):
    _, path = labelled
    result = run_cli("stats", path, "--json", "--threshold", str(THRESHOLD), "--plot", tmp_path / "stats.jpg")
    assert result.returncode == 0, result.stderr
    expected = store_stats(LabelStore(path), threshold=THRESHOLD).to_dict()
    printed = json.loads(result.stdout)
    assert printed == json.loads(json.dumps(expected))
    with Image.open(tmp_path / "stats.jpg") as plot:  # the format the suffix names
        assert (plot.format, plot.size) == ("JPEG", (1200, 600))
    assert result.stderr.endswith(f"{tmp_path / 'stats.jpg'}: 1200x600 JPEG written\n")
    refused = run_cli("stats", path, "--plot", tmp_path / "stats.gif")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "name a .png, .jpg" in refused.stderr
    assert not (tmp_path / "stats.gif").exists()


@pytest.mark.parametrize(("suffix", "magic"), [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF"),
                                               (".JPEG", b"\xff\xd8\xff")])  # fmt: skip
def test_figures_in_the_format_their_suffix_names(labelled, tmp_path, suffix, magic):
    _, path = labelled
    stats = store_stats(LabelStore(path), threshold=THRESHOLD)
    out = plot_stats(stats, tmp_path / f"stats{suffix}", width=300, height=200)
    assert out.read_bytes().startswith(magic)
    with pytest.raises(UsageError, match="cannot tell the figure format"):
        plot_stats(stats, tmp_path / "stats.tiff")


def test_show_pools_the_box_like_roi_align(labelled, tmp_path):
    data, path = labelled
    store = LabelStore(path)
    row, photo = locate_image(store, "cat/chelsea.jpg", data)
    assert photo == data / "cat" / "chelsea.jpg"
    box = (0.1, 0.2, 0.7, 0.9)
    top5 = show_label_map(store, row, photo, tmp_path / "show.png", box=box)
    assert Image.open(tmp_path / "show.png").size == (1200, 600)

    height, width = store.map_size
    x1, y1, x2, y2 = box
    roi = torch.tensor([[0, x1 * width - 0.5, y1 * height - 0.5, x2 * width - 0.5, y2 * height - 0.5]])
    dense = torch.from_numpy(dense_maps(store)[row : row + 1]).float()
    expected = softmax(roi_align(dense, roi, output_size=1, sampling_ratio=-1, aligned=False)[0, :, 0, 0].numpy())
    best = np.argsort(-expected)[:TOPK]  # the map's 3 classes; then ties among the classes pooled to 0
    assert [c for c, _ in top5[:TOPK]] == best.tolist()
    np.testing.assert_allclose([p for _, p in top5], np.sort(expected)[::-1][:5], rtol=1e-5)
    np.testing.assert_allclose([p for _, p in top5], expected[[c for c, _ in top5]], rtol=1e-5)
    whole = show_label_map(store, row, photo, tmp_path / "whole.png", width=640, height=480)
    assert whole != top5 and Image.open(tmp_path / "whole.png").size == (640, 480)


def test_locate_image(labelled):
    data, path = labelled
    store = LabelStore(path)
    expected_row = [s.path for s in store.samples].index("coffee/coffee_flip.png")
    assert locate_image(store, None, data, row=expected_row) == (expected_row, data / "coffee/coffee_flip.png")
    absolute = (data / "coffee" / "coffee_flip.png").resolve()
    assert locate_image(store, absolute, None) == (expected_row, absolute)
    assert locate_image(store, absolute, data) == (expected_row, absolute)
    with pytest.raises(UsageError, match="needs --data"):
        locate_image(store, "coffee/coffee_flip.png", None)
    with pytest.raises(RelabelError, match="no sample"):
        locate_image(store, data / "coffee" / "missing.png", data)
    with pytest.raises(UsageError, match="rows 0 to 14"):
        locate_image(store, None, data, row=15)


def test_show_cli(labelled, tmp_path):
    data, path = labelled
    image = (data / "uniform" / "grace_hopper_small.JPEG").resolve()
    result = run_cli("show", image, "--labels", path, "--out", tmp_path / "s.png", "--width", "900", "--height", "500")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "s.png").size == (900, 500)
    store = LabelStore(path)
    row = [s.path for s in store.samples].index("uniform/grace_hopper_small.JPEG")
    top1 = softmax(dense_maps(store)[row].mean(axis=(1, 2))).argmax()
    assert f"{top1} " in result.stderr and imagenet_classes().names[top1] in result.stderr

    no_data = run_cli("show", "uniform/grace_hopper.jpg", "--labels", path, "--out", tmp_path / "x.png")
    assert no_data.returncode == 2 and "needs --data" in no_data.stderr
    failed = run_cli("show", "--row", FAILED_ROW, "--labels", path, "--data", data, "--out", tmp_path / "y.png")
    assert failed.returncode == 1 and "has no labels" in failed.stderr
    bad_box = run_cli("show", image, "--labels", path, "--out", tmp_path / "z.png", "--box", "0.5,0.5,0.2,0.9")
    assert bad_box.returncode == 2 and "x1 < x2" in bad_box.stderr
    for errored in (no_data, failed, bad_box):
        assert "Traceback" not in errored.stderr and not list(tmp_path.glob("[xyz].png"))


@pytest.fixture
def poisoned(labelled, tmp_path) -> tuple[Path, Path]:
    """A copy of the store where rows 4 (NaN) and 9 (inf) hold a non-finite score, as an older
    version or an edit could leave them."""
    from test_store import poison

    data, path = labelled
    copy = tmp_path / "poisoned"
    shutil.copytree(path, copy)
    poison(copy, {4: np.nan, 9: -np.inf})
    return data, copy


def test_stats_leave_out_non_finite_rows(labelled, poisoned):
    clean = store_stats(LabelStore(labelled[1]))
    stats = store_stats(LabelStore(poisoned[1]), chunk_rows=3)
    assert (stats.num_labelled, stats.num_nonfinite, stats.nonfinite.tolist()) == (12, 2, [4, 9])
    assert np.isfinite(stats.entropies).all() and len(stats.entropies) == 12
    np.testing.assert_allclose(stats.entropies, np.delete(clean.entropies, [3, 8]), rtol=1e-6)  # rows 4 and 9

    result = run_cli("stats", poisoned[1], "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in stats --json"))
    assert printed["num_nonfinite"] == 2 and printed["num_labelled"] == 12
    warning = [line for line in result.stderr.splitlines() if "non-finite" in line]
    assert len(warning) == 1 and str(poisoned[1]) in warning[0] and "row 4" in warning[0]


def test_show_refuses_a_non_finite_row(poisoned, tmp_path):
    data, path = poisoned
    with pytest.raises(RelabelError, match=r"\(row 4\) of .*: its scores are not finite"):
        show_label_map(LabelStore(path), 4, data / LabelStore(path).samples[4].path, tmp_path / "x.png")
    result = run_cli("show", "--row", "9", "--labels", path, "--data", data, "--out", tmp_path / "y.png")
    assert result.returncode == 1 and "not finite" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "y.png").exists()


def test_legend_colours_bars_and_title():
    """The legend's class colours are never grey (grey is "N more classes"), the bars' axis ends near
    the largest probability (small bars stay visible), and the legend title reads plainly."""
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure

    top1 = np.repeat(np.arange(25), np.arange(25, 0, -1))[: 15 * 20].reshape(15, 20)  # 25 classes, rarer and rarer
    _, legend = _top1_colours(top1)
    coloured = [colour for _, _, colour in legend if len(set(np.round(colour, 2))) > 1]
    assert len(coloured) >= 10 and len(set(coloured)) == len(coloured)
    assert all(colour == legend[-1][2] for _, _, colour in legend[len(coloured) :])  # the rest share the grey
    assert len(set(np.round(legend[-1][2], 2))) == 1

    fig = Figure()
    bars, key = fig.subplots(1, 2)
    _draw_bars(
        bars, [(1, 0.3), (2, 0.05), (3, 0.01), (4, 0.003), (5, 0.001)], list(imagenet_classes().names), "whole image"
    )
    assert 0.3 < bars.get_xlim()[1] <= 0.45
    _draw_legend(key, legend, list(imagenet_classes().names), "my-teacher")
    title = key.get_legend().get_title().get_text()
    assert title == "my-teacher: top-1 class of each cell\n(number of cells)"
    patches = key.get_legend().get_patches()
    assert patches[-1].get_label() == f"{len(legend) - len(coloured)} more classes"
    assert to_rgb(patches[-1].get_facecolor()) not in [to_rgb(p.get_facecolor()) for p in patches[:-1]]


def test_show_names_with_markup_and_undecodable_bytes(photos, tmp_path):
    """A sample whose name holds rich markup or bytes that are not UTF-8 is drawn and printed."""
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    names = ["cat/a[/b]c.jpg", os.fsdecode(b"cat/caf\xe9.jpg")]
    for name in names:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos["chelsea"]).resize((64, 48)).save(os.fsencode(data / name), format="JPEG")
    samples = [ImageEntry(name, 0) for name in names]
    values, indices = hand_made_maps(samples)
    writer = create_store(tmp_path / "store", StoreSpec("t[/x]", "h", "", 224, MAP_SIZE, TOPK), samples)
    writer.write(np.arange(2), values, indices)
    writer.finish()
    for row in range(len(names)):
        out = tmp_path / f"row{row}[/x].png"
        done = run_cli("show", "--row", row, "--labels", tmp_path / "store", "--data", data, "--out", out)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert Image.open(out).size == (1200, 600)
        assert f"{out}: 1200x600 PNG written" in done.stderr
    assert (
        "a[/b]c.jpg: soft target (top 5)"
        in run_cli(
            "show", "--row", 0, "--labels", tmp_path / "store", "--data", data, "--out", tmp_path / "again.svg"
        ).stderr
    )
