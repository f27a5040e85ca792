"""``distml plan``: which strategy and degree split fits each candidate on the machines,
and what a step costs; ``--check`` runs the plans briefly and prints predicted against
measured."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from distml.cli.app import ConfigArg, QuietOpt, SetOpt, app, console, load, user_errors
from distml.errors import DistmlError

GIB = 2**30


@app.command("plan")
@user_errors
def plan_cmd(
    config: ConfigArg,
    candidate: Annotated[str | None, typer.Option(help="Only this candidate.")] = None,
    world_size: Annotated[int, typer.Option(
        min=1, help="Largest world size to plan for (every size up to it is tried).")] = 2,
    memory: Annotated[float | None, typer.Option(
        min=0, help="Memory per rank (device or process) to fit in, GiB.")] = None,
    check: Annotated[bool, typer.Option(
        help="Run the plans at --world-size briefly (distml verify, each on its own "
        "processes) and print predicted against measured memory and step time.")] = False,
    steps: Annotated[int, typer.Option(min=2, help="--check: steps per plan.")] = 6,
    check_only: Annotated[str | None, typer.Option(
        help="--check: only these plans, by verify's name (comma-separated, e.g. "
        "ddp,fsdp); default: every plan at --world-size that verify can run.")] = None,
    flops: Annotated[float | None, typer.Option(
        help="A target machine's compute per rank, TFLOP/s (e.g. 400 for an H100 in "
        "bf16); default: measured here.")] = None,
    bandwidth: Annotated[float | None, typer.Option(
        help="The network's bandwidth between ranks, GB/s; default: measured here (gloo "
        "on loopback).")] = None,
    latency: Annotated[float | None, typer.Option(
        help="One message's latency, microseconds (with --bandwidth; default 50).")] = None,
    recalibrate: Annotated[bool, typer.Option(
        help="Measure this machine again (network, wrappers' overheads) instead of using "
        "the calibration cached in $DISTML_CACHE/plan.")] = False,
    top: Annotated[int, typer.Option(min=1, help="Plans to list per candidate.")] = 12,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write everything here.")
                        ] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Predict per-rank memory and step time of every strategy and degree split up to
    --world-size for each candidate, from one step of the model traced on the meta device;
    rank the plans that fit --memory and say why the others do not."""
    from distml.fsutil import write_json_atomic

    cfg, reporter = load(config, set_, quiet)
    if candidate is not None:
        cfg.train.candidate(candidate)  # an unknown name fails here
    run_, manifest, sample = _data(cfg, reporter)
    target = _target(flops, bandwidth, latency, run_.folder.path, fresh=recalibrate)
    with reporter.stage("plan"):
        from distml.plan.planner import plan_candidates

        out = plan_candidates(cfg, manifest, sample, world_size=world_size,
                              memory_bytes=None if memory is None else int(memory * GIB),
                              target=target, only=candidate)
    report: dict[str, Any] = {
        **out, "machine": _machine_info(target, world_size),
        "candidates": {name: {**c, "plans": [p.as_dict() for p in c["plans"]]}
                       for name, c in out["candidates"].items()}}
    if check:
        report["check"] = _check(cfg, run_, manifest, out, world_size, steps, reporter,
                                 only=check_only.split(",") if check_only else None)
    if json_out is not None:
        write_json_atomic(json_out, report)
    if not quiet:
        _print(out, top)
        if check:
            _print_check(report["check"])


def _data(cfg: Any, reporter: Any) -> tuple[Any, Any, tuple[Any, Any]]:
    from distml.data.tensors import SplitTensors
    from distml.workflow.pipeline import Chain, run_chain, start_run

    run_ = start_run(cfg, reporter=reporter)
    manifest = run_chain(run_, Chain(until="ingest", track=False)).manifest
    val = SplitTensors.load(manifest, "val")
    return run_, manifest, (val.x[:2], val.y[:2])


def _target(flops: float | None, bandwidth: float | None, latency: float | None,
            scratch: Path, *, fresh: bool) -> Any:
    from distml.plan.calibrate import cached, measure_network
    from distml.plan.overhead import measure_probes
    from distml.plan.planner import Target

    lat = (latency if latency is not None else 50.0) * 1e-6
    factors: tuple[tuple[str, float], ...] = ()  # a given network: an ideal ring
    if bandwidth is None:
        bw, lat_m, scatter, gather = cached("network", lambda: measure_network(
            _free_port(), str(scratch / "network.txt")), fresh=fresh)
        lat = lat if latency is not None else lat_m
        factors = (("reduce_scatter", scatter), ("all_gather", gather))
    else:
        bw = bandwidth * 1e9
    if flops is not None:  # a target machine: its devices hide such overheads
        return Target(bw, lat, flops_per_s=flops * 1e12, cores=os.cpu_count() or 1,
                      collective_factors=factors)
    probes = cached("wrappers", lambda: measure_probes(
        _free_port(), str(scratch / "wrappers.json")), fresh=fresh)
    return Target(bw, lat, cores=os.cpu_count() or 1, collective_factors=factors,
                  probes=tuple((name, layers, secs) for name, by in probes.items()
                               for layers, secs in by.items()))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine_info(target: Any, world_size: int) -> dict[str, Any]:
    return {str(w): target.machine(w)[0].as_dict() for w in range(1, world_size + 1)}


