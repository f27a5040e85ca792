"""Commands that watch a served model's world: monitor (drift of new data against the
model's training reference)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distml.cli.app import (
    RegistryOpt,
    TrustCodeOpt,
    TrustModuleOpt,
    app,
    console,
    trust_policy,
    user_errors,
)


@app.command("monitor")
@user_errors
def monitor_cmd(
    ref: Annotated[str, typer.Argument(
        help="name, name:version, name@alias or an artifact folder.", show_default=False)],
    input_: Annotated[Path, typer.Option("--input", help="CSV/Parquet file or folder of new "
                                         "rows with the raw input columns.", show_default=False)],
    labels: Annotated[str | None, typer.Option(help="Label column: supervised drift too.")
                      ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write drift.json here.")
                        ] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("drift-report"),
    alpha: Annotated[float, typer.Option(min=1e-6, max=0.5, help="False discovery rate "
                                         "across the columns' tests.")] = 0.05,
    detector: Annotated[str, typer.Option(help="adwin, ddm, hddm_a, hddm_w or page_hinkley.")
                        ] = "adwin",
    registry: RegistryOpt = Path("registry"),
    trust_code: TrustCodeOpt = False,
    trust_module: TrustModuleOpt = None,
) -> None:
    """Data and concept drift of new rows against the model's training reference."""
    from distml.monitoring.drift_report import print_summary, run_monitor

    print_summary(console, run_monitor(ref, input_, out, registry=registry, labels=labels,
                                       json_out=json_out, alpha=alpha, detector=detector,
                                       trust=trust_policy(trust_code, trust_module)))
