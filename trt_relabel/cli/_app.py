"""The typer application, the options several commands share, and the error handling of every command.

Help follows the conventions of click and argparse tools: placeholders in capitals (`DATA`,
`--out PATH`), flags without a type, every default as `[default: ...]`, `-h` as `--help`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from trt_relabel import __version__
from trt_relabel.errors import Interrupted, RelabelError
from trt_relabel.terminal import console

__all__ = ["app", "console", "device_argument", "main", "print_error"]

#: Click's type names of the annotations our options use.
_TYPE_NAMES = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}


def _type_name(param: TyperArgument | TyperOption) -> str:
    annotation = param.type_descriptor.annotation
    element = getattr(annotation, "__args__", (annotation,))[0]  # list[Path] -> Path
    return "PATH" if param.type_descriptor.is_path else _TYPE_NAMES.get(element, element.__name__.upper())


class _Argument(TyperArgument):
    """An argument shown as click does: `DATA`, `[IMAGE]` when optional, `STORES...` when repeated."""

    def _usage_display_name(self) -> str:
        name = self.display_name_raw + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"

    def display_type_rich(self, ctx: typer.Context) -> str:
        return _type_name(self)


class _Option(TyperOption):
    """An option shown as click does: `--out PATH`, a flag without a type, a described default
    (`show_default="the teacher's"`) as `[default: the teacher's]`."""

    def display_type_rich(self, ctx: typer.Context) -> str | None:
        return None if self.is_flag else self.metavar or _type_name(self)

    def _get_default_string(self, *, ctx: typer.Context, show_default_is_str: bool, default_value: Any) -> str:
        if show_default_is_str:
            return str(self.show_default)
        return super()._get_default_string(ctx=ctx, show_default_is_str=False, default_value=default_value)


def _conventional(params: list) -> None:
    """Give typer's parameters the display of :class:`_Argument` and :class:`_Option` (typer builds
    them itself; only how they are shown changes)."""
    for param in params:
        if isinstance(param, TyperArgument):
            param.__class__ = _Argument
            param.metavar = param.metavar or param.name.upper()
        elif isinstance(param, TyperOption):
            param.__class__ = _Option


class _ConventionalHelp:
    """Mixin of a typer command or group: conventional help (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _conventional(self.params)
        if self.help:  # docstring paragraphs re-flow to the terminal's width (rich keeps single newlines)
            self.help = "\n\n".join(" ".join(part.split()) for part in self.help.split("\n\n"))

    def get_help_option(self, ctx: typer.Context) -> TyperOption | None:
        option = super().get_help_option(ctx)
        _conventional([option])
        return option


class RelabelGroup(_ConventionalHelp, TyperGroup):
    """The command group with conventional help."""


class RelabelCommand(_ConventionalHelp, TyperCommand):
    """A command with conventional help whose Ctrl-C becomes :class:`Interrupted` (one line, exit
    code 130) instead of typer's silent exit."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted("interrupted") from None


class RelabelTyper(typer.Typer):
    """typer.Typer whose commands are :class:`RelabelCommand` unless a command names another class."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any):
        return super().command(*args, cls=cls or RelabelCommand, **kwargs)


app = RelabelTyper(
    name="trt-relabel",
    help="Re-label image classification data with a strong teacher (ONNX Runtime / TensorRT FP16) "
    "and train students on the label maps with LabelPooling.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=RelabelGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"trt-relabel {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    pass


# --- options several commands share: one name and one meaning across commands ------------------

TeacherOpt = Annotated[
    str,
    typer.Option(
        "--teacher", "-t", metavar="NAME", help="Registered teacher or timm:MODEL (see `trt-relabel teachers`)."
    ),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint", metavar="FILE", help="Local weights: .safetensors or a torch state dict (.pth/.pt)."),
]
SizeOpt = Annotated[
    int | None,
    typer.Option("--size", min=32, metavar="S", show_default="the teacher's", help="Square input side of the teacher."),
]
TopkOpt = Annotated[int, typer.Option("--topk", "-k", min=1, help="Classes kept per label-map cell.")]
EnginesDirOpt = Annotated[
    Path, typer.Option("--engines-dir", metavar="DIR", help="Folder of the graphs, engines and timing caches.")
]
RetryFailedOpt = Annotated[
    bool, typer.Option("--retry-failed", help="Label again the inputs earlier runs failed on (once fixed).")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Delete an existing store at --out and start over.")]
ClassNamesOpt = Annotated[
    Path | None,
    typer.Option(
        "--class-names",
        metavar="FILE",
        help="Classes of a teacher fine-tuned on its own classes: one line per class, in class-index order, "
        "'id' or 'id<TAB>name' (the id is the class folder name).",
    ),
]
ClassMapOpt = Annotated[
    Path | None,
    typer.Option(
        "--class-map",
        metavar="FILE",
        help="TSV 'folder<TAB>teacher class' (id, name or index): the teacher class of class folders that are not "
        "named by a teacher class id.",
    ),
]


def _check_device(value: str) -> str:
    """`--device` checked before the heavy imports: a bad value is a usage error (exit 2)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r}: expected auto, cpu, cuda or cuda:N")
    return value


DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="DEVICE",
        callback=_check_device,
        help="auto | cpu | cuda | cuda:N (auto: this torchrun rank's GPU, else GPU 0 when CUDA is here, else the CPU).",
    ),
]


def device_argument(device: str) -> str | None:
    """The API's `device` for a checked `--device` value (None: auto, the library's default)."""
    return None if device == "auto" else device


def workers_option(help: str, *, min: int = 0, default: str | None = None) -> Any:
    """`--workers` / `-j`: how many processes a command uses (`default`: how the default is shown
    when it depends on the machine)."""
    return typer.Option("--workers", "-j", min=min, help=help, show_default=default or True)


def print_error(message: str) -> None:
    console.print(Text.assemble(("error: ", "bold red"), message))


def main() -> None:
    """Console-script entry point: expected failures become one line and an exit code."""
    try:
        app()
    except Interrupted as e:
        console.print(Text(str(e), style="yellow"))
        sys.exit(e.exit_code)
    except RelabelError as e:
        print_error(str(e))
        sys.exit(e.exit_code)
