"""Finding and decoding inputs: what the listing cannot read is an input that fails (never dropped),
damaged JPEGs are refused, only raster formats are decoded, file lists keep any name's bytes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trt_relabel.errors import UsageError
from trt_relabel.generate_inputs import find_inputs
from trt_relabel.images import ImageEntry, ImageLoadError, list_images, load_rgb


def jpeg_bytes(photo: np.ndarray, mode: str = "RGB", size: tuple[int, int] = (160, 120)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo).resize(size).convert(mode).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def reason(path: Path) -> str:
    with pytest.raises(ImageLoadError) as error:
        load_rgb(path)
    return str(error.value)


def test_listing_keeps_what_it_cannot_read_as_failing_inputs(tmp_path, photos):
    root = tmp_path / "data"
    for folder in ("cat", "dog", "dog/deeper", "elsewhere"):
        (root / folder).mkdir(parents=True)
    photo = jpeg_bytes(photos["chelsea"])
    for name in ("cat/a.jpg", "cat/B.JPEG", "dog/deeper/c.png", "elsewhere/d.jpg"):
        (root / name).write_bytes(photo)
    (root / "cat" / "notes.txt").write_text("not an input")
    (root / "cat" / "broken.jpg").symlink_to(root / "cat" / "deleted.jpg")
    (root / "cat" / "loop.jpg").symlink_to("loop2.jpg")
    (root / "cat" / "loop2.jpg").symlink_to("loop.jpg")
    (root / "cat" / "broken_text").symlink_to("nowhere")  # no image suffix: not an input
    (root / "dog" / "link.jpg").symlink_to(root / "cat" / "a.jpg")
    (root / "dog" / "linked_folder.jpg").symlink_to(root / "elsewhere")  # links to folders are not followed
    (root / "dog" / "linked_folder").symlink_to(root / "elsewhere")

    entries = list_images(root)

    assert entries == [
        ImageEntry("cat/B.JPEG", 0),
        ImageEntry("cat/a.jpg", 0),
        ImageEntry("cat/broken.jpg", 0),
        ImageEntry("cat/loop.jpg", 0),
        ImageEntry("cat/loop2.jpg", 0),
        ImageEntry("dog/deeper/c.png", 1),
        ImageEntry("dog/link.jpg", 1),
        ImageEntry("elsewhere/d.jpg", 2),
    ]
    assert reason(root / "cat/broken.jpg") == f"broken symbolic link (target not found: {root / 'cat/deleted.jpg'})"
    assert reason(root / "cat/loop.jpg") == "symbolic link loop (too many levels of symbolic links)"
    assert load_rgb(root / "dog/link.jpg").size == (160, 120)


def test_listing_order_and_layout_are_those_of_a_sorted_rglob(tmp_path):
    """Same paths, order and classes as the earlier `sorted(rglob)` listing, on names whose sort
    order differs from a folder-by-folder walk ('a-b' < 'a/...' since '-' < '/')."""
    root = tmp_path / "data"
    names = ["a/x.jpg", "a-b/y.png", "a/sub/z.webp", "a.b/.hidden.jpg", "a/.jpg", "a/..jpg", "a/UPPER.TIF"]
    names.append("b/c/d/e.gif")
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / "empty_class").mkdir()
    images = {".jpg", ".png", ".webp", ".tif", ".gif"}
    expected = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix.lower() in images
    )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert ".jpg" not in {Path(e).name for e in expected}  # a bare ".jpg" has no suffix
    assert list_images(root) == [ImageEntry(p, classes.index(p.split("/")[0])) for p in expected]

    (root / "loose.jpg").write_bytes(b"x")  # an image directly under the root: a flat folder
    assert [(e.path, e.class_index) for e in list_images(root)] == [(p, -1) for p in sorted([*expected, "loose.jpg"])]


LIST_AS_NOBODY = """
import json, os, sys
from PIL import Image
from trt_relabel.errors import UsageError
from trt_relabel.generate_inputs import find_inputs
from trt_relabel.images import ImageLoadError, list_images, load_rgb
Image.init()  # every import happens before dropping root's rights (nobody cannot read /root)
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
root = sys.argv[1]
entries = list_images(root)
reasons = {}
for entry in entries:
    try:
        load_rgb(f"{root}/{entry.path}")
    except ImageLoadError as e:
        reasons[entry.path] = str(e)
try:
    find_inputs(f"{root}/cat/locked")
except UsageError as e:
    refused = str(e)
