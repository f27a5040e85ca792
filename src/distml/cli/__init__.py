"""The ``distml`` command line: one small function per subcommand over the layers below,
grouped by area in the modules of this package."""

from __future__ import annotations

from distml.cli import (  # noqa: F401 - they register commands
    inspect,
    kubernetes,
    monitor,
    pipeline,
    plan,
    serving,
)
from distml.cli.app import app, data_app, models_app, runs_app

__all__ = ["app", "data_app", "main", "models_app", "runs_app"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
