"""The ``distml`` command line: one small function per subcommand over the layers below."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import distml
from distml.errors import DistmlError

app = typer.Typer(
    help="distml: end-to-end distributed machine learning for PyTorch, from one YAML file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Inspect the model registry and move aliases.", no_args_is_help=True)
app.add_typer(models_app, name="models")
data_app = typer.Typer(help="Inspect data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
runs_app = typer.Typer(help="List and compare runs (no tracking server needed).",
                       no_args_is_help=True)
app.add_typer(runs_app, name="runs")

console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="Pipeline config (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value, e.g. --set train.epochs=3 "
                 "(repeatable; the value is parsed as YAML)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print errors and warnings only.")]
RegistryOpt = Annotated[Path, typer.Option(help="Registry folder.")]


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User mistakes become one red line and exit code 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DistmlError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _load(config: Path, overrides: list[str] | None, quiet: bool):
    from distml.config import load_config
    from distml.ui import ConsoleReporter, setup_logging

    setup_logging(err_console if quiet else console, quiet=quiet)
    cfg = load_config(config, overrides or [])
    return cfg, ConsoleReporter(console, quiet=quiet)


@app.command()
@user_errors
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the newest run of this config.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole pipeline: ingest, train every candidate, select, register, report."""
    from distml.workflow.pipeline import run_pipeline

    cfg, reporter = _load(config, set_, quiet)
    run_, summary = run_pipeline(cfg, reporter=reporter, resume=resume)
    if not quiet:
        _print_candidates(summary["candidates"], summary["metric"], summary["selected"])
        test = ", ".join(f"{k} {v:.4f}" for k, v in summary["test"].items())
        reg = summary["registry"]
        console.print(f"selected [bold]{summary['selected']}[/]: test {test}")
        console.print(f"registered {reg['name']}:{reg['version']}"
                      + (" → production" if reg["promoted"] else "")
                      + f"\nreport: {run_.dir / 'report.md'}")