print(json.dumps({"entries": [[e.path, e.class_index] for e in entries], "reasons": reasons, "refused": refused}))
"""


def _run(script: str, *args: str) -> str:
    """Run `script` in a new Python process; returns its stdout."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_folder_that_cannot_be_listed_is_one_failing_input(photos):
    root = Path(tempfile.mkdtemp(prefix="trt-relabel-listing-"))  # the user nobody must reach it
    try:
        root.chmod(0o755)
        for folder in ("cat", "cat/locked", "dog"):
            (root / folder).mkdir()
        for name in ("cat/a.jpg", "cat/locked/hidden.jpg", "dog/b.jpg"):
            (root / name).write_bytes(jpeg_bytes(photos["chelsea"]))
            (root / name).chmod(0o644)
        for folder in ("cat", "dog"):
            (root / folder).chmod(0o755)
        (root / "cat" / "locked").chmod(0)
        found = json.loads(_run(LIST_AS_NOBODY, str(root)))  # as the user nobody: root ignores chmod
    finally:
        (root / "cat" / "locked").chmod(0o755)
        shutil.rmtree(root)
    assert found["entries"] == [["cat/a.jpg", 0], ["cat/locked", 0], ["dog/b.jpg", 1]]
    assert found["reasons"] == {
        "cat/locked": "folder that cannot be listed (permission denied); its images are unknown"
    }


def test_jpegs_with_missing_data_are_refused(tmp_path, photos):
    photo = jpeg_bytes(photos["coffee"])
    scan = photo.index(b"\xff\xda")
    cut = photo[: scan + (len(photo) - scan) // 2] + b"\xff\xd9"  # first half of the photo, then EOI
    (tmp_path / "half.jpg").write_bytes(cut)
    cmyk = jpeg_bytes(photos["coffee"], "CMYK")
    scan = cmyk.index(b"\xff\xda")
    (tmp_path / "half_cmyk.jpg").write_bytes(cmyk[: scan + (len(cmyk) - scan) // 2] + b"\xff\xd9")
    small = bytearray(jpeg_bytes(photos["coffee"], size=(16, 16)))
    frame = small.index(b"\xff\xc0")
    small[frame + 5 : frame + 9] = (9000).to_bytes(2, "big") * 2  # the header claims 9000 x 9000
    (tmp_path / "liar.jpg").write_bytes(bytes(small))
    assert Image.open(tmp_path / "liar.jpg").size == (9000, 9000)

    for name in ("half.jpg", "half_cmyk.jpg", "liar.jpg"):
        assert (
            reason(tmp_path / name)
            == "corrupt or truncated JPEG (libjpeg: Corrupt JPEG data: premature end of data segment)"
        )
    (tmp_path / "no_end.jpg").write_bytes(photo[: len(photo) // 2])
    assert reason(tmp_path / "no_end.jpg") == "corrupt or truncated JPEG (libjpeg: Premature end of JPEG file)"


def test_sound_jpegs_decode_to_pillows_pixels(tmp_path, photos):
    """libjpeg-turbo through simplejpeg gives Pillow's pixels bit for bit; stray bytes between two
    header segments ("2 extraneous bytes before marker 0xdb") are tolerated."""
    for mode in ("RGB", "L", "CMYK"):
        data = jpeg_bytes(photos["chelsea"], mode, size=(123, 77))
        (tmp_path / f"{mode}.jpg").write_bytes(data)
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(np.asarray(load_rgb(tmp_path / f"{mode}.jpg")), expected), mode
    data = jpeg_bytes(photos["chelsea"])
    tables = data.index(b"\xff\xdb")
    (tmp_path / "stray.jpg").write_bytes(data[:tables] + bytes(2) + data[tables:])  # libjpeg warns, no pixel lost
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "stray.jpg")), np.asarray(Image.open(io.BytesIO(data))))


def test_only_raster_formats_are_decoded(tmp_path, photos):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n"
    (tmp_path / "drawing.jpg").write_bytes(eps)
    (tmp_path / "document.jpg").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n")
    Image.fromarray(photos["coffee"]).save(tmp_path / "targa.jpg", "TGA")  # Pillow reads TGA: not accepted
    Image.fromarray(photos["coffee"]).save(tmp_path / "fine.jpg", "PNG")  # any accepted format, whatever the name
    for name in ("drawing.jpg", "document.jpg", "targa.jpg"):
        assert reason(tmp_path / name) == "not an image of an accepted format (JPEG, PNG, WEBP, TIFF, BMP, GIF, PPM)"
    assert load_rgb(tmp_path / "fine.jpg").size == (photos["coffee"].shape[1], photos["coffee"].shape[0])


def test_file_list_keeps_names_that_are_not_utf8(tmp_path, photos):
    data = tmp_path / "data"
    data.mkdir()
    name = b"caf\xe9.jpg"  # Latin-1: a legal file name that is not UTF-8
    (data / os.fsdecode(name)).write_bytes(jpeg_bytes(photos["coffee"]))
    listed = tmp_path / "list.txt"
    listed.write_bytes(b"# Latin-1 names\n" + name + b"\t3\n")
    entries = find_inputs(data, listed)
    assert entries == [ImageEntry(list_images(data)[0].path, 3)]  # the name the listing gives
    assert load_rgb(data / entries[0].path).size == (160, 120)

    listed.write_bytes(b"a.jpg\n" + "b.jpg\n".encode("utf-16"))  # UTF-16 has NUL bytes: not a text list
    with pytest.raises(UsageError) as error:
        find_inputs(data, listed)
    assert str(error.value) == f"{listed}:2: holds a NUL byte (a file list is UTF-8 text, one path a line)"
