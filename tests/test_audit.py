"""`trt-relabel audit`: the rules on hand-made label maps (checked against numpy), the outputs'
layout, and end to end with the bundled teacher on the packaged free photos (a planted error ranks
first), the report opened in a real headless chromium."""

from __future__ import annotations

import csv
import html as html_module
import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CAT_CLASSES, COFFEE_CLASS, UNIFORM_CLASS
from PIL import Image

from trt_relabel.audit import (
    CSV_COLUMNS,
    AuditRules,
    audit,
    audit_table,
    cell_probabilities,
    class_rows,
    confused_pairs,
    error_order,
)
from trt_relabel.classes import default_classes
from trt_relabel.images import ImageEntry
from trt_relabel.store import LabelStore, create_store
from trt_relabel.store_format import StoreSpec

CLI = Path(sys.executable).parent / "trt-relabel"
NUM_CLASSES = 20
MAP = (6, 8)  # not square: catches swapped axes
TOPK = 3
STRONG, WEAK = 8.0, 1.0  # a top-1 logit whose cell probability is ~0.99, and one ~0.1


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def fillers() -> np.ndarray:
    """The default 2nd class of each cell: 10 + its column (classes 10-17, never a top-1)."""
    return np.broadcast_to(10 + np.arange(MAP[1]), MAP).copy()


