"""Commands that watch a served model's world: monitor (drift of new data against the
model's training reference) and watch (the continuous-training loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distml.cli.app import (
    ConfigArg,
    QuietOpt,
    RegistryOpt,
    SetOpt,
    TrustCodeOpt,
    TrustModuleOpt,
    app,
    console,
    load,
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
    min_wasserstein: Annotated[float, typer.Option(min=0.0, help="Normed Wasserstein distance "
                                                   "a continuous column needs to be drifted.")
                               ] = 0.1,
    min_jensen_shannon: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Jensen-Shannon distance a discrete or categorical column "
        "needs to be drifted.")] = 0.1,
    false_alarms_per_million_rows: Annotated[float, typer.Option(
        min=1e-6, help="A report of n rows tests at min(alpha, this x n / 10^6): false alarms "
        "stay a rate per row whatever the file's size.")] = 1.0,
    detector: Annotated[str, typer.Option(
        help="Supervised: window (the error-rate window test alone, calibrated), or it with "
        "adwin, ddm, hddm_a, hddm_w or page_hinkley.")] = "window",
    registry: RegistryOpt = Path("registry"),
    trust_code: TrustCodeOpt = False,
    trust_module: TrustModuleOpt = None,
) -> None:
    """Data and concept drift of new rows against the model's training reference."""
    from distml.drift.columns import Gate
    from distml.workflow.drift_report import print_summary, run_monitor

    gate = Gate(alpha, min_wasserstein, min_jensen_shannon, false_alarms_per_million_rows)
    print_summary(console, run_monitor(ref, input_, out, registry=registry, labels=labels,
                                       json_out=json_out, gate=gate, detector=detector,
                                       trust=trust_policy(trust_code, trust_module)))


@app.command("watch")
@user_errors
def watch_cmd(
    config: ConfigArg,
    landing: Annotated[Path | None, typer.Option(
        help="Folder where new CSV/Parquet files land; default: monitor.watch.landing.")
    ] = None,
    once: Annotated[bool, typer.Option(help="Process the files there now, then exit.")
                    ] = False,
    retrain_always: Annotated[bool, typer.Option(
        help="Retrain on every new file, drift or not.")] = False,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """The loop: new files landing are checked for drift against production; on drift the
    candidates are retrained on them (and a window of older files), and the new model is
    promoted if it beats production on the new files' test rows."""
    from distml.errors import ConfigError
    from distml.workflow.watch import Watcher

    cfg, reporter = load(config, set_, quiet)
    landing = landing or cfg.monitor.watch.landing
    if landing is None:
        raise ConfigError("give the landing folder: --landing DIR or monitor.watch.landing "
                          "in the config")
    watcher = Watcher(cfg, landing, reporter=reporter, retrain_always=retrain_always)
    if not quiet:
        console.print(f"watching {watcher.landing} (state: {watcher.dir / 'state.json'})"
                      + ("" if once else "; Ctrl-C stops"), highlight=False)
    def show(cycle: dict) -> None:
        console.print(f"cycle {cycle['number']} ({len(cycle['new'])} new file(s)): "
                      f"{cycle['drift']['why']}; {cycle['outcome']}", highlight=False)

    if not watcher.run(once=once, on_cycle=show) and not quiet:
        console.print("nothing new to process", highlight=False)
