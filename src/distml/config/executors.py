"""The executor table: engine name (an ``execution.executor`` URL's scheme) -> the module
whose ``make(address, ...)`` builds it, and whether it takes an address. Pure data, so the
config validates against it when it loads; ``distml.execution`` imports the modules. A new
engine is its module plus one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineRecord:
    module: str  # its make(address, *, num_workers, retries, progress) -> Executor
    forms: dict[str, str]  # the executor values it takes -> what each is (help, errors)
    address: bool = True  # scheme://ADDRESS (local takes none)


ENGINES: dict[str, EngineRecord] = {
    "local": EngineRecord("distml.execution.local",
                          {"local": "a process pool on this machine"}, address=False),
    "dask": EngineRecord("distml.execution.dask",
                         {"dask://local": "a Dask LocalCluster",
                          "dask://HOST:PORT": "a running Dask scheduler"}),
    "ray": EngineRecord("distml.execution.ray",
                        {"ray://local": "a Ray cluster of this machine",
                         "ray://HOST:PORT": "a running Ray cluster's client server"}),
    "spark": EngineRecord("distml.execution.spark",
                          {"spark://local[N]": "a local Spark with N cores",
                           "spark://HOST:7077": "a Spark standalone cluster's master"}),
}


def executor_forms(*, described: bool = False) -> str:
    """'local, dask://local, ... or ray://HOST:PORT': every value an executor may take
    (``described``: each followed by what it is)."""
    forms = [f"{f} ({what})" if described else f
             for record in ENGINES.values() for f, what in record.forms.items()]
    return ", ".join(forms[:-1]) + " or " + forms[-1]


def engine_of(spec: str) -> str | None:
    """The engine an ``execution.executor`` value names, or None when it names none."""
    kind, _, address = spec.partition("://")
    record = ENGINES.get(kind)
    if record is None or record.address != bool(address):
        return None
    return kind
