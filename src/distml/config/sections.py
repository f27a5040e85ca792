"""The smaller sections: ``select``, ``execution``, ``serve`` and ``monitor``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from distml.config.base import NAME_PATTERN, Strict, resolve_path
from distml.config.executors import engine_of, executor_forms
from distml.storage import as_url

_MODULE = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"


class SelectConfig(Strict):
    """How the best candidate is chosen and registered."""

    metric: str | None = Field(
        None,
        description="Validation metric: accuracy, f1_macro or loss (classification); loss, mae "
        "or r2 (regression); perplexity or loss (language modeling). Default: the first.",
    )
    register_as: str | None = Field(
        None, pattern=NAME_PATTERN, description="Registry name; default: config name."
    )
    promote: bool = Field(
        True, description="Move the 'production' alias to the new version when it is better."
    )


class ExecutionConfig(Strict):
    """Where embarrassingly parallel work (preprocessing partitions) runs."""

    executor: str = Field(
        "local",
        description=executor_forms(described=True) + ".",
    )
    num_workers: int | None = Field(
        None, ge=1, description="Worker processes (local, dask://local, ray://local); "
        "default: the CPU count. 1 runs in-process."
    )
    retries: int = Field(
        2, ge=0, description="Retries of a failed work item before the stage fails."
    )

    @field_validator("executor")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        if engine_of(value) is None:
            raise ValueError(f"not an executor; use {executor_forms()}")
        return value


class ServeConfig(Strict):
    """Online serving (``distml serve``); command-line flags override these."""

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 exposes the server to "
                      "the network (then set a token).")
    port: int = Field(8000, ge=0, le=65535, description="Port; 0 picks a free one.")
    replicas: int = Field(1, ge=1, description="Worker processes behind the one port; a dead "
                          "one is replaced.")
    replica_routing: Literal["shared_port", "front"] = Field(
        "shared_port", description="With replicas > 1, how requests reach them. shared_port: "
        "every replica accepts on the one port itself (SO_REUSEPORT: the kernel spreads the "
        "connections; nothing between client and replica), idempotency keys, model loads and "
        "feedback passed between replicas over Unix sockets; a dying replica drops the "
        "connections it held. front: one front process forwards each request to a replica "
        "over a Unix socket (a request in flight on a dying replica gets 503, at the front's "
        "CPU cost on every request).")
    dynamic_batching: bool = Field(True, description="Gather the requests that arrive while "
                                   "the model is busy into its next forward pass (continuous "
                                   "batching; a request that finds it idle runs at once).")
    max_batch_size: int = Field(64, ge=1, description="Most rows in one forward pass.")
    max_delay_ms: float = Field(0.0, ge=0, description="With batching: longest wait, once one "
                                "is queued, for requests whose bodies are still being read (0: "
                                "none; a lone request never waits).")
    max_queue_rows: int = Field(1024, ge=1, description="Rows waiting per replica; past it, "
                                "503 with Retry-After.")
    timeout_ms: float = Field(5000.0, gt=0, description="Per-request deadline (a request may "
                              "ask for less with the X-Request-Timeout-Ms header); past it, "
                              "504 and the work is dropped.")
    idempotency_window_s: float = Field(60.0, ge=0, description="Requests with the same "
                                        "Idempotency-Key header within this window are "
                                        "computed once.")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="Largest request body; "
                                "larger gets 413.")
    max_header_bytes: int = Field(64 * 2**10, ge=1024, description="Largest request line "
                                  "and headers together; larger gets 431 and the connection "
                                  "is closed.")
    read_timeout_s: float = Field(30.0, gt=0, description="Longest a client may take to send "
                                  "a whole request (headers and body), from its first byte "
                                  "or the connection's opening; past it, 408 and the "
                                  "connection is closed.")
    ssl_certfile: Path | None = Field(None, description="TLS: the server's certificate (PEM, "
                                      "with its chain), for REST and gRPC; with ssl_keyfile. "
                                      "Relative to the config.")
    ssl_keyfile: Path | None = Field(None, description="TLS: the certificate's private key "
                                     "(PEM, unencrypted); with ssl_certfile.")
    quantize: Literal["none", "int8"] = Field("none", description="int8: dynamic int8 "
                                              "quantization of Linear layers (CPU).")
    grpc_port: int | None = Field(None, ge=0, le=65535, description="Also serve the "
                                  "protocol's gRPC service on this port (0: a free one); "
                                  "null: REST only.")
    reload_interval_s: float | None = Field(1.0, gt=0, description="Serving name or "
                                            "name@alias: check the registry this often and "
                                            "switch to the version it names; null: never.")
    monitor: bool = Field(True, description="Monitor the served traffic for drift, off the "
                          "request path, when the artifact has a reference.json (written by "
                          "the select stage): GET /v2/models/{name}/drift, feedback labels, "
                          "distml_drift_* metrics; false: off.")
    monitor_queue_rows: int = Field(10_000, ge=1, description="Rows waiting for the drift "
                                    "monitor; past it a request's rows are left unmonitored "
                                    "(counted in distml_drift_dropped_rows), never the "
                                    "request refused.")
    monitor_interval_s: float = Field(10.0, gt=0, description="Refresh the distml_drift_* "
                                      "metrics this often while traffic arrives.")
    trust_code: bool = Field(False, description="Load artifacts that name code to run (a user "
                             "transform or model factory, 'module:function') from any module; "
                             "default: refuse them (--trust-code sets it).")
    trusted_modules: list[str] = Field(
        default_factory=list, description="Modules (a package trusts its submodules) or .py "
        "files (relative to the config) whose functions an artifact may name without "
        "trust_code (--trust-module adds one). Built-in transforms and zoo models need none.")

    @field_validator("ssl_certfile", "ssl_keyfile", mode="before")
    @classmethod
    def _relative(cls, value: Any, info: ValidationInfo) -> Any:
        return value if value is None else resolve_path(value, info)

    @field_validator("trusted_modules", mode="before")
    @classmethod
    def _modules(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, list):
            return value
        out = []
        for v in value:
            if isinstance(v, str) and v.endswith(".py"):
                v = str(resolve_path(v, info))
            elif isinstance(v, str) and not re.fullmatch(_MODULE, v):
                raise ValueError(f"{v!r} is neither a module name (package.module) nor a .py "
                                 "file")
            out.append(v)
        return out


class MlflowConfig(Strict):
    """MLflow tracking: one run per candidate inside one parent run per pipeline run."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (http://host:5000, sqlite:///path.db, ...); "
        "default: sqlite:///<output_dir>/mlflow.db with artifacts in <output_dir>/mlartifacts.")
    experiment: str | None = Field(None, description="Experiment name; default: the pipeline "
                                   "name.")
    register_model: bool = Field(True, description="Register the selected model in MLflow's model "
                           "registry (under select.register_as or the pipeline name).")

    @field_validator("tracking_uri")
    @classmethod
    def _no_file_store(cls, value: str | None) -> str | None:
        # MLflow's file store (./mlruns) is in maintenance mode and MLflow 3 refuses it
        # unless an environment variable says otherwise: say what to use at load time.
        scheme = value.partition(":")[0] if value is not None and ":" in value else ""
        if value is not None and (scheme == "file" or (not scheme and value != "databricks")):
            raise ValueError(
                "MLflow's file store (file:// or a plain folder) is in maintenance mode and "
                "MLflow 3 refuses it; use sqlite:///path/to/mlflow.db (a local SQL store, the "
                "default when tracking_uri is left out) or an http://host:5000 server")
        return value


