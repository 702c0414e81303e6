"""`sample-images`: a small ImageFolder of freely licensed photos to try the tool on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trt_relabel.cli._app import app, console


@app.command("sample-images")
def sample_images_command(
    out: Annotated[Path, typer.Argument(help="Folder to write (created; existing files are overwritten).")],
) -> None:
    """Write 12 freely licensed photos (espresso, a cat, Grace Hopper in uniform; resized, mirrored and
    cropped copies) as an ImageFolder with classes cat, coffee, uniform."""
    from trt_relabel.samples import write_sample_folder

    root = write_sample_folder(out)
    count = sum(1 for p in root.rglob("*") if p.is_file())
    console.print(f"wrote {count} images to {root}/ (class folders cat, coffee, uniform)")
