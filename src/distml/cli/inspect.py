"""Commands that look at what runs produced: data inspect, runs list/compare, models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from distml.cli.app import (
    RegistryOpt,
    console,
    data_app,
    models_app,
    runs_app,
    user_errors,
)


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


OutputDirOpt = Annotated[Path, typer.Option(help="The runs folder or URL (s3://bucket/prefix).")]


@data_app.command("versions")
@user_errors
def data_versions(output_dir: OutputDirOpt = Path("runs")) -> None:
    """The ingested data sets' versions: content-addressed by their inputs and preparation."""
    from distml.data.versions import list_versions

    table = Table(title=f"data versions under {output_dir}")
    for col in ("version", "project", "source", "inputs", "train", "val", "test"):
        table.add_column(col, justify="right" if col in ("inputs", "train", "val", "test")
                         else "left")
    for m in list_versions(output_dir):
        src = m.get("source", {})
        table.add_row(m.get("version") or "(unversioned)", m["project"],
                      str(src.get("source", "")), str(len(src.get("files", []))),
                      *(f"{m['splits'][s]['rows']:,}" for s in ("train", "val", "test")))
    console.print(table)


@data_app.command("diff")
@user_errors
def data_diff(
    old: Annotated[str, typer.Argument(help="A data version (4 or more leading digits).")],
    new: Annotated[str, typer.Argument(help="Another data version.")],
    output_dir: OutputDirOpt = Path("runs"),
) -> None:
    """Which inputs and row counts changed between two data versions."""
    from distml.data.versions import diff, find_version

    a, b = find_version(output_dir, old), find_version(output_dir, new)
    d = diff(a, b)
    console.print(f"[bold]{a['version']}[/] → [bold]{b['version']}[/]", highlight=False)
    for kind in ("added", "removed", "changed"):
        for path in d[kind]:
            console.print(f"  {kind:8} {path}", highlight=False, soft_wrap=True)
    if not (d["added"] or d["removed"] or d["changed"]):
        console.print("  inputs: unchanged")
    for split, (n_old, n_new) in d["rows"].items():
        console.print(f"  {split:5} rows {n_old:,} → {n_new:,} ({n_new - n_old:+,})")
    if d["config_changed"]:
        console.print("  fitted preprocessing: changed")


def _print_lineage(spec: dict) -> None:
    """A model's lineage: data version, inputs with their checksums, config, code."""
    lineage = spec.get("data_lineage") or {}
    console.print(f"lineage: data version {spec.get('data_version') or 'unknown'}; config "
                  f"hash {spec.get('config_hash')}; code revision {spec.get('git_revision')}",
                  highlight=False)
    for f in lineage.get("inputs", []):
        check = f.get("sha256") or f"etag {f.get('etag')}"
        console.print(f"  input {f['path']} ({f.get('bytes', '?')} bytes, {check})",
                      highlight=False, soft_wrap=True)


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
    """Print a model version's spec.json, the code it names and its checked SHA-256."""
    from distml.artifact import WEIGHTS, code_references, read_spec, verify_integrity
    from distml.errors import ArtifactError
    from distml.registry import Registry

    reg = Registry(registry)
    version = reg.resolve(ref)
    spec = read_spec(version.path)
    console.print(f"[bold]{version.name}[/] version {version.version} at {version.path}")
    console.print_json(json.dumps(spec))
    code = code_references(spec)
    console.print("code it names: " + ("none" if not code else ", ".join(
        f"{what} {path!r}" for what, path in code) + " (it loads only with --trust-code or "
        "--trust-module)"), highlight=False)
    digest = verify_integrity(version.path, spec)[WEIGHTS]  # a mismatch: error, exit 2
    console.print(f"sha256 {WEIGHTS}: {digest} (verified)", highlight=False)
    _print_lineage(spec)
    registered = [e["sha256"] for e in (reg.audit(version.name) if version.version else [])
                  if e.get("event") == "register" and e.get("version") == version.version]
    if registered and registered[-1] != digest:
        raise ArtifactError(f"{version.path}: the registry's audit log recorded sha256 "
                            f"{registered[-1]} at registration; the artifact now records "
                            f"{digest}: it was replaced after registration")


@models_app.command("promote")
@user_errors
def models_promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version to point the alias at.")],
    alias: Annotated[str, typer.Option(help="Alias to move.")] = "production",
    registry: RegistryOpt = Path("registry"),
) -> None:
    """Point an alias (default: production) at a version; the move goes to the audit log."""
    from distml.registry import AUDIT, Registry

    reg = Registry(registry)
    reg.set_alias(name, alias, version, reason="distml models promote")
    console.print(f"{name}@{alias} → version {version} (logged in "
                  f"{reg.root / name / AUDIT})", highlight=False)
