"""Commands that put a model to work: serve (online) and predict (batch); and version."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

import distml
from distml.cli.app import (
    QuietOpt,
    RegistryOpt,
    TrustCodeOpt,
    TrustModuleOpt,
    app,
    console,
    err_console,
    trust_policy,
    user_errors,
)
from distml.config.executors import executor_forms


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
    replica_routing: Annotated[str | None, _opt(
        "shared_port (each replica accepts on the port) or front (one process forwards).")
    ] = None,
    batching: Annotated[bool | None, _opt("Dynamic batching.", show_default=False)] = None,
    max_batch_size: Annotated[int | None, _opt("Most rows in one forward pass.")] = None,
    max_delay_ms: Annotated[float | None, _opt("Longest wait to fill a batch.")] = None,
    max_queue_rows: Annotated[int | None, _opt("Queue bound per replica (then 503).")] = None,
    timeout_ms: Annotated[float | None, _opt("Per-request deadline (then 504).")] = None,
    quantize: Annotated[str | None, _opt("none or int8 (dynamic int8 Linear layers).")] = None,
    grpc_port: Annotated[int | None, _opt("Also serve the protocol's gRPC service on this "
                                          "port (0: a free one).")] = None,
    ssl_certfile: Annotated[Path | None, _opt("TLS certificate (PEM, with its chain) for "
                                              "REST and gRPC; with --ssl-keyfile.")] = None,
    ssl_keyfile: Annotated[Path | None, _opt("TLS private key (PEM, unencrypted).")] = None,
    max_body_bytes: Annotated[int | None, _opt("Largest request body (then 413).")] = None,
    read_timeout_s: Annotated[float | None, _opt("Longest a client may take to send a "
                                                 "request (then 408, connection closed).")
                              ] = None,
    reload_interval: Annotated[float | None, _opt(
        "Check the registry this often (seconds) and switch to the version REF names.")
    ] = None,
    monitor: Annotated[bool | None, _opt("Drift monitoring of the traffic (when the artifact "
                                         "has a reference).", show_default=False)] = None,
    token: Annotated[str | None, typer.Option(
        envvar="DISTML_SERVE_TOKEN", show_default=False,
        help="Require 'Authorization: Bearer TOKEN' on model routes (health stays open).")
    ] = None,
    registry: Annotated[Path | None, typer.Option(
        help="Registry folder; default: the config's, else ./registry.")] = None,
    trust_code: TrustCodeOpt = False,
    trust_module: TrustModuleOpt = None,
    insecure: Annotated[bool, typer.Option(
        help="Allow a non-loopback address without a token (when a gateway in front "
        "authenticates).")] = False,
) -> None:
    """Serve a model over the Open Inference Protocol (KServe v2 / Triton: REST, gRPC)."""
    from distml.config import ServeConfig, load_config
    from distml.serving.server import serve as run_server
    from distml.ui import setup_logging

    setup_logging(console, quiet=False)
    cfg = load_config(config) if config is not None else None
    flags = {"host": host, "port": port, "replicas": replicas,
             "replica_routing": replica_routing, "dynamic_batching": batching,
             "max_batch_size": max_batch_size, "max_delay_ms": max_delay_ms,
             "max_queue_rows": max_queue_rows, "timeout_ms": timeout_ms, "quantize": quantize,
             "grpc_port": grpc_port, "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile,
             "max_body_bytes": max_body_bytes, "read_timeout_s": read_timeout_s,
             "reload_interval_s": reload_interval, "monitor": monitor}
    base = cfg.serve.model_dump() if cfg is not None else {}
    if trust_code:  # the flags add trust to the config's, never take it away
        flags["trust_code"] = True
    if trust_module:
        flags["trusted_modules"] = [*base.get("trusted_modules", []), *trust_module]
    settings = _validated(ServeConfig, {**base, **{k: v for k, v in flags.items()
                                                   if v is not None}},
                          "invalid serve settings (flags or the config's serve section)")
    registry = registry or (cfg.registry if cfg is not None else Path("registry"))
    _check_exposure(settings.host, token=token, insecure=insecure,
                    tls=settings.ssl_certfile is not None)

    def ready(url: str, info: dict[str, Any]) -> None:
        grpc = f", gRPC at {info['grpc']}" if "grpc" in info else ""
        console.print(f"serving [bold]{info['model']}:{info['version']}[/] at {url}{grpc} "
                      f"({info['replicas']} replica{'s' if info['replicas'] > 1 else ''}"
                      f"{', token required' if token else ''}); Ctrl-C stops", highlight=False)

    run_server(ref, settings, registry=registry, token=token or None, on_ready=ready)


def _check_exposure(host: str, *, token: str | None, insecure: bool, tls: bool = False
                    ) -> None:
    """Refuse to open the model to other machines with no token, unless told to. TLS does
    not change that: it hides the traffic, it does not say who may send it."""
    import ipaddress

    from distml.errors import ConfigError

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = host == "localhost"
    if not loopback and not token and not insecure:
        raise ConfigError(
            f"serve.host={host!r} is reachable from other machines, and without a token "
            "anyone who reaches it can use the model"
            f"{' (TLS encrypts the traffic but does not authenticate clients)' if tls else ''}"
            "; set --token (or DISTML_SERVE_TOKEN), bind 127.0.0.1, or pass --insecure when a "
            "gateway in front authenticates")


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
        help=executor_forms() + ".")
    ] = "local",
    workers: Annotated[int | None, typer.Option(help="Worker processes; default: cores.")
                       ] = None,
    registry: RegistryOpt = Path("registry"),
    trust_code: TrustCodeOpt = False,
    trust_module: TrustModuleOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Batch inference: predict every row of the input's partitions into one Parquet file."""
    from distml.serving.predict import predict as run_predict
    from distml.ui import ConsoleReporter, setup_logging

    setup_logging(err_console if quiet else console, quiet=quiet)
    reporter = ConsoleReporter(console, quiet=quiet)
    out = run_predict(ref, input_, output, registry=registry, executor=executor,
                      num_workers=workers, id_column=id_column,
                      progress=getattr(reporter, "progress", None),
                      trust=trust_policy(trust_code, trust_module))
    if not quiet:
        console.print(f"{out['rows']:,} rows from {out['parts']} part(s) predicted by "
                      f"{out['model']}:{out['version']} → {out['output']}")


@app.command()
def version() -> None:
    """Print the versions of distml, torch and Python."""
    import torch

    console.print(f"distml {distml.__version__}, torch {torch.__version__}, "
                  f"Python {sys.version.split()[0]}")