@app.command()
@user_errors
def ingest(config: ConfigArg, set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Ingest the data alone and print the manifest summary."""
    from distml.workflow.pipeline import stage_ingest, start_run

    cfg, reporter = _load(config, set_, quiet)
    manifest = stage_ingest(start_run(cfg, reporter=reporter))
    if quiet:
        return
    table = Table(title=f"{manifest.root}")
    for col in ("split", "rows", "partitions"):
        table.add_column(col)
    for split, info in manifest.splits.items():
        table.add_row(split, f"{info['rows']:,}", str(len(info["partitions"])))
    console.print(table)
    console.print(f"task {manifest.task}; {manifest.num_features} columns; classes "
                  f"{manifest.classes}; dropped invalid rows: {manifest.dropped_invalid_rows}")


@app.command()
@user_errors
def train(
    config: ConfigArg,
    candidate: Annotated[str | None, typer.Option(help="Train only this candidate.")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the newest run from its last checkpoints.")
    ] = False,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    rdzv_endpoint: Annotated[str | None, typer.Option(
        help="Join a job on several machines: HOST:PORT of node 0, which serves the "
        "rendezvous (run this command on every node; the output folder must be shared).",
        show_default=False)] = None,
    nnodes: Annotated[int | None, typer.Option(
        help="Machines in the job (with --rdzv-endpoint); default: the config's.",
        min=1, show_default=False)] = None,
    rdzv_id: Annotated[str, typer.Option(
        help="The job's id, the same on every node; a node restarted with it rejoins "
        "the job.")] = "distml",
    rdzv_conf: Annotated[str, typer.Option(
        help="Rendezvous settings as torchrun takes them, e.g. keep_alive_interval=2,"
        "keep_alive_max_attempt=3 (a dead node is noticed after 6 s instead of 15 s).")
    ] = "",
) -> None:
    """Ingest (cached) and train candidates, without selection; with --rdzv-endpoint, this
    machine's part of a job on several (run on each, with the same options)."""
    cfg, reporter = _load(config, set_, quiet)
    if candidate is not None:
        cfg.train.candidate(candidate)  # unknown names fail before any work
    if rdzv_endpoint is not None:
        from distml.distributed import preflight

        node = preflight.prepare_node(rdzv_endpoint)  # in a second: before torch loads
        from distml.distributed.launch import launch_training_nodes

        launch_training_nodes(cfg, config, set_ or [], candidate=candidate, resume=resume,
                              num_nodes=nnodes, node=node, job_id=rdzv_id,
                              rdzv_conf=rdzv_conf)
        return
    from distml.monitoring.mlflow_tracking import PipelineTracking
    from distml.workflow.pipeline import stage_ingest, stage_train, start_run

    run_ = start_run(cfg, resume=resume, reporter=reporter)
    tracking = PipelineTracking.start(cfg, run_.dir)
    results = stage_train(run_, stage_ingest(run_), only=candidate, resume=resume)
    if tracking is not None:
        tracking.close("FINISHED")
    if not quiet:
        _print_candidates(results, cfg.metric, None)
        console.print(f"run folder: {run_.dir}")


@data_app.command("inspect")
@user_errors
def data_inspect(
    path: Annotated[Path, typer.Argument(help="A data folder, a run folder, or Parquet files.")],
) -> None:
    """Schema, partitions, rows and per-column statistics of a Parquet data set."""
    from distml.data.inspect import inspect

    info = inspect(path)
    m = info["manifest"]
    console.print(f"[bold]{info['path']}[/]: {info['rows']:,} rows in {len(info['files'])} "
                  "partitions" + (f"; task {m.task}; classes {m.classes}" if m else ""))
    if m:
        splits = ", ".join(f"{s} {v['rows']:,} rows / {len(v['partitions'])} partitions"
                           for s, v in m.splits.items())
        steps = ", ".join(p["type"] for p in m.preprocessing) or "none"
        console.print(f"splits: {splits}\npreprocessing: {steps}; dropped invalid rows: "
                      f"{m.dropped_invalid_rows}")
    table = Table(title="columns")
    for col in ("column", "type", "nulls", "mean", "std", "min", "max"):
        table.add_column(col, justify="left" if col in ("column", "type") else "right")
    for name, kind in info["schema"]:
        st = info["stats"].get(name)
        cells = ([f"{st['nulls']:,}"] + [f"{st[k]:.4g}" for k in ("mean", "std", "min", "max")]
                 if st else [""] * 5)
        table.add_row(name, kind, *cells)
    console.print(table)


@app.command("verify")
@user_errors
def verify_cmd(
    config: ConfigArg,
    candidate: Annotated[str | None, typer.Option(help="Candidate; default: the first.")] = None,
    strategies: Annotated[str, typer.Option(
        help="Comma-separated: ddp, zero1, fsdp, fsdp-zero2, tensor, pipeline, "
        "pipeline-gpipe, pipeline-1f1b, pipeline-interleaved, data-x-tensor, data-x-pipeline, "
        "or module:Class.")
    ] = "ddp,zero1,fsdp,fsdp-zero2",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps to compare.")] = 20,
    world_size: Annotated[int | None, typer.Option(
        min=2, help="Processes; default: the candidate's world_size, or 2.")] = None,
    tolerance: Annotated[float | None, typer.Option(
        help="Max relative difference; default 1e-4 (fp32), 2e-2 (bf16).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train N steps under each strategy and in one process from the same weights and data;
    compare losses and final parameters. Exits 1 when a strategy exceeds the tolerance."""
    from distml.fsutil import write_json_atomic
    from distml.verify import verify
    from distml.workflow.pipeline import stage_ingest, start_run

    cfg, reporter = _load(config, set_, quiet)
    cand = cfg.train.candidate(candidate) if candidate else cfg.train.candidates[0]
    configured = cfg.train.settings_for(cand).world_size
    run_ = start_run(cfg, reporter=reporter)
    with reporter.stage("verify"):
        report = verify(cfg, run_.dir, stage_ingest(run_), candidate=cand.name,
                        strategies=[s.strip() for s in strategies.split(",") if s.strip()],
                        steps=steps, world_size=world_size or max(configured, 2),
                        tolerance=tolerance)
    if json_out is not None:
        write_json_atomic(json_out, report)
    if not quiet:
        ref = report["reference"]
        table = Table(title=f"verify {cand.name}: {steps} steps, world size "
                      f"{report['world_size']}, tolerance {report['tolerance']:g}")
        for col in ("strategy", "max rel loss diff", "max rel param diff", "peak mem/rank",
                    "state bytes/rank", "step s", "result"):
            table.add_column(col, justify="left" if col == "strategy" else "right")
        table.add_row("single (reference)", "", "", _mib(ref["peak_mem_bytes"]), "",
                      f"{ref['step_seconds']:.4f}", "")
        for r in report["results"]:
            table.add_row(r["strategy"], f"{r['max_rel_loss_diff']:.2e}",
                          f"{r['max_rel_param_diff']:.2e}", _mib(r["peak_mem_bytes"]),
                          _mib(max(sum(b.values()) for b in r["state_bytes_per_rank"])),
                          f"{r['step_seconds']:.4f}",
                          "[green]pass[/]" if r["passed"] else "[red]FAIL[/]")
        console.print(table)
    if not all(r["passed"] for r in report["results"]):
        raise typer.Exit(1)


@app.command("scale")
@user_errors
def scale_cmd(
    config: ConfigArg,
    workers: Annotated[str, typer.Option(help="Worker counts, e.g. 1,2,4.")] = "1,2",
    mode: Annotated[str, typer.Option(help="strong (fixed work) or weak (work grows with N).")
                    ] = "strong",
    stage: Annotated[str, typer.Option(help="train or ingest.")] = "train",
    candidate: Annotated[str | None, typer.Option(help="Candidate (train); default: first.")
                         ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run a stage at several worker counts: speedup, efficiency, Karp-Flatt, Amdahl's fit,
    Gustafson (weak); a table, JSON and a PNG plot."""
    from distml.errors import ConfigError
    from distml.fsutil import write_json_atomic
    from distml.workflow.scale import scale

    if mode not in ("strong", "weak") or stage not in ("train", "ingest"):
        raise ConfigError(f"--mode {mode!r} / --stage {stage!r}: use --mode strong|weak and "
                          "--stage train|ingest")
    try:
        counts = [int(w) for w in workers.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"--workers {workers!r} is not a list of numbers, e.g. 1,2,4") from None
    if not counts or min(counts) < 1:
        raise ConfigError(f"--workers {workers!r}: worker counts must be at least 1")
    cfg, reporter = _load(config, set_, quiet)
    if candidate is not None:
        cfg.train.candidate(candidate)
    with reporter.stage(f"scale {stage}"):
        result = scale(cfg, workers=counts, mode=mode, stage=stage, candidate=candidate)
    if json_out is not None:
        write_json_atomic(json_out, result)
    if quiet:
        return
    table = Table(title=f"{stage}, {mode} scaling")
    for col in ("workers", "seconds", "speedup", "efficiency", "Karp-Flatt"):
        table.add_column(col, justify="right")
    for p in result["points"]:
        kf = "" if p["karp_flatt"] is None else f"{p['karp_flatt']:.3f}"
        table.add_row(str(p["workers"]), f"{p['seconds']:.2f}", f"{p['speedup']:.2f}",
                      f"{p['efficiency']:.2f}", kf)
    console.print(table)
    smax = result["amdahl_max_speedup"]
    console.print(f"Amdahl: parallel fraction P = {result['amdahl_parallel_fraction']:.3f}, "
                  f"max speedup {'unbounded' if smax is None else f'{smax:.1f}'}"
                  + (f"; Gustafson serial fraction {result['gustafson_serial_fraction']:.3f}"
                     if result.get("gustafson_serial_fraction") is not None else "")
                  + f"\nplot: {result['plot']}")


@runs_app.command("list")
@user_errors
def runs_list(
    output_dir: Annotated[Path, typer.Option(help="The runs folder.")] = Path("runs"),
) -> None:
    """Finished runs: name, selected candidate, test metric, config hash, time."""
    from distml.workflow.runs import list_runs

    runs = list_runs(output_dir)
    if not runs:
        console.print(f"no finished runs under {output_dir}")
        return
    table = Table(title=f"runs under {output_dir}")
    for col in ("run", "selected", "test metric", "config", "seconds"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for r in runs:
        test = "" if r["test"] is None else f"{r['metric']} {r['test']:.4f}"
        table.add_row(r["run"], r["selected"], test, r["config_hash"], f"{r['seconds']:.1f}")
    console.print(table)


@runs_app.command("compare")
@user_errors
def runs_compare(
    runs: Annotated[list[Path], typer.Argument(help="Two or more run folders.")],
) -> None:
    """The config keys that differ between runs, and their metrics side by side."""
    from distml.errors import DistmlError
    from distml.workflow.runs import compare

    if len(runs) < 2:
        raise DistmlError("give two or more run folders to compare")
    result = compare(runs)
    names = [f"run {i + 1}" for i in range(len(runs))]
    for i, r in enumerate(runs):
        console.print(f"run {i + 1}: {r}")
    table = Table(title="config differences")
    table.add_column("key")
    for n in names:
        table.add_column(n)
    for key, values in result["config_differences"].items():
        table.add_row(key, *(json.dumps(v) for v in values))
    console.print(table if result["config_differences"] else "the configs are the same")
    table = Table(title=f"metrics ({result['metric']})")
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    table.add_row("selected", *(m["selected"] for m in result["metrics"]))
    for key in result["metrics"][0]["test"]:
        table.add_row(f"test {key}", *(f"{m['test'][key]:.4f}" for m in result["metrics"]))
    for cand in result["metrics"][0]["val"]:
        table.add_row(f"val {cand}", *(
            f"{m['val'][cand]:.4f}" if cand in m["val"] else "" for m in result["metrics"]))
    console.print(table)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _print_candidates(results: list[dict[str, Any]], metric: str, selected: str | None) -> None:
    table = Table(title=f"candidates (val {metric})")
    for col in ("candidate", "params", metric, "steps", "train s", "samples/s"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for r in results:
        mark = " ★" if r["name"] == selected else ""
        table.add_row(r["name"] + mark, f"{r['params']:,}", f"{r['val'][metric]:.4f}",
                      str(r["steps"]), f"{r['train_seconds']:.1f}", f"{r['samples_per_s']:,.0f}")
    console.print(table)


@models_app.command("list")
@user_errors
def models_list(registry: RegistryOpt = Path("registry")) -> None:
    """Registered models, their versions and aliases."""
    from distml.registry import Registry

    reg = Registry(registry)
    table = Table(title=f"registry {registry}")
    for col in ("model", "versions", "aliases"):
        table.add_column(col)
    for name in reg.names():
        versions = ", ".join(str(v.version) for v in reg.versions(name))
        aliases = ", ".join(f"{a}→{v}" for a, v in sorted(reg.aliases(name).items()))
        table.add_row(name, versions, aliases)
    console.print(table if reg.names() else f"no models in {registry}")


@models_app.command("show")
@user_errors
def models_show(
    ref: Annotated[str, typer.Argument(help="name, name:version, name@alias or a folder.")],
    registry: RegistryOpt = Path("registry"),
) -> None:
    """Print a model version's spec.json."""
    from distml.artifact import read_spec
    from distml.registry import Registry

    version = Registry(registry).resolve(ref)
    console.print(f"[bold]{version.name}[/] version {version.version} at {version.path}")
    console.print_json(json.dumps(read_spec(version.path)))


@models_app.command("promote")
@user_errors
def models_promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version to point the alias at.")],
    alias: Annotated[str, typer.Option(help="Alias to move.")] = "production",
    registry: RegistryOpt = Path("registry"),
) -> None:
    """Point an alias (default: production) at a version."""
    from distml.registry import Registry

    Registry(registry).set_alias(name, alias, version)
    console.print(f"{name}@{alias} → version {version}")


def _opt(help_: str, **kw: Any) -> Any:
    return typer.Option(help=help_ + " Default: the config's serve section.", **kw)


@app.command()
@user_errors
def serve(
    ref: Annotated[str | None, typer.Argument(
        help="name, name:version, name@alias or an artifact folder; default: the production "
        "version of the newest registered model.", show_default=False)] = None,
    config: Annotated[Path | None, typer.Option(
        help="A pipeline config: its serve section and registry.")] = None,
    host: Annotated[str | None, _opt("Address to bind (127.0.0.1: this machine only).")] = None,
    port: Annotated[int | None, _opt("Port (0: a free one).")] = None,
    replicas: Annotated[int | None, _opt("Worker processes behind the port.")] = None,
    batching: Annotated[bool | None, _opt("Dynamic batching.", show_default=False)] = None,
    max_batch_size: Annotated[int | None, _opt("Most rows in one forward pass.")] = None,
    max_delay_ms: Annotated[float | None, _opt("Longest wait to fill a batch.")] = None,
    max_queue_rows: Annotated[int | None, _opt("Queue bound per replica (then 503).")] = None,
    timeout_ms: Annotated[float | None, _opt("Per-request deadline (then 504).")] = None,
    quantize: Annotated[str | None, _opt("none or int8 (dynamic int8 Linear layers).")] = None,
    token: Annotated[str | None, typer.Option(
        envvar="DISTML_SERVE_TOKEN", show_default=False,
        help="Require 'Authorization: Bearer TOKEN' on model routes (health stays open).")
    ] = None,
    registry: Annotated[Path | None, typer.Option(
        help="Registry folder; default: the config's, else ./registry.")] = None,
) -> None:
    """Serve a model over the Open Inference Protocol (KServe v2 / Triton REST)."""
    from distml.config import ServeConfig, load_config
    from distml.serving.server import serve as run_server
    from distml.ui import setup_logging

    setup_logging(console, quiet=False)
    cfg = load_config(config) if config is not None else None
    flags = {"host": host, "port": port, "replicas": replicas, "dynamic_batching": batching,
             "max_batch_size": max_batch_size, "max_delay_ms": max_delay_ms,
             "max_queue_rows": max_queue_rows, "timeout_ms": timeout_ms, "quantize": quantize}
    base = cfg.serve.model_dump() if cfg is not None else {}
    settings = _validated(ServeConfig, {**base, **{k: v for k, v in flags.items()
                                                   if v is not None}},
                          "invalid serve settings (flags or the config's serve section)")
    registry = registry or (cfg.registry if cfg is not None else Path("registry"))

    def ready(url: str, info: dict[str, Any]) -> None:
        console.print(f"serving [bold]{info['model']}:{info['version']}[/] at {url} "
                      f"({info['replicas']} replica{'s' if info['replicas'] > 1 else ''}"
                      f"{', token required' if token else ''}); Ctrl-C stops", highlight=False)

    run_server(ref, settings, registry=registry, token=token or None, on_ready=ready)


def _validated(model: Any, data: dict[str, Any], what: str) -> Any:
    from pydantic import ValidationError

    from distml.config import format_validation_error
    from distml.errors import ConfigError

    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e).replace("invalid config", what)) from None


@app.command()
@user_errors
def predict(
    ref: Annotated[str, typer.Argument(
        help="name, name:version, name@alias or an artifact folder.", show_default=False)],
    input_: Annotated[Path, typer.Option("--input", help="CSV/Parquet file or folder with the "
                                         "raw input columns.", show_default=False)],
    output: Annotated[Path, typer.Option(help="Parquet file to write.", show_default=False)],
    id_column: Annotated[str | None, typer.Option(
        help="A column to carry into the output as the row id; default: row_id, the "
        "row's position.")] = None,
    executor: Annotated[str, typer.Option(
        help="local, dask://local, dask://HOST:PORT, ray://local or ray://HOST:PORT.")
    ] = "local",
    workers: Annotated[int | None, typer.Option(help="Worker processes; default: cores.")
                       ] = None,
    registry: RegistryOpt = Path("registry"),
    quiet: QuietOpt = False,
) -> None:
    """Batch inference: predict every row of the input's partitions into one Parquet file."""
    from distml.serving.predict import predict as run_predict
    from distml.ui import ConsoleReporter, setup_logging

    setup_logging(err_console if quiet else console, quiet=quiet)
    reporter = ConsoleReporter(console, quiet=quiet)
    out = run_predict(ref, input_, output, registry=registry, executor=executor,
                      num_workers=workers, id_column=id_column,
                      progress=getattr(reporter, "progress", None))
    if not quiet:
        console.print(f"{out['rows']:,} rows from {out['parts']} part(s) predicted by "
                      f"{out['model']}:{out['version']} → {out['output']}")


@app.command()
def version() -> None:
    """Print the versions of distml, torch and Python."""
    import torch

    console.print(f"distml {distml.__version__}, torch {torch.__version__}, "
                  f"Python {sys.version.split()[0]}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