def label_map(top1: np.ndarray, logit: float | np.ndarray = STRONG, second: np.ndarray | None = None,
              second_logit: float | np.ndarray = 0.5) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A top-3 map [3, h, w]: `top1` classes with `logit`, then `second` (default: :func:`fillers`)
    with `second_logit`, then class 18 or 19 (by row parity) with 0.25."""
    second = fillers() if second is None else second
    third = 18 + np.broadcast_to(np.arange(MAP[0])[:, None] % 2, MAP)
    values = np.stack([np.broadcast_to(logit, MAP), np.broadcast_to(second_logit, MAP), np.full(MAP, 0.25)])
    indices = np.stack([top1, second, third])
    return values.astype(np.float32), indices.astype(np.int64)


def grid(fill: int, **regions: tuple[slice, slice, int]) -> np.ndarray:
    top1 = np.full(MAP, fill)
    for rows, cols, cls in regions.values():
        top1[rows, cols] = cls
    return top1


def dense_softmax(values: np.ndarray, indices: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """The reference: the dense map (zeros outside the top-k) averaged over `axes`, then a softmax
    over the classes. values/indices [B, k, h, w] -> [B, C, ...]."""
    dense = np.zeros((len(values), NUM_CLASSES, *MAP))
    np.put_along_axis(dense, indices, values.astype(np.float64), axis=1)
    pooled = dense.mean(axis=axes) if axes else dense
    exp = np.exp(pooled - pooled.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def make_store(path: Path, maps: list[tuple[np.ndarray, np.ndarray]], labels: list[int], failed=(), paths=None) -> Path:
    """A store of `maps` with these folder `labels`; rows `failed` failed; sample paths
    c<label>/img<row>.png unless given in `paths` (row -> path)."""
    paths = paths or {}
    samples = [ImageEntry(paths.get(row, f"c{max(label, 0)}/img{row}.png"), label) for row, label in enumerate(labels)]
    writer = create_store(path, StoreSpec("hand", "hand-1", "", 224, MAP, TOPK, NUM_CLASSES), samples)
    good = [row for row in range(len(labels)) if row not in failed]
    writer.write(np.array(good), np.stack([maps[r][0] for r in good]), np.stack([maps[r][1] for r in good]))
    for row in failed:
        writer.mark_failed(row, "test failure")
    writer.finish()
    return path


def test_cell_probabilities_are_the_softmax_of_each_dense_cell():
    rng = np.random.default_rng(0)
    values = -np.sort(-rng.normal(3, 3, (2, TOPK, *MAP)), axis=1)
    indices = np.stack([rng.permutation(NUM_CLASSES)[:TOPK] for _ in range(2 * 48)]).reshape(2, 48, TOPK)
    indices = indices.transpose(0, 2, 1).reshape(2, TOPK, *MAP)
    expected = np.take_along_axis(dense_softmax(values, indices, ()), indices, axis=1)
    np.testing.assert_allclose(cell_probabilities(values, NUM_CLASSES), expected, rtol=1e-5)


def audit_one(tmp_path: Path, top1, label: int = -1, rules: AuditRules | None = None, **map_options):
    store = LabelStore(make_store(tmp_path / "store", [label_map(top1, **map_options)], [label]))
    return audit_table(store, rules or AuditRules())


def test_present_rule_counts_confident_top1_cells(tmp_path):
    logits = np.full(MAP, STRONG)
    top1 = grid(2, a=(slice(0, 2), slice(0, 5), 3), b=(slice(3, 4), slice(0, 4), 5), c=(slice(5, 6), slice(0, 3), 6),
                d=(slice(4, 5), slice(0, 6), 7))  # fmt: skip
    logits[4, :6] = WEAK  # class 7: top-1 of 6 cells, each below p
    table = audit_one(tmp_path, top1, logit=logits)
    # class 2: 48 - 10 - 4 - 3 - 6 = 25 cells; 3: 10; 5: 4 = m; 6: 3 < m; 7 not confident.
    assert table.present(0) == [(2, 25), (3, 10), (5, 4)]
    looser = audit_table(LabelStore(tmp_path / "store"), AuditRules(present_cells=3, present_prob=0.05))
    assert looser.present(0) == [(2, 25), (3, 10), (7, 6), (5, 4), (6, 3)]


def test_separate_classes_are_objects_and_alternatives_are_one(tmp_path):
    halves = grid(3, right=(slice(None), slice(4, None), 4))
    separate = audit_one(tmp_path / "a", halves)
    assert separate.present(0) == [(3, 24), (4, 24)]
    assert separate.objects[0] == 2 and separate.multi_object[0]
    assert separate.multi_object_score[0] == pytest.approx(24 / 48)

    # Class 3 in the top-k of every cell of class 4: look-alikes, one object (both stay present).
    alternative = audit_one(tmp_path / "b", halves, second=np.where(halves == 4, 3, fillers()), second_logit=6.0)
    assert alternative.present(0) == [(3, 24), (4, 24)]
    assert alternative.objects[0] == 1 and not alternative.multi_object[0]
    assert alternative.multi_object_score[0] == 0

    # ... in 2 of class 4's 24 cells: under the 0.1 share, still two objects; at 0.05, one.
    few = fillers()
    few[0, 4:6] = 3
    rare = audit_one(tmp_path / "c", halves, second=few)
    assert rare.objects[0] == 2 and rare.multi_object[0]
    merged = audit_table(LabelStore(tmp_path / "c" / "store"), AuditRules(alternative_share=0.05))
    assert merged.objects[0] == 1 and not merged.multi_object[0]


def test_small_second_object_is_not_multi_object(tmp_path):
    top1 = grid(3, small=(slice(0, 1), slice(0, 6), 4))
    table = audit_one(tmp_path, top1)
    assert table.present(0) == [(3, 42), (4, 6)]
    assert table.objects[0] == 1 and not table.multi_object[0]  # 6 < object_cells = 8
    assert table.multi_object_score[0] == pytest.approx(6 / 48)
    relaxed = audit_table(LabelStore(tmp_path / "store"), AuditRules(object_cells=6))
    assert relaxed.objects[0] == 2 and relaxed.multi_object[0]


ODD_PATH = "c5/<b>img1 & co.png"  # markup in a file name: shown as text


@pytest.fixture(scope="module")
def rule_store(tmp_path_factory) -> Path:
    """Rows: 0 label present; 1 label nowhere (suspect); 2 label 2nd everywhere; 3 label present in a
    corner; 4 label weakly 3rd in a few cells; 5 failed; 6, 7 without class (two objects, one)."""
    everywhere3 = np.full(MAP, 3)
    few7 = fillers()
    few7[:2, :2] = 7
    maps = [
        label_map(everywhere3),
        label_map(everywhere3),
        label_map(everywhere3, second=np.full(MAP, 4), second_logit=6.0),
        label_map(grid(3, corner=(slice(0, 2), slice(0, 3), 6))),
        label_map(everywhere3, second=few7, second_logit=np.where(few7 == 7, 2.0, 0.5)),
        label_map(everywhere3),
        label_map(grid(3, right=(slice(None), slice(4, None), 9))),
        label_map(everywhere3),
    ]
    labels, paths = [3, 5, 4, 6, 7, 3, -1, -1], {1: ODD_PATH}
    return make_store(tmp_path_factory.mktemp("rules") / "store", maps, labels, failed=(5,), paths=paths)


def test_whole_image_target_suspects_and_order(rule_store):
    store = LabelStore(rule_store)
    table = audit_table(store)
    assert table.rows.tolist() == [0, 1, 2, 3, 4, 6, 7]
    values, indices = (np.asarray(a[table.rows]) for a in (store.values, store.indices))
    target = dense_softmax(values, indices.astype(np.int64), (2, 3))  # LabelPooling of the full box = mean
    labels = np.array([3, 5, 4, 6, 7, -1, -1])
    has = labels >= 0
    np.testing.assert_allclose(table.label_prob[has], target[has.nonzero()[0], labels[has]], rtol=1e-4)
    assert np.isnan(table.label_prob[~has]).all() and (table.label_rank[~has] == 0).all()
    assert table.label_rank[0] == 1 and table.label_rank[2] == 2 and table.label_rank[4] == 2
    assert table.label_rank[1] == 12  # in no cell's top-k: after the 11 classes of the map
    assert table.top1.tolist() == target.argmax(axis=1).tolist() == [3, 3, 3, 3, 3, 3, 3]
    np.testing.assert_allclose(table.top1_prob, target.max(axis=1), rtol=1e-4)
    assert table.label_present.tolist() == [True, False, False, True, False, False, False]
    assert table.suspect.tolist() == [False, True, False, False, False, False, False]
    assert table.multi_object.tolist() == [False, False, False, False, False, True, False]
    strict = audit_table(store, AuditRules(suspect_rank=1))
    assert strict.suspect.tolist() == [False, True, True, False, True, False, False]

    # Absent folder classes first, by label_prob (1: nowhere < 4: weak 3rd < 2: 2nd), then present
    # ones by label_prob (3: a corner < 0: everywhere); then no class, by multi-object score.
    assert table.rows[error_order(table)].tolist() == [1, 4, 2, 3, 0, 6, 7]


def test_chunks_give_the_whole_store_result(rule_store):
    import torch

    store = LabelStore(rule_store)
    threads = torch.get_num_threads()
    whole, chunked = audit_table(store, chunk_rows=1000), audit_table(store, chunk_rows=2)
    assert torch.get_num_threads() == threads  # pooled on one thread, then restored
    for name, value in vars(whole).items():
        np.testing.assert_array_equal(value, getattr(chunked, name), err_msg=name)


def test_class_table_and_confused_pairs(rule_store):
    table = audit_table(LabelStore(rule_store))
    names = list(default_classes(NUM_CLASSES).names)
    rows = {r["index"]: r for r in class_rows(table, names)}
    assert sorted(rows) == [3, 4, 5, 6, 7]
    assert rows[3] == {
        "index": 3, "name": "class 3", "images": 1, "agreement": 1.0, "present": 1.0, "suspects": 0,
        "multi_object": 0, "teacher_class": 3, "teacher_name": "class 3", "teacher_share": 1.0,
    }  # fmt: skip
    assert rows[5]["suspects"] == 1 and rows[5]["agreement"] == 0 and rows[5]["teacher_class"] == 3
    pairs = confused_pairs(table, names, top=2)
    assert pairs == [(4, "class 4", 3, "class 3", 1, 1.0), (5, "class 5", 3, "class 3", 1, 1.0)]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_audit_writes_csv_real_labels_and_report(rule_store, tmp_path):
    out = tmp_path / "report"
    summary = audit(rule_store, out, top=3)
    assert (summary.num_labelled, summary.num_failed, summary.num_with_class) == (7, 1, 5)
    assert (summary.num_suspects, summary.num_multi_object, summary.num_agree) == (1, 1, 1)
    with open(out / "audit.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == CSV_COLUMNS
    lines = read_csv(out / "audit.csv")
    assert [int(line["row"]) for line in lines] == [1, 4, 2, 3, 0, 6, 7]
    first = lines[0]
    assert (first["path"], first["label"], first["label_name"]) == (ODD_PATH, "5", "class 5")
    assert (first["teacher_top1"], first["present"], first["present_names"]) == ("3", "3", "class 3")
    assert (first["suspect"], first["multi_object"], first["label_rank"]) == ("1", "0", "12")
    assert lines[5]["present"] == "3 9" and lines[5]["multi_object"] == "1" and lines[5]["label_prob"] == ""

    real = json.loads((out / "labels.json").read_text())
    assert real == [[3], [3], [3], [3, 6], [3], [], [3, 9], [3]]  # one list per store row; failed: []

    html = (out / "index.html").read_text()
    shown = set(re.findall(r'src="(thumbs/[^"]+)"', html))
    assert shown == {"thumbs/row1.png", "thumbs/row6.png"}  # map only: no --data
    assert sorted(p.name for p in (out / "thumbs").iterdir()) == ["row1.png", "row6.png"]
    assert Image.open(out / "thumbs" / "row6.png").size == (MAP[1], MAP[0])
    assert "label map only (no --data folder given)" in html and html.count('id="class-table"') == 1
    assert "c5/&lt;b&gt;img1 &amp; co.png" in html and "<b>img1" not in html

    data = tmp_path / "data"  # row 1's photo; row 6's is missing
    (data / "c5").mkdir(parents=True)
    Image.new("RGB", (400, 300), (200, 30, 30)).save(data / ODD_PATH)
    audit(rule_store, out, data=data, top=3)
    html = (out / "index.html").read_text()
    assert set(re.findall(r'src="(thumbs/[^"]+)"', html)) == {"thumbs/row1.jpg", "thumbs/row1.png", "thumbs/row6.png"}
    assert Image.open(out / "thumbs" / "row1.jpg").size == (240, 180)  # fitted into 240 x 240
    assert html.count("photo unavailable: ") == 1 and "label map only" not in html

    (out / "thumbs" / "row99.jpg").write_bytes(b"old")  # an earlier report's thumbnail goes
    (out / "thumbs" / "notes.txt").write_text("mine")  # a file of the user's stays
    audit(rule_store, out, top=0)
    assert sorted(p.name for p in (out / "thumbs").iterdir()) == ["notes.txt"]


def test_non_finite_rows_are_left_out(rule_store, tmp_path):
    from test_store import poison

    copy = tmp_path / "poisoned"
    shutil.copytree(rule_store, copy)
    poison(copy, {1: np.nan, 7: -np.inf})
    clean, table = audit_table(LabelStore(rule_store)), audit_table(LabelStore(copy), chunk_rows=2)
    assert table.rows.tolist() == [0, 2, 3, 4, 6] and table.nonfinite.tolist() == [1, 7]
    kept = np.isin(clean.rows, table.rows)
    np.testing.assert_array_equal(table.label_prob, clean.label_prob[kept])
    assert [table.present(i) for i in range(5)] == [clean.present(i) for i in np.flatnonzero(kept)]

    result = run_cli("audit", copy, "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "non-finite" in line]
    assert len(warning) == 1 and str(copy) in warning[0] and "2 labelled rows" in warning[0] and "row 1" in warning[0]
    assert [line["row"] for line in read_csv(tmp_path / "report" / "audit.csv")] == ["4", "2", "3", "0", "6"]
    assert json.loads((tmp_path / "report" / "labels.json").read_text()) == [[3], [], [3], [3, 6], [3], [], [3, 9], []]


def test_cli_defaults_are_the_rules_defaults():
    from trt_relabel.cli.audit import audit_command

    parameters = inspect.signature(audit_command).parameters
    for name, default in vars(AuditRules()).items():
        assert parameters[name].default == default, name


def test_cli_errors_are_one_line(rule_store, tmp_path):
    missing = run_cli("audit", tmp_path / "nothing", "--out", tmp_path / "r")
    assert missing.returncode == 1 and missing.stderr.startswith(f"error: {tmp_path / 'nothing'}: ")
    assert len(missing.stderr.strip().splitlines()) == 1
    bad_prob = run_cli("audit", rule_store, "--out", tmp_path / "r", "--present-prob", "0")
    assert bad_prob.returncode == 2 and "--present-prob" in bad_prob.stderr
    bad_top = run_cli("audit", rule_store, "--out", tmp_path / "r", "--top", "-1")
    assert bad_top.returncode == 2
    for result in (missing, bad_prob, bad_top):
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


# --- End to end: the bundled teacher on the packaged free photos ---

PLANTED = "coffee/chelsea_planted.jpg"  # the cat photo in the espresso folder


@pytest.fixture(scope="module")
def teacher_report(photos, bundled_graphs, tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, report folder): the photos (and a resized copy of each) in folders of their
    class, the cat photo planted among the espressos, and a 2x2 mosaic of the four photos without a
    class; labelled by the bundled teacher (file list: the ImageNet class indices), audited by the
    CLI with --top 4."""
    from trt_relabel.generate import generate

    root = tmp_path_factory.mktemp("audit-e2e")
    data = root / "data"
    entries = {}
    for folder, name, label in [("coffee", "coffee", COFFEE_CLASS), ("cat", "chelsea", CAT_CLASSES[0]),
                                ("uniform", "grace_hopper", UNIFORM_CLASS)]:  # fmt: skip
        (data / folder).mkdir(parents=True)
        image = Image.fromarray(photos[name])
        image.save(data / folder / f"{name}.jpg", quality=90)
        image.resize((image.width // 2, image.height // 2)).save(data / folder / f"{name}_small.jpg", quality=90)
        entries.update({f"{folder}/{name}.jpg": label, f"{folder}/{name}_small.jpg": label})
    Image.fromarray(photos["chelsea"]).save(data / PLANTED, quality=90)
    entries[PLANTED] = COFFEE_CLASS
    tiles = [Image.fromarray(photos[n]).resize((240, 240)) for n in ("coffee", "chelsea", "grace_hopper", "rocket")]
    mosaic = Image.new("RGB", (480, 480))
    for i, tile in enumerate(tiles):
        mosaic.paste(tile, ((i % 2) * 240, (i // 2) * 240))
    (data / "mixed").mkdir()
    mosaic.save(data / "mixed" / "mosaic.jpg", quality=90)
    entries["mixed/mosaic.jpg"] = -1
    file_list = root / "files.txt"
    file_list.write_text("".join(f"{path}\t{label}\n" for path, label in entries.items()))
    store = root / "store"
    generate(data, store, file_list=file_list, backend="onnxruntime", engines_dir=bundled_graphs.fp32.parent,
             batch_size=4, workers=0, progress=False)  # fmt: skip
    result = run_cli("audit", store, "--data", data, "--out", root / "report", "--top", "4")
    assert result.returncode == 0, result.stderr
    assert "suspect labels" in result.stderr and str(root / "report" / "index.html") in result.stderr
    return data, root / "report"


def test_planted_error_ranks_first(teacher_report):
    _, report = teacher_report
    lines = read_csv(report / "audit.csv")
    assert lines[0]["path"] == PLANTED
    assert lines[0]["suspect"] == "1" and int(lines[0]["teacher_top1"]) in CAT_CLASSES
    mosaic = lines[-1]
    assert mosaic["path"] == "mixed/mosaic.jpg" and mosaic["label"] == "-1" and mosaic["multi_object"] == "1"
    present = {int(c) for c in mosaic["present"].split()}
    assert COFFEE_CLASS in present and present & set(CAT_CLASSES)
    real = json.loads((report / "labels.json").read_text())
    assert len(real) == len(lines) and sorted(map(sorted, real)) == sorted(
        sorted(map(int, r["present"].split())) for r in lines
    )


CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0",
                  "--virtual-time-budget=10000")  # fmt: skip
#: Injected into a copy of index.html next to it: records errors (scripts, images that fail to load) from
#: the start, then once loaded checks every image, sorts the class table by images twice and writes the
#: result into <pre id="audit-check">.
CHECK_HEAD = """<script>window.auditErrors = [];
addEventListener("error", e => auditErrors.push(e.target.src ? "failed " + e.target.src : e.message), true);</script>"""
CHECK_END = """<script>addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute("src"));
  const table = document.getElementById("class-table"), header = table.tHead.rows[0].cells[2];
  header.click(); header.click();
  const counts = Array.from(table.tBodies[0].rows, row => Number(row.cells[2].textContent));
  const out = document.createElement("pre");
  out.id = "audit-check";
  const order = header.dataset.order;
  out.textContent = JSON.stringify({images: images.length, broken, errors: auditErrors, counts, order});
  document.body.append(out);
});</script>"""


def chromium(*args: str | Path, profile: Path) -> subprocess.CompletedProcess:
    """Headless chromium with a fresh profile (no network use of its own)."""
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_report_in_headless_chromium(teacher_report, tmp_path):
    _, report = teacher_report
    html = (report / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing to fetch: no CDN
    page = html.replace("<head>", "<head>" + CHECK_HEAD, 1).replace("</body>", CHECK_END + "</body>", 1)
    (report / "check.html").write_text(page)
    loaded = chromium("--dump-dom", (report / "check.html").as_uri(), profile=tmp_path / "profile1")
    assert loaded.returncode == 0, loaded.stderr
    assert not re.findall(r".*:CONSOLE.*", loaded.stderr)  # the page logs nothing: no error, no warning
    found = re.search(r'<pre id="audit-check">(.*?)</pre>', loaded.stdout, re.S)
    assert found, loaded.stdout[-2000:]
    check = json.loads(html_module.unescape(found.group(1)))
    shown = len(set(re.findall(r'src="(thumbs/[^"]+)"', html)))
    assert check["images"] >= shown >= 4 and check["broken"] == [] and check["errors"] == []
    assert check["counts"] == [3, 2, 2] and check["order"] == "desc"  # espresso (3 images) first

    shot = tmp_path / "report.png"
    taken = chromium("--window-size=1280,1600", f"--screenshot={shot}", (report / "index.html").as_uri(),
                     profile=tmp_path / "profile2")  # fmt: skip
    assert taken.returncode == 0, taken.stderr
    assert not re.findall(r".*:CONSOLE.*", taken.stderr)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (1600, 1280, 3)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # text, charts, photos
