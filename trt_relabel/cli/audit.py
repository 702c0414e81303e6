"""`audit`: likely wrong and multi-object labels of a data set, as a CSV, ReaL-style labels and an
HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from trt_relabel.cli._app import app, console
from trt_relabel.cli.interop import _progress


@app.command("audit")
def audit_command(
    store: Annotated[Path, typer.Argument(help="Label store to audit.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder: index.html, audit.csv, labels.json.")],
    data: Annotated[
        Path | None, typer.Option("--data", help="Data folder of the store, for the photos of the galleries.")
    ] = None,
    top: Annotated[int, typer.Option("--top", min=0, help="Images per gallery and confused pairs shown.")] = 50,
    present_cells: Annotated[
        int, typer.Option("--present-cells", min=1, help="m: a present class is the top-1 of >= m cells ...")
    ] = 4,
    present_prob: Annotated[
        float, typer.Option("--present-prob", help="p: ... each with a cell probability >= p.")
    ] = 0.4,
    alternative_share: Annotated[
        float,
        typer.Option(
            "--alternative-share",
            help="Two present classes are one object when one is in the top-k of >= this share of the other's cells.",
        ),
    ] = 0.1,  # fmt: skip
    object_cells: Annotated[
        int, typer.Option("--object-cells", min=1, help="Multi-object: >= 2 objects of >= this many cells each.")
    ] = 8,
    suspect_rank: Annotated[
        int,
        typer.Option(
            "--suspect-rank",
            min=1,
            help="Suspect: the folder class is not present and ranks below this in the whole-image target.",
        ),
    ] = 5,  # fmt: skip
) -> None:
    """Audit the labels of a store: per image, the whole-image target (LabelPooling over the full
    image, softmax), the folder class's probability and rank, the teacher's top-1, the classes
    present on the label map, and suspect / multi-object flags (rules in README "Auditing labels").

    Writes OUT/audit.csv (most likely wrong folder labels first), OUT/labels.json (present sets in
    ImageNet ReaL's layout) and OUT/index.html, a self-contained report with galleries of the --top
    first suspects and multi-object images.
    """
    from trt_relabel.audit import AuditRules, audit

    rules = AuditRules(present_cells, present_prob, alternative_share, object_cells, suspect_rank)
    with _progress("auditing") as progress:
        summary = audit(store, out, data=data, top=top, rules=rules, progress=progress)
    if summary.num_nonfinite:
        warning = (
            f"warning: {summary.store}: {summary.num_nonfinite} labelled rows hold non-finite scores (NaN or inf) "
            f"and are left out (first: row {summary.first_nonfinite})"
        )
        console.print(Text(warning, style="yellow"))
    console.print(_summary_table(summary))
    console.print(Text.assemble("report: ", str(Path(summary.out) / "index.html")))


def _summary_table(summary) -> Table:
    def share(count: int, total: int) -> str:
        return f"{count} of {total} ({count / total:.1%})" if total else f"{count} of {total}"

    s = summary
    table = Table("", "", title=Text(f"audit of {s.store}"), show_header=False)
    table.add_row("images (labelled / failed / pending)", f"{s.num_samples} ({s.num_labelled} / {s.num_failed} / "
                  f"{s.num_pending})")  # fmt: skip
    table.add_row("teacher top-1 = folder class", share(s.num_agree, s.num_with_class))
    table.add_row("folder class present", share(s.num_label_present, s.num_with_class))
    table.add_row("suspect labels", share(s.num_suspects, s.num_with_class))
    table.add_row("multi-object images", share(s.num_multi_object, s.num_labelled))
    return table
