"""The ``distml`` application: its command groups, shared options, console and error handling.

Commands live in the modules beside this one, by area; ``distml.cli`` assembles them."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from distml.errors import DistmlError
from distml.processes import USER_ERROR

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
TrustCodeOpt = Annotated[bool, typer.Option(
    "--trust-code", help="Load the model even if its artifact names code to run (a user "
    "transform or model factory, 'module:function'); only for artifacts you trust.")]
TrustModuleOpt = Annotated[list[str] | None, typer.Option(
    "--trust-module", help="Trust the code of this module (and its submodules) or .py file "
    "only (repeatable).", show_default=False)]


def trust_policy(trust_code: bool, modules: list[str] | None):
    """The TrustPolicy of the --trust-code and --trust-module flags."""
    from distml.trust import TrustPolicy

    return TrustPolicy.of(trust_code=trust_code, modules=modules or ())


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User mistakes become one red line and exit code 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DistmlError as e:
            # soft_wrap: one line the terminal folds, not lines broken inside a path
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(USER_ERROR) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def load(config: Path, overrides: list[str] | None, quiet: bool):
    from distml.config import load_config
    from distml.ui import ConsoleReporter, setup_logging

    setup_logging(err_console if quiet else console, quiet=quiet)
    cfg = load_config(config, overrides or [])
    return cfg, ConsoleReporter(console, quiet=quiet)


def mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def print_candidates(results: list[dict[str, Any]], metric: str, selected: str | None) -> None:
    table = Table(title=f"candidates (val {metric})")
    for col in ("candidate", "params", metric, "steps", "train s", "samples/s"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for r in results:
        mark = " ★" if r["name"] == selected else ""
        table.add_row(r["name"] + mark, f"{r['params']:,}", f"{r['val'][metric]:.4f}",
                      str(r["steps"]), f"{r['train_seconds']:.1f}", f"{r['samples_per_s']:,.0f}")
    console.print(table)
