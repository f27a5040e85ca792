"""Commands that run the pipeline or its stages: run, ingest, train, verify, scale."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from distml.cli.app import (
    ConfigArg,
    QuietOpt,
    SetOpt,
    app,
    console,
    load,
    mib,
    print_candidates,
    user_errors,
)
from distml.config.strategies import variant_names
from distml.errors import DistmlError


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

    cfg, reporter = load(config, set_, quiet)
    run_, summary = run_pipeline(cfg, reporter=reporter, resume=resume)
    if not quiet:
        print_candidates(summary["candidates"], summary["metric"], summary["selected"])
        _print_distillation(summary.get("distillation") or [])
        test = ", ".join(f"{k} {v:.4f}" for k, v in summary["test"].items())
        reg = summary["registry"]
        console.print(f"selected [bold]{summary['selected']}[/]: test {test}")
        console.print(f"registered {reg['name']}:{reg['version']}"
                      + (" → production" if reg["promoted"] else "")
                      + f"\nreport: {run_.folder.report}")


def _print_distillation(rows: list[dict]) -> None:
    """Per distilled student: its test metric against its twin's and its teachers'."""
    for r in rows:
        line = (f"distilled [bold]{r['student']}[/]: test {r['metric']} "
                f"{r['distilled']['test']:.4f}, teachers {r['teacher']['test']:.4f}")
        if r["twin"] is not None:
            line += f", twin {r['twin']} trained alone {r['alone']['test']:.4f}"
        console.print(line)


@app.command()
@user_errors
def ingest(config: ConfigArg, set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Ingest the data alone and print the manifest summary."""
    from distml.workflow.pipeline import Chain, run_chain, start_run

    cfg, reporter = load(config, set_, quiet)
    manifest = run_chain(start_run(cfg, reporter=reporter),
                         Chain(until="ingest", track=False)).manifest
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
    nnodes: Annotated[str | None, typer.Option(
        help="Machines in the job (with --rdzv-endpoint); default: the config's "
        "train.parallel.num_nodes. MIN:MAX: an elastic job (ddp, zero1, fsdp) that nodes "
        "may leave and join mid-run (sets train.parallel.min_nodes and max_nodes).",
        show_default=False)] = None,
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
    num_nodes, elastic = parse_nnodes(nnodes)
    set_ = [*(set_ or []), *elastic]
    cfg, reporter = load(config, set_, quiet)
    if rdzv_endpoint is not None:
        from distml.distributed import preflight

        if candidate is not None:
            cfg.train.candidate(candidate)  # an unknown name fails before any work
        node = preflight.prepare_node(rdzv_endpoint)  # in a second: before torch loads
        from distml.distributed.launch import launch_training_nodes

        launch_training_nodes(cfg, config, set_ or [], candidate=candidate, resume=resume,
                              num_nodes=num_nodes, node=node, job_id=rdzv_id,
                              rdzv_conf=rdzv_conf)
        return
    from distml.workflow.pipeline import train_only

    run_, results = train_only(cfg, candidate=candidate, reporter=reporter, resume=resume)
    if not quiet:
        print_candidates(results, cfg.metric, None)
        console.print(f"run folder: {run_.folder.path}")


@app.command("ps-worker")
@user_errors
def ps_worker(
    run_dir: Annotated[Path, typer.Argument(
        help="The run folder of a job training a parameter-server candidate (shared with "
        "this machine).", show_default=False)],
    candidate: Annotated[str, typer.Option(help="The candidate the job is training.")],
    wait: Annotated[float, typer.Option(
        help="Seconds to wait for the job's servers to be up.")] = 60.0,
    quiet: QuietOpt = False,
) -> None:
    """Add a worker to a running parameter-server job: it takes work items until the job
    ends; SIGTERM (Ctrl-C) leaves cleanly after its current item, a kill re-queues it."""
    from distml.training.ps_join import join_job

    out = join_job(run_dir, candidate, timeout_s=wait, on_join=lambda w: console.print(
        f"joined the job as worker {w}") if not quiet else None)
    if not quiet:
        if out["worker"] is None:
            console.print("the job had finished; nothing to do")
        else:
            console.print(f"worker {out['worker']}: {out['items']:.0f} items, "
                          f"{out['batches']:.0f} batches"
                          + (" (left the job)" if out["left"] else ""))


def parse_nnodes(text: str | None) -> tuple[int | None, list[str]]:
    """--nnodes N, or MIN:MAX (elastic): the node count and the overrides it implies."""
    if text is None:
        return None, []
    lo, sep, hi = text.partition(":")
    try:
        nums = [int(v) for v in ((lo, hi) if sep else (lo,))]
    except ValueError:
        nums = []
    if not nums or min(nums) < 1 or nums[0] > nums[-1]:
        raise DistmlError(f"--nnodes={text!r}: give a number of machines (e.g. 2) or MIN:MAX "
                          "for an elastic job (e.g. 1:3, MIN <= MAX, both at least 1)")
    if not sep:
        return nums[0], []
    return None, [f"train.parallel.min_nodes={nums[0]}", f"train.parallel.max_nodes={nums[1]}"]


