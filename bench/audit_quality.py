"""Quality of `trt-relabel audit` on real ImageNet photos (LOCAL check: the photos are never committed).

Reads the 200 photos of ../shared/imagenet-samples (`<synset>_<name>.JPEG`, one per class) and
builds, under --work (default /tmp/audit_quality):

- ``planted/``: an ImageFolder by WordNet id (``<wnid>/<file>``) where 10 photos (seeded choice) are
  moved into the folder of another class: the planted label errors. It is labelled with a file list
  that gives each file the class index of its folder's wnid (position in the sorted 1000 synsets),
  so the store's folder labels are the teacher's class indices whatever the folder layout.
- ``mosaics/``: a flat folder of 2x2 mosaics, each of four photos of four different classes.

Both are labelled with the bundled teacher (CPU, ONNX Runtime; a complete store of an earlier run is kept)
and audited. Prints the recall of the planted errors in the first 10 and 20 rows of audit.csv,
the ranks of the natural disagreements (teacher top-1 != folder class), the recall of the four
classes of each mosaic in its present set, and the multi-object flag rate of mosaics vs single
photos (the 190 photos in their own folder).

    python bench/audit_quality.py [--samples ../shared/imagenet-samples] [--work /tmp/audit_quality]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
from pathlib import Path

from PIL import Image

from trt_relabel.classes import imagenet_synsets

NUM_PLANTED = 10
NUM_MOSAICS = 50
TILE = 240


def wnid_of(photo: Path) -> str:
    return photo.name.split("_", 1)[0]


def build_planted(photos: list[Path], root: Path, seed: int) -> tuple[Path, set[str]]:
    """The ImageFolder by wnid with NUM_PLANTED photos in a wrong class folder, and its file list
    (``path<TAB>class index of the folder's wnid``). Returns (file list, planted relative paths)."""
    index_of = {wnid: i for i, wnid in enumerate(imagenet_synsets())}
    rng = random.Random(seed)
    wnids = sorted({wnid_of(p) for p in photos})
    planted = set(rng.sample(range(len(photos)), NUM_PLANTED))
    lines, planted_paths = [], set()
    for n, photo in enumerate(photos):
        folder = wnid_of(photo)
        if n in planted:
            folder = rng.choice([w for w in wnids if w != folder])
            planted_paths.add(f"{folder}/{photo.name}")
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, root / folder / photo.name)
        lines.append(f"{folder}/{photo.name}\t{index_of[folder]}\n")
    file_list = root.parent / "planted.txt"
    file_list.write_text("".join(sorted(lines)))
    return file_list, planted_paths