def _print(out: dict[str, Any], top: int) -> None:
    limit = out["memory_bytes"]
    for name, c in out["candidates"].items():
        fit = f", fits {limit / GIB:.3g} GiB" if limit else ""
        table = Table(title=f"plans for {name} (world size <= {out['world_size']}{fit})")
        for col in ("#", "plan", "MiB/rank", "of it act.", "step ms", "comm+wrappers ms",
                    "fits"):
            table.add_column(col, justify="left" if col in ("plan", "fits") else "right",
                             no_wrap=col == "plan")
        for i, p in enumerate(c["plans"][:top], 1):
            worst = max(p.memory_per_rank, key=lambda m: m["total"])
            table.add_row(str(i), p.label, f"{p.peak_bytes / 2**20:.2f}",
                          f"{worst['activations'] / 2**20:.2f}", f"{p.step_seconds * 1e3:.3f}",
                          f"{p.communication_s * 1e3:.3f}", "yes" if p.fits else "[red]no[/]")
        console.print(table)
        rejected = [p for p in c["plans"] if not p.fits]
        for p in rejected[:top]:
            console.print(f"  does not fit: {p.label}: {escape(p.why_not or '')}")
        for bad in c["invalid"][:top]:
            console.print(f"  not valid: {bad['plan']}: {escape(bad['why'])}", highlight=False)


def checkable(plan: Any, world: int) -> str | None:
    """distml verify's variant that runs ``plan`` at ``world`` processes, if any (verify
    keeps the strategy's default degrees: the model axis takes the rest, or data_degree 2
    for its data-x variants; parameter servers: one worker)."""
    from distml.config.strategies import VARIANTS

    d = plan.degrees
    if plan.world_size != world or plan.activation_checkpointing or world == 1:
        return None
    if d.get("servers"):
        return plan.name if d["servers"] == world - 1 else None
    if d["data"] == world:
        return plan.name
    if d["data"] == 1:
        return plan.name
    data_x = f"data-x-{plan.strategy}"
    if d["data"] == 2 and plan.name == plan.strategy and data_x in VARIANTS:
        return data_x
    return None


def _check(cfg: Any, run_: Any, manifest: Any, out: dict[str, Any], world: int, steps: int,
           reporter: Any, *, only: list[str] | None) -> list[dict[str, Any]]:
    """Each candidate's plans at ``world`` that verify can run, each on its own processes:
    predicted against measured per-rank memory and step time."""
    import torch

    from distml.plan.planner import compare, timing_row
    from distml.verify import verify

    rows = []
    for name, c in out["candidates"].items():
        runnable = {v: p for p in c["plans"] if (v := checkable(p, world)) is not None
                    and (only is None or v in only)}
        single = next((p for p in c["plans"] if p.strategy == "single"
                       and not p.activation_checkpointing), None)
        if not runnable:
            raise DistmlError(f"--check: no plan of {name!r} at world size {world} that "
                              "distml verify can run; try another --world-size")
        with reporter.stage(f"check {name}"):
            report = verify(cfg, run_.folder, manifest, candidate=name,
                            strategies=list(runnable), steps=steps, world_size=world,
                            separate=True, tolerance=1.0)
        cuda = torch.cuda.is_available()  # verify's workers run on it: its allocator's peak
        for r in report["results"]:
            rows.append({"candidate": name, **compare(runnable[r["strategy"]], r, cuda=cuda)})
        if single is not None:
            rows.append({"candidate": name, **timing_row(single, report["reference"])})
    return rows


def _print_check(rows: list[dict[str, Any]]) -> None:
    table = Table(title="predicted vs measured (memory: params+grads+optimizer held per "
                  "rank on CPU)")
    for col in ("candidate", "plan", "MiB/rank predicted", "measured", "error",
                "step ms predicted", "measured", "error"):
        table.add_column(col, justify="left" if col in ("candidate", "plan") else "right")
    for r in rows:
        has_mem = "memory_error" in r
        table.add_row(
            r["candidate"], r["plan"],
            " / ".join(f"{b / 2**20:.2f}" for b in r["predicted_bytes_per_rank"])
            if has_mem else "",
            " / ".join(f"{b / 2**20:.2f}" for b in r["measured_bytes_per_rank"])
            if has_mem else "",
            f"{r['memory_error']:.1%}" if has_mem else "", f"{r['predicted_step_s'] * 1e3:.3f}",
            f"{r['measured_step_s'] * 1e3:.3f}", f"{r['step_time_error']:.1%}")
    console.print(table)
