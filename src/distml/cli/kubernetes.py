"""Commands for running distml on Kubernetes:

    distml export kubernetes CONFIG --out DIR [--image IMAGE] [--device cpu|cuda] [--set ...]
    distml stage ingest CONFIG --run-dir DIR [--set ...]
    distml stage select RUN_DIR

The ``stage`` commands are the pipeline's steps one at a time over one run folder, which the
exported Argo Workflow runs in separate pods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distml.cli.app import ConfigArg, QuietOpt, SetOpt, app, console, load, user_errors

export_app = typer.Typer(help="Export the pipeline for other systems (Kubernetes).",
                         no_args_is_help=True)
stage_app = typer.Typer(help="The pipeline's stages one at a time over one run folder "
                        "(for orchestrators such as the exported Argo Workflow).",
                        no_args_is_help=True)

@export_app.command("kubernetes")
@user_errors
def export_kubernetes(
    config: ConfigArg,
    out: Annotated[Path, typer.Option(help="Folder to write into.", show_default=False)],
    image: Annotated[str | None, typer.Option(
        help="Image the pods run (build it with the written Dockerfile and push it where "
        "the cluster pulls from). Default: distml:VERSION.")] = None,
    device: Annotated[str, typer.Option(
        help="cpu, or cuda: one GPU per training process (build the image with a CUDA "
        "torch; see the Dockerfile).")] = "cpu",
    set_: SetOpt = None,
) -> None:
    """Write a Dockerfile, a TrainJob per candidate, an InferenceService, an Argo
    Workflow (ingest -> candidates -> select -> deploy) and the volume, config and RBAC
    they use."""
    from distml.export.writer import DEFAULT_IMAGE
    from distml.export.writer import export_kubernetes as write

    files = write(config, out, image=image or DEFAULT_IMAGE, overrides=set_ or [],
                  device=device)
    console.print(f"wrote {len(files)} files to {out}: "
                  + ", ".join(sorted(p.name for p in files)), highlight=False)

@stage_app.command("ingest")
@user_errors
def stage_ingest(
    config: ConfigArg,
    run_dir: Annotated[Path, typer.Option(help="The run folder to make (or reuse).",
                                          show_default=False)],
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Make RUN_DIR a run of CONFIG and ingest its data into it."""
    from distml.workflow.steps import ingest_into

    cfg, reporter = load(config, set_, quiet)
    manifest = ingest_into(cfg, run_dir, reporter=reporter)
    if not quiet:
        rows = ", ".join(f"{s} {manifest.rows(s):,}" for s in manifest.splits)
        console.print(f"ingested into {run_dir}: {rows} rows")

@stage_app.command("select")
@user_errors
def stage_select(
    run_dir: Annotated[Path, typer.Argument(help="A run folder whose candidates are "
                                            "trained.", show_default=False)],
    quiet: QuietOpt = False,
) -> None:
    """Select the run's best candidate, register it, write its report and summary."""
    from distml.ui import ConsoleReporter, setup_logging
    from distml.workflow.steps import select_run

    setup_logging(console, quiet=quiet)
    summary = select_run(run_dir, reporter=ConsoleReporter(console, quiet=quiet))
    if not quiet:
        reg = summary["registry"]
        console.print(f"selected [bold]{summary['selected']}[/]; registered "
                      f"{reg['name']}:{reg['version']}"
                      + (" → production" if reg["promoted"] else ""))


app.add_typer(export_app, name="export")
app.add_typer(stage_app, name="stage")