def build_mosaics(photos: list[Path], root: Path, seed: int) -> dict[str, list[int]]:
    """NUM_MOSAICS 2x2 mosaics of four photos of different classes (each resized to TILE x TILE).
    Returns file name -> the four class indices."""
    index_of = {wnid: i for i, wnid in enumerate(imagenet_synsets())}
    rng = random.Random(seed + 1)
    root.mkdir(parents=True, exist_ok=True)
    classes = {}
    for n in range(NUM_MOSAICS):
        four = rng.sample(photos, 4)  # one photo per class: four different classes
        mosaic = Image.new("RGB", (2 * TILE, 2 * TILE))
        for i, photo in enumerate(four):
            tile = Image.open(photo).convert("RGB").resize((TILE, TILE), Image.Resampling.BICUBIC)
            mosaic.paste(tile, ((i % 2) * TILE, (i // 2) * TILE))
        name = f"mosaic{n:03d}.jpg"
        mosaic.save(root / name, quality=92)
        classes[name] = [index_of[wnid_of(p)] for p in four]
    return classes


def label(data: Path, store: Path, engines: Path, file_list: Path | None = None) -> None:
    """Label `data` into `store` with the bundled teacher, unless an earlier run completed it."""
    from trt_relabel.generate import generate
    from trt_relabel.store import LabelStore

    if store.exists() and LabelStore(store).complete:
        return
    generate(data, store, file_list=file_list, backend="onnxruntime", engines_dir=engines, batch_size=16)


def counts(values: list[int]) -> dict[int, int]:
    """value -> how often, by value."""
    return {v: values.count(v) for v in sorted(set(values))}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=Path("../shared/imagenet-samples"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/audit_quality"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only-label", action="store_true", help="Build and label; do not audit.")
    args = parser.parse_args()

    photos = sorted(args.samples.glob("n*_*.JPEG"))
    work = args.work
    if not (work / "planted").exists():
        file_list, planted = build_planted(photos, work / "planted", args.seed)
        (work / "planted.json").write_text(json.dumps(sorted(planted)))
        (work / "mosaics.json").write_text(json.dumps(build_mosaics(photos, work / "mosaics", args.seed)))
    planted = set(json.loads((work / "planted.json").read_text()))
    mosaics = json.loads((work / "mosaics.json").read_text())
    label(work / "planted", work / "planted.store", work / "engines", work / "planted.txt")
    label(work / "mosaics", work / "mosaics.store", work / "engines")
    if args.only_label:
        return
    report(work, planted, mosaics)


def report(work: Path, planted: set[str], mosaics: dict[str, list[int]]) -> None:
    from trt_relabel.audit import audit

    singles = audit(work / "planted.store", work / "planted.report", data=work / "planted")
    mixed = audit(work / "mosaics.store", work / "mosaics.report", data=work / "mosaics")
    rows = read_csv(work / "planted.report" / "audit.csv")
    ranks = [n for n, row in enumerate(rows, 1) if row["path"] in planted]
    print(f"planted errors: ranks {ranks}")
    print(f"  recall in the first 10 rows: {sum(r <= 10 for r in ranks)}/{NUM_PLANTED}")
    print(f"  recall in the first 20 rows: {sum(r <= 20 for r in ranks)}/{NUM_PLANTED}")
    natural = [
        (n, row) for n, row in enumerate(rows, 1) if row["path"] not in planted and row["teacher_top1"] != row["label"]
    ]
    print(f"natural disagreements (teacher top-1 != folder class): {len(natural)}, ranks {[n for n, _ in natural]}")
    for n, row in natural:
        print(
            f"  {n:3d} {row['path']}: label {row['label_name']} p={float(row['label_prob']):.3f} "
            f"rank {row['label_rank']}; teacher {row['teacher_top1_name']} p={float(row['teacher_top1_prob']):.3f}; "
            f"present {row['present']}; suspect {row['suspect']}"
        )
    single_rows = [row for row in rows if row["path"] not in planted]
    single_flags = sum(int(row["multi_object"]) for row in single_rows)
    single_sizes = [len(row["present"].split()) for row in single_rows]
    single_objects = [int(row["objects"]) for row in single_rows]
    print(
        f"single photos: multi_object {single_flags}/{len(single_rows)}; present-set sizes {counts(single_sizes)}; "
        f"objects {counts(single_objects)}"
    )
    print(f"all {singles.num_with_class} rows: folder class present {singles.num_label_present}, "
          f"teacher top-1 = folder class {singles.num_agree}, suspects {singles.num_suspects}")  # fmt: skip
    mosaic_rows = read_csv(work / "mosaics.report" / "audit.csv")
    found = [len(set(mosaics[Path(r["path"]).name]) & {int(c) for c in r["present"].split()}) for r in mosaic_rows]
    sizes = [len(r["present"].split()) for r in mosaic_rows]
    flags = sum(int(r["multi_object"]) for r in mosaic_rows)
    objects = [int(r["objects"]) for r in mosaic_rows]
    print(f"mosaics: four classes found in the present set {sum(found)}/{4 * len(found)} "
          f"({sum(found) / (4 * len(found)):.1%}); mosaics by classes found {counts(found)}; "
          f"multi_object {flags}/{len(mosaic_rows)} ({mixed.num_multi_object}); present-set sizes {counts(sizes)}; "
          f"objects {counts(objects)}")  # fmt: skip


if __name__ == "__main__":
    main()