class WatchConfig(Strict):
    """The continuous-training loop (``distml watch``): files landing in a folder are checked
    for drift against production; on drift the candidates are retrained and the new model
    promoted if it beats production on the newest data."""

    landing: str | Path | None = Field(
        None, union_mode="left_to_right", description="Folder where new CSV/Parquet files "
        "land (relative to the config; --landing overrides), or a storage URL prefix "
        "(s3://bucket/landing/). Write a file under a name starting with '.' and rename it "
        "in (an object needs no care).")
    window_files: int = Field(
        2, ge=0, description="Older files ingested with the new ones in a retraining cycle: "
        "the most recent of the data source's files and the files landed before.")
    retrain: Literal["drift", "always"] = Field(
        "drift", description="drift: retrain when the new files drift from production's "
        "reference (a drifted column or concept drift, from the labels); always: on every "
        "new file (--retrain-always).")
    poll_interval_s: float = Field(
        5.0, gt=0, description="How often the landing folder is checked (without --once).")

    @field_validator("landing", mode="before")
    @classmethod
    def _relative_to_config(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and as_url(value):
            return as_url(value)
        return resolve_path(value, info) if isinstance(value, str | Path) else value


class DriftConfig(Strict):
    """When a column counts as drifted (distml watch's check; distml monitor's defaults)."""

    alpha: float = Field(0.05, gt=0, lt=1, description="False discovery rate of the columns' "
                         "tests in one report (Benjamini-Hochberg): a column must be "
                         "significant at it to be drifted.")
    min_wasserstein: float = Field(
        0.1, ge=0, description="A continuous column is drifted only if its normed Wasserstein "
        "distance (Wasserstein / the reference's standard deviation: how many standard "
        "deviations it moved) is at least this.")
    min_jensen_shannon: float = Field(
        0.1, ge=0, le=1, description="A discrete (at most 64 values) or categorical column is "
        "drifted only if the Jensen-Shannon distance (base 2) of its shares to the "
        "reference's is at least this.")
    false_alarms_per_million_rows: float = Field(
        1.0, gt=0, description="A report of n rows tests at min(alpha, this x n / 10^6), so "
        "data that did not change raises at most this many false alarms per 10^6 rows on "
        "average, whatever the size of the files it comes in.")


class MonitorConfig(Strict):
    """Tracking and monitoring."""

    tensorboard: bool = Field(
        True, description="Write TensorBoard event files under <run>/tensorboard/<candidate>.")
    histogram_every_steps: int = Field(
        50, ge=1, description="Histograms of weights and gradients every N steps.")
    system_metrics_interval_s: float | None = Field(
        2.0, gt=0, description="Sample CPU %, RSS (and GPU memory and utilisation) every N "
        "seconds on every rank, summarised per epoch; null: off.")
    mlflow: MlflowConfig | None = Field(
        None, description="MLflow tracking (needs distml[mlflow]): true for a local store, "
        "or {tracking_uri, experiment, register_model}; null or false: off.")

    watch: WatchConfig = Field(default_factory=WatchConfig, description="The continuous-"
                               "training loop (distml watch).")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="When a column is "
                               "named drifted: significance and an effect size.")

    @field_validator("mlflow", mode="before")
    @classmethod
    def _mlflow_switch(cls, value: Any) -> Any:
        if value is True:
            return {}
        return None if value is False else value


