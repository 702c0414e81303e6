"""The `trt-relabel` command line: a thin typer layer over the Python API.

Each sub-module registers its commands on :data:`app`; heavy imports (torch, onnx) happen inside
the commands so that `trt-relabel --help` stays fast.
"""

from __future__ import annotations

# Importing the command modules registers their commands on `app`, in the order `--help` lists them.
# isort: off
from trt_relabel.cli import engine as _engine  # noqa: F401  teachers, build-engine
from trt_relabel.cli import generate as _generate  # noqa: F401  generate
from trt_relabel.cli import train as _train  # noqa: F401  train
from trt_relabel.cli import interop as _interop  # noqa: F401  import/export-relabel, merge, join, show, stats
from trt_relabel.cli import audit as _audit  # noqa: F401  audit
from trt_relabel.cli import bench as _bench  # noqa: F401  bench
from trt_relabel.cli import samples as _samples  # noqa: F401  sample-images

# isort: on
from trt_relabel.cli._app import app, main

__all__ = ["app", "main"]
