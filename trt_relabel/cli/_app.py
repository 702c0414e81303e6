"""The typer application and the error handling every command shares."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from trt_relabel.errors import RelabelError

app = typer.Typer(
    name="trt-relabel",
    help="Re-label image classification data with a strong teacher (ONNX Runtime / TensorRT FP16) "
    "and train students on the label maps with LabelPooling.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Progress, reports and errors go to stderr; stdout stays free for machine-readable output. Lines
#: are never hard-wrapped (soft_wrap), so paths stay whole in logs and pipes.
console = Console(stderr=True, soft_wrap=True)


RetryFailedOpt = Annotated[
    bool, typer.Option("--retry-failed", help="Label again the inputs earlier runs failed on (once fixed).")
]


def print_error(message: str) -> None:
    console.print(Text.assemble(("error: ", "bold red"), message))


def main() -> None:
    """Console-script entry point: expected failures become one line and an exit code."""
    try:
        app()
    except RelabelError as e:
        print_error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