@app.command("verify")
@user_errors
def verify_cmd(
    config: ConfigArg,
    candidate: Annotated[str | None, typer.Option(help="Candidate; default: the first.")] = None,
    strategies: Annotated[str, typer.Option(
        help=f"Comma-separated: {variant_names()}. ps-sync runs one worker and "
        "world_size - 1 parameter servers.")
    ] = "ddp,zero1,fsdp,fsdp-zero2",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps to compare.")] = 20,
    world_size: Annotated[int | None, typer.Option(
        min=2, help="Processes; default: the candidate's world_size, or 2.")] = None,
    tolerance: Annotated[float | None, typer.Option(
        help="Max relative difference; default 1e-4 (fp32), 2e-2 (bf16).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    separate: Annotated[bool, typer.Option(
        help="Launch each strategy on its own processes, so that its peak memory is its "
        "own (one launch runs them in turn: the peak is the launch's running maximum).")
    ] = False,
    reshard: Annotated[str | None, typer.Option(
        help="Also save each strategy's trained state as a checkpoint, load it into this "
        "strategy (e.g. ddp) on the same processes and back: parameters and optimizer state "
        "must come back within the tolerance.")] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train N steps under each strategy and in one process from the same weights and data;
    compare losses and final parameters. Exits 1 when a strategy exceeds the tolerance."""
    from distml.fsutil import write_json_atomic
    from distml.verify import verify
    from distml.workflow.pipeline import Chain, run_chain, start_run

    cfg, reporter = load(config, set_, quiet)
    cand = cfg.train.candidate(candidate) if candidate else cfg.train.candidates[0]
    configured = cfg.train.settings_for(cand).parallel.world_size
    run_ = start_run(cfg, reporter=reporter)
    # A distilled student's teachers, first.
    ready = Chain(until="train", only=cand.name, student=False, track=False)
    manifest = run_chain(run_, ready).manifest
    with reporter.stage("verify"):
        report = verify(cfg, run_.folder, manifest, candidate=cand.name,
                        strategies=[s.strip() for s in strategies.split(",") if s.strip()],
                        steps=steps, world_size=world_size or max(configured, 2),
                        tolerance=tolerance, separate=separate, reshard=reshard)
    if json_out is not None:
        write_json_atomic(json_out, report)
    if not quiet:
        ref = report["reference"]
        table = Table(title=f"verify {cand.name}: {steps} steps, world size "
                      f"{report['world_size']}, tolerance {report['tolerance']:g}")
        peak = "peak mem/rank" if separate else "peak mem/rank (launch max)"
        for col in ("strategy", "max rel loss diff", "max rel param diff", peak,
                    "state bytes/rank", "step s", "result"):
            table.add_column(col, justify="left" if col == "strategy" else "right")
        table.add_row("single (reference)", "", "", mib(ref["peak_mem_bytes"]), "",
                      f"{ref['step_seconds']:.4f}", "")
        for r in report["results"]:
            table.add_row(r["strategy"], f"{r['max_rel_loss_diff']:.2e}",
                          f"{r['max_rel_param_diff']:.2e}", mib(r["peak_mem_bytes"]),
                          mib(max(sum(b.values()) for b in r["state_bytes_per_rank"])),
                          f"{r['step_seconds']:.4f}",
                          "[green]pass[/]" if r["passed"] else "[red]FAIL[/]")
        console.print(table)
        for r in report["results"]:
            if trip := r.get("reshard"):
                console.print(f"{r['strategy']} -> {trip['through']} -> {r['strategy']} "
                              f"through checkpoints: max rel param diff "
                              f"{trip['max_rel_param_diff']:.2e}, optimizer state "
                              f"{trip['max_rel_optim_diff']:.2e}")
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
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per worker count (after "
                                         "one warm-up); the median is reported.")] = 3,
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
    cfg, reporter = load(config, set_, quiet)
    if candidate is not None:
        cfg.train.candidate(candidate)
    with reporter.stage(f"scale {stage}"):
        result = scale(cfg, workers=counts, mode=mode, stage=stage, candidate=candidate,
                       repeats=repeats)
    if json_out is not None:
        write_json_atomic(json_out, result)
    if quiet:
        return
    table = Table(title=f"{stage}, {mode} scaling")
    for col in ("workers", "seconds (median)", "min-max", "speedup", "efficiency",
                "Karp-Flatt"):
        table.add_column(col, justify="right")
    for p in result["points"]:
        kf = "" if p["karp_flatt"] is None else f"{p['karp_flatt']:.3f}"
        table.add_row(str(p["workers"]), f"{p['seconds']:.2f}",
                      f"{p['seconds_min']:.2f}-{p['seconds_max']:.2f}", f"{p['speedup']:.2f}",
                      f"{p['efficiency']:.2f}", kf)
    console.print(table)
    frac, smax = result["amdahl_parallel_fraction"], result["amdahl_max_speedup"]
    amdahl = ("Amdahl's law not fitted (see the warnings)" if frac is None else
              f"Amdahl: parallel fraction P = {frac:.3f}, max speedup "
              + ("unbounded" if smax is None else f"{smax:.1f}"))
    console.print(amdahl + (f"; Gustafson serial fraction {result['gustafson_serial_fraction']:.3f}"
                            if result.get("gustafson_serial_fraction") is not None else "")
                  + f"\nplot: {result['plot']}")
