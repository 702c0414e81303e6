"""The `trt-relabel` command line: a thin typer layer over the Python API.

Each sub-module registers its commands on :data:`app`; heavy imports (torch, onnx) happen inside
the commands so that `trt-relabel --help` stays fast.
"""

from __future__ import annotations

from trt_relabel.cli._app import app, main

# Importing the command modules registers their commands on `app`.
from trt_relabel.cli import engine as _engine  # noqa: F401,E402  build-engine, bench

__all__ = ["app", "main"]
