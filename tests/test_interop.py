"""import-relabel / export-relabel / merge on real files: official-format .pt maps written with
torch.save for a generated ImageFolder, real label stores, and the real CLI in subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trt_relabel.images import ImageEntry, list_images
from trt_relabel.interop import RELABEL_SPEC, TEACHER_FILE, import_relabel, merge_maps, merge_stores
from trt_relabel.store import LabelStore, create_store
from trt_relabel.store_format import StoreError, StoreSpec

CLI = Path(sys.executable).parent / "trt-relabel"
WNIDS = ("n01440764", "n01443537")


class NotATensor:
    """A custom class: torch.load(weights_only=True) must refuse to unpickle it."""

    def __init__(self) -> None:
        self.scores = torch.zeros(2, 5, 15, 15)


class CodeOnLoad:
    """Unpickling this would run os.makedirs(marker): proof that nothing is unpickled unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


def official_map(seed: int, float16_exact: bool = False) -> torch.Tensor:
    """A plausible official map: float32 [2, 5, 15, 15], descending logits, 5 distinct classes per cell."""
    generator = torch.Generator().manual_seed(seed)
    scores = (torch.randn(5, 15, 15, generator=generator) * 4).sort(dim=0, descending=True).values
    if float16_exact:
        scores = scores.half().float()
    first = torch.randint(0, 1000, (1, 15, 15), generator=generator)
    classes = (first + torch.arange(5)[:, None, None] * 37) % 1000
    return torch.stack([scores, classes.float()])


def with_value(tensor: torch.Tensor, index: tuple[int, ...], value: float) -> torch.Tensor:
    tensor[index] = value
    return tensor


def make_image_folder(root: Path, stems_per_class: int) -> list[ImageEntry]:
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(parents=True)
        for i in range(stems_per_class):
            suffix = ".JPEG" if (c + i) % 2 else ".png"
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(root / wnid / f"img{i}{suffix}")
    return list_images(root)


def write_maps(relabel_root: Path, samples: list[ImageEntry], float16_exact: bool) -> dict[str, torch.Tensor]:
    maps = {}
    for n, sample in enumerate(samples):
        path = relabel_root / Path(sample.path).with_suffix(".pt")
        path.parent.mkdir(parents=True, exist_ok=True)
        maps[sample.path] = official_map(n, float16_exact=float16_exact and n % 2 == 0)
        torch.save(maps[sample.path], path)
    return maps


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(data folder, relabel root, relative image path -> its map); every other map float16-exact."""
    root = tmp_path_factory.mktemp("official")
    samples = make_image_folder(root / "data", 3)
    maps = write_maps(root / "relabel", samples, float16_exact=True)
    return root / "data", root / "relabel", maps


def test_import_export_round_trip(official, tmp_path):
    data, relabel_root, maps = official
    summary = import_relabel(relabel_root, data, tmp_path / "store")
    assert (summary.imported, summary.failed, summary.complete) == (len(maps), 0, True)

    store = LabelStore(tmp_path / "store")
    assert store.spec == RELABEL_SPEC
    assert store.manifest["source"] == "import-relabel" and store.manifest["value_kind"] == "logits"
    assert [s.path for s in store.samples] == sorted(maps)
    for row, sample in enumerate(store.samples):
        values, indices = store[row]
        expected = maps[sample.path]
        np.testing.assert_array_equal(values, expected[0].half().numpy())  # float32 rounded to float16
        np.testing.assert_array_equal(indices, expected[1].numpy().astype(np.int16))

    result = run_cli("export-relabel", tmp_path / "store", "--out", tmp_path / "exported", "--workers", "2")
    assert result.returncode == 0, result.stderr
    exported = sorted(p.relative_to(tmp_path / "exported").as_posix() for p in (tmp_path / "exported").rglob("*"))
    assert exported == sorted([*WNIDS, TEACHER_FILE, *(str(Path(p).with_suffix(".pt")) for p in maps)])
    for n, (path, original) in enumerate(sorted(maps.items())):
        tensor = torch.load(tmp_path / "exported" / Path(path).with_suffix(".pt"), weights_only=True)
        assert tensor.dtype == torch.float32 and tensor.shape == (2, 5, 15, 15)
        assert torch.equal(tensor, torch.stack([original[0].half().float(), original[1]]))
        if n % 2 == 0:  # float16-representable originals come back bit-exact
            assert torch.equal(tensor, original)

    again = import_relabel(tmp_path / "exported", data, tmp_path / "again")
    assert again.failed == 0
    reimported = LabelStore(tmp_path / "again")
    assert np.array_equal(reimported.values, store.values) and np.array_equal(reimported.indices, store.indices)


def test_export_then_import_keeps_the_teacher(official, tmp_path):
    """Maps exported from a store of another teacher come back under that teacher's name and hash,
    not as the official maps."""
    data, _, _ = official
    samples = list_images(data)
    teacher = StoreSpec("efficientnet_lite0", "1f" * 32, "2e" * 32, 475, (15, 15), 5, 1000)
    maps = [official_map(n, float16_exact=True) for n in range(len(samples))]
    values, indices = (np.stack([m[i].numpy() for m in maps]) for i in (0, 1))
    make_store(tmp_path / "store", teacher, samples, values, indices.astype(np.int64))
    assert run_cli("export-relabel", tmp_path / "store", "--out", tmp_path / "maps").returncode == 0
    imported = run_cli("import-relabel", tmp_path / "maps", "--data", data, "--out", tmp_path / "again")
    assert imported.returncode == 0, imported.stderr
    again = LabelStore(tmp_path / "again")
    assert again.spec == teacher and np.array_equal(again.values, LabelStore(tmp_path / "store").values)

    other = StoreSpec("small", "3d" * 32, "", 224, (7, 7), 3, 1000)
    (tmp_path / "maps" / TEACHER_FILE).write_text(json.dumps(asdict(other)))
    refused = run_cli("import-relabel", tmp_path / "maps", "--data", data, "--out", tmp_path / "third")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "top-3 of 7x7 cells" in refused.stderr and not (tmp_path / "third").exists()


def test_bad_files_are_listed_and_the_rest_imported(tmp_path):
    samples = make_image_folder(tmp_path / "data", 6)
    relabel_root = tmp_path / "relabel"
    maps = write_maps(relabel_root, samples, float16_exact=False)
    marker = tmp_path / "code-ran"
    bad = {
        "n01440764/img0": ("class index 1000", lambda t: with_value(t, (1, 2, 3, 4), 1000)),
        "n01440764/img1": ("class index -1", lambda t: with_value(t, (1, 0, 0, 0), -1)),
        "n01440764/img2": ("class index 3.5", lambda t: with_value(t, (1, 4, 14, 14), 3.5)),
        "n01440764/img3": ("[2, 5, 14, 15]", lambda t: t[:, :, :14]),
        "n01440764/img4": ("[3, 5, 15, 15]", lambda t: torch.cat([t, t[:1]])),
        "n01440764/img5": ("missing", None),
        "n01443537/img0": ("corrupt or not a plain tensor file", b"\x80\x02" + np.random.default_rng(3).bytes(300)),
        "n01443537/img1": ("NotATensor was not an allowed global", NotATensor()),
        "n01443537/img2": ("GLOBAL os.makedirs", CodeOnLoad(marker)),
    }
    for stem, (_, change) in bad.items():
        path = relabel_root / f"{stem}.pt"
        if change is None:
            path.unlink()
        elif isinstance(change, bytes):
            path.write_bytes(change)
        elif callable(change):
            torch.save(change(torch.load(path, weights_only=True).clone()), path)
        else:
            torch.save({"map": change}, path)

    out = tmp_path / ("a-long-folder-name-" * 6) / "store"  # the summary keeps a long path whole, unwrapped
    result = run_cli("import-relabel", relabel_root, "--data", tmp_path / "data", "--out", out, "-j", "1")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{len(bad)} inputs failed" in result.stderr and str(out / "errors.jsonl") in result.stderr
    assert not marker.exists()

    store = LabelStore(out)
    errors = {Path(e["path"]).with_suffix("").as_posix(): e["reason"] for e in store.errors()}
    assert len(store.errors()) == len(bad) and errors.keys() == bad.keys()
    for stem, (reason, _) in bad.items():
        assert reason in errors[stem] and "\n" not in errors[stem], errors[stem]
    assert store.complete and store.manifest["num_failed"] == len(bad)
    for row, sample in enumerate(store.samples):
        is_good = Path(sample.path).with_suffix("").as_posix() not in bad
        assert store.labelled()[row] == is_good
        if is_good:
            np.testing.assert_array_equal(store[row][0], maps[sample.path][0].half().numpy())

    # The missing map turns up: --retry-failed reads the failed rows again, and only those.
    row, fixed = next((r, s.path) for r, s in enumerate(store.samples) if s.path.startswith("n01440764/img5."))
    torch.save(maps[fixed], relabel_root / "n01440764" / "img5.pt")
    args = ("import-relabel", relabel_root, "--data", tmp_path / "data", "--out", out, "-j", "1", "--retry-failed")
    result = run_cli(*args)
    assert result.returncode == 1 and f"{len(bad) - 1} inputs failed" in result.stderr, result.stderr
    assert "1 maps imported now" in result.stderr
    store = LabelStore(out)
    assert store.labelled()[row] and len(store.errors()) == len(bad) - 1 and store.complete
    np.testing.assert_array_equal(store[row][0], maps[fixed][0].half().numpy())


def test_images_sharing_a_map_file_are_failed_on_import_and_refused_on_export(tmp_path):
    samples = make_image_folder(tmp_path / "data", 2)
    relabel_root = tmp_path / "relabel"
    maps = write_maps(relabel_root, samples, float16_exact=True)
    twin = f"{WNIDS[0]}/img0.bmp"  # img0.<other extension> maps to img0.pt as well
    Image.new("RGB", (16, 12)).save(tmp_path / "data" / twin)
    summary = import_relabel(relabel_root, tmp_path / "data", tmp_path / "store")
    assert (summary.imported, summary.failed, summary.already_done) == (len(maps) - 1, 2, 0)
    store = LabelStore(tmp_path / "store")
    errors = {e["path"]: e["reason"] for e in store.errors()}
    first = next(path for path in maps if path.startswith(f"{WNIDS[0]}/img0."))
    assert errors.keys() == {first, twin} and twin in errors[first] and first in errors[twin]

    exported = run_cli("export-relabel", tmp_path / "store", "--out", tmp_path / "exported")
    assert exported.returncode == 0, exported.stderr  # the twins are failed rows: nothing to export
    labelled = create_store(tmp_path / "both", RELABEL_SPEC, store.samples)
    labelled.write(np.arange(len(store)), *(np.zeros((len(store), 5, 15, 15), dtype) for dtype in ("f2", "i2")))
    labelled.finish()
    refused = run_cli("export-relabel", tmp_path / "both", "--out", tmp_path / "refused")
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and len(refused.stderr.splitlines()) == 1
    assert f"{twin} and {first} would both be written to" in refused.stderr  # .bmp sorts first
    assert not (tmp_path / "refused").exists()
    one_labelled = create_store(tmp_path / "one", RELABEL_SPEC, store.samples)
    twin_row = [s.path for s in store.samples].index(twin)
    others = np.array([row for row in range(len(store)) if row != twin_row])
    one_labelled.write(others, *(np.zeros((len(others), 5, 15, 15), dtype) for dtype in ("f2", "i2")))
    one_labelled.mark_failed(twin_row, "not labelled")
    one_labelled.finish()
    assert run_cli("export-relabel", tmp_path / "one", "--out", tmp_path / "one-out").returncode == 0
    assert (tmp_path / "one-out" / Path(first).with_suffix(".pt")).is_file()


def test_resume_reads_only_pending_rows(official, tmp_path):
    data, relabel_root, maps = official

    def interrupt_after_first_chunk(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_relabel(relabel_root, data, tmp_path / "store", chunk_rows=2, progress=interrupt_after_first_chunk)
    first = LabelStore(tmp_path / "store")
    assert first.labelled().sum() == 2 and not first.complete

    # Rows done before must not be read again: without their files the resume still succeeds.
    partial_root = tmp_path / "partial"
    for row, sample in enumerate(first.samples):
        if not first.labelled()[row]:
            target = partial_root / Path(sample.path).with_suffix(".pt")
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save(maps[sample.path], target)
    summary = import_relabel(partial_root, data, tmp_path / "store")
    assert (summary.already_done, summary.imported, summary.failed) == (2, len(maps) - 2, 0)
    assert summary.complete and LabelStore(tmp_path / "store").labelled().all()


def make_store(path: Path, spec: StoreSpec, samples, values, indices, failed_rows=()) -> LabelStore:
    writer = create_store(path, spec, samples)
    good = np.array([r for r in range(len(samples)) if r not in failed_rows])
    writer.write(good, np.asarray(values)[good], np.asarray(indices)[good])
    for row in failed_rows:
        writer.mark_failed(row, "test failure")
    writer.finish()
    return LabelStore(path)


def spec(name: str, topk: int, map_size=(1, 2), num_classes: int = 10) -> StoreSpec:
    return StoreSpec(name, f"hash-{name}", "", 224, map_size, topk, num_classes)


SAMPLES = [ImageEntry("a/x.jpg", 0), ImageEntry("b/y.jpg", 1)]


@pytest.fixture
def two_teachers(tmp_path) -> tuple[Path, Path]:
    """Teacher A (k=3) and B (k=2) on a 1x2 map; cell 0 overlaps, cell 1 is disjoint; row 1 failed in B."""
    a_values = [[[[5, 2]], [[4, 1]], [[3, 0.5]]]] * 2  # [N=2, k=3, h=1, w=2]
    a_indices = [[[[1, 0]], [[2, 4]], [[3, 5]]]] * 2
    b_values = [[[[6, 3]], [[1, -1]]]] * 2  # [N=2, k=2, h=1, w=2]
    b_indices = [[[[2, 6]], [[7, 8]]]] * 2
    make_store(tmp_path / "a", spec("a", 3), SAMPLES, a_values, a_indices)
    make_store(tmp_path / "b", spec("b", 2), SAMPLES, b_values, b_indices, failed_rows=[1])
    return tmp_path / "a", tmp_path / "b"


def test_merge_by_hand(two_teachers, tmp_path):
    a, b = two_teachers
    summary = merge_stores([a, b], tmp_path / "merged", weights=[1, 3])
    assert (summary.merged, summary.failed) == (1, 1)
    merged = LabelStore(tmp_path / "merged")
    # weights 1/4, 3/4. A class missing from a teacher's top-k counts with that teacher's k-th value.
    # Cell 0: A {1: 5, 2: 4, 3: 3} (k-th 3), B {2: 6, 7: 1} (k-th 1):
    #   2: 4/4 + 3*6/4 = 5.5;  1: 5/4 + 3*1/4 = 2.0;  3: 3/4 + 3/4 = 1.5;  7: 3/4 + 3/4 = 1.5 (tie: A's class first)
    # Cell 1 (disjoint): A {0: 2, 4: 1, 5: 0.5} (k-th 0.5), B {6: 3, 8: -1} (k-th -1):
    #   6: 0.5/4 + 9/4 = 2.375;  0: 2/4 - 3/4 = -0.25;  4: 1/4 - 3/4 = -0.5;  5, 8: -0.625
    np.testing.assert_array_equal(merged.values[0, :, 0], [[5.5, 2.375], [2.0, -0.25], [1.5, -0.5]])
    np.testing.assert_array_equal(merged.indices[0, :, 0], [[2, 6], [1, 0], [3, 4]])
    assert merged.labelled().tolist() == [True, False]
    assert merged.errors() == [{"path": "b/y.jpg", "reason": f"failed in the input store {b}"}]
    assert merged.spec.teacher == "merge(a,b)" and merged.topk == 3
    assert [m["weight"] for m in merged.manifest["merged_from"]] == [0.25, 0.75]

    merge_stores([a, b], tmp_path / "top2", topk=2)  # equal weights
    top2 = LabelStore(tmp_path / "top2")
    # cell 0: 2: (4 + 6)/2 = 5;  1: (5 + 1)/2 = 3;  cell 1: 6: (0.5 + 3)/2 = 1.75;  0: (2 - 1)/2 = 0.5
    np.testing.assert_array_equal(top2.values[0, :, 0], [[5, 1.75], [3, 0.5]])
    np.testing.assert_array_equal(top2.indices[0, :, 0], [[2, 6], [1, 0]])
    assert top2.spec.teacher_hash != merged.spec.teacher_hash


def reference_merge(values, indices, weights, topk):
    """Cell by cell with dicts: the weighted mean over the union of classes, a missing class
    counting with the teacher's smallest kept logit. Returns {class: logit} per cell."""
    batch, _, height, width = values[0].shape
    cells = {}
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                kept = [
                    dict(zip(i[b, :, y, x].tolist(), v[b, :, y, x].tolist(), strict=True))
                    for v, i in zip(values, indices, strict=True)
                ]
                union = set().union(*kept)
                cells[b, y, x] = {
                    c: sum(w * t.get(c, min(t.values())) for w, t in zip(weights, kept, strict=True)) for c in union
                }
    return cells


def test_merge_maps_matches_a_per_cell_reference():
    rng = np.random.default_rng(1)
    shapes = [(6, 5, 3, 4), (6, 3, 3, 4), (6, 4, 3, 4)]  # three teachers, different k
    values = [np.sort(rng.normal(0, 3, s).astype(np.float32), axis=1)[:, ::-1] for s in shapes]
    indices = [
        np.stack([rng.permutation(9)[: s[1]] for _ in range(6 * 12)]).reshape(6, 12, s[1]).transpose(0, 2, 1).reshape(s)
        for s in shapes
    ]  # classes 0..8: many overlaps
    weights = np.array([0.5, 0.2, 0.3])
    merged_values, merged_indices = merge_maps(values, indices, weights, topk=5)
    for (b, y, x), logits in reference_merge(values, indices, weights, 5).items():
        best = sorted(logits.values(), reverse=True)[:5]
        np.testing.assert_allclose(merged_values[b, :, y, x], best, rtol=1e-5, atol=1e-6)
        for c, v in zip(merged_indices[b, :, y, x], merged_values[b, :, y, x], strict=True):
            assert logits[int(c)] == pytest.approx(v, rel=1e-5, abs=1e-6)
        assert len(set(merged_indices[b, :, y, x].tolist())) == 5


@pytest.mark.parametrize(
    ("other_spec", "other_samples", "message"),
    [
        (spec("c", 3), [ImageEntry("a/x.jpg", 0), ImageEntry("b/z.jpg", 1)], "sample 1 is 'b/z.jpg'"),
        (spec("c", 3), [ImageEntry("a/x.jpg", 0), ImageEntry("b/y.jpg", 2)], "sample 1 is 'b/y.jpg' class 2"),
        (spec("c", 3, map_size=(2, 2)), SAMPLES, "map size (2, 2) differs"),
        (spec("c", 3, num_classes=20), SAMPLES, "number of classes 20 differs"),
    ],
)
def test_merge_refuses_misaligned_stores(two_teachers, tmp_path, other_spec, other_samples, message):
    a, _ = two_teachers
    k, h, w = other_spec.row_shape
    make_store(
        tmp_path / "c",
        other_spec,
        other_samples,
        np.zeros((2, k, h, w)),
        np.tile(np.arange(k)[:, None, None], (2, 1, h, w)),
    )
    with pytest.raises(StoreError, match=re.escape(message)) as error:
        merge_stores([a, tmp_path / "c"], tmp_path / "merged")
    assert str(error.value).startswith(str(tmp_path / "c")) and "\n" not in str(error.value)


def test_merge_cli_errors(two_teachers, tmp_path):
    a, b = two_teachers
    make_store(
        tmp_path / "wide",
        spec("w", 3, map_size=(2, 2)),
        SAMPLES,
        np.zeros((2, 3, 2, 2)),
        np.tile(np.arange(3)[:, None, None], (2, 1, 2, 2)),
    )
    misaligned = run_cli("merge", a, tmp_path / "wide", "--out", tmp_path / "m1")
    assert misaligned.returncode == 1 and "Traceback" not in misaligned.stderr
    assert f"{tmp_path / 'wide'}: map size" in misaligned.stderr
    bad_weights = run_cli("merge", a, b, "--out", tmp_path / "m2", "--weights", "1,2,3")
    assert bad_weights.returncode == 2 and "3 weights for 2 stores" in bad_weights.stderr
    assert "Traceback" not in bad_weights.stderr
    ok = run_cli("merge", a, b, "--out", tmp_path / "m3", "--weights", "1,3")
    assert ok.returncode == 0, ok.stderr
    assert np.array_equal(LabelStore(tmp_path / "m3").values[0, 0, 0], [5.5, 2.375])
    assert json.loads((tmp_path / "m3" / "manifest.json").read_text())["merged_from"][1]["path"] == str(b)
    assert run_cli("merge", a, b, "--out", tmp_path / "m3", "--weights", "1,3").returncode == 0  # resumed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights": [1, 1]}, "input 1 weight 0.25 (this run: 0.5)"),
        ({"topk": 2}, "topk 3 (this run: 2)"),
        ({"swap": True}, "input 1 path"),
    ],
)
def test_resumed_merge_names_the_field_that_differs(two_teachers, tmp_path, change, message):
    a, b = two_teachers
    merge_stores([a, b], tmp_path / "merged", weights=[1, 3])
    inputs = [b, a] if change.get("swap") else [a, b]
    with pytest.raises(StoreError) as error:
        merge_stores(inputs, tmp_path / "merged", weights=change.get("weights", [1, 3]), topk=change.get("topk"))
    assert message in str(error.value) and "pass --overwrite to start over" in str(error.value)
    assert not re.search("[0-9a-f]{64}", str(error.value))
