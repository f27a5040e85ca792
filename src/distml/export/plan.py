"""What an export needs from a config, read in one place: names, node layouts, serving.

The config is being restructured (``train.parallel``); every read of the parallel settings
goes through :func:`node_layout`, so the rest of the export never touches that layout.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distml.config import Config, apply_override, parse_config
from distml.errors import ConfigError

# Where things live in the cluster. One PersistentVolumeClaim holds the runs (ingested data,
# checkpoints, artifacts) and the registry; every pod mounts it at MOUNT, so the absolute
# paths distml writes into a run (result.json's artifact, the data symlink) hold in all pods.
MOUNT = "/mnt/distml"
RUNS = f"{MOUNT}/runs"
REGISTRY = f"{MOUNT}/registry"
APP_DIR = "/app"  # the image's WORKDIR: the Dockerfile copies the build context here

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class NodeLayout:
    """How one candidate's processes spread over Kubernetes nodes (pods)."""

    strategy: str
    world_size: int
    num_nodes: int
    max_restarts: int

    @property
    def procs_per_node(self) -> int:
        return self.world_size // self.num_nodes


@dataclass(frozen=True)
class ExportPlan:
    """The config as the export sees it."""

    cfg: Config
    config_text: str  # the config shipped to the cluster (overrides applied, paths on MOUNT)
    config_in_image: str  # where pods see it: the same place relative to APP_DIR
    name: str  # cfg.name as a DNS label, the prefix of every object's name
    candidates: dict[str, str]  # candidate name -> its DNS-label form
    layouts: dict[str, NodeLayout]

    @property
    def run_root(self) -> str:
        return f"{RUNS}/{self.cfg.name}"


def node_layout(cfg: Config, candidate: Any) -> NodeLayout:
    """A candidate's processes and nodes: ``train.parallel.{strategy,world_size,num_nodes}``
    (the config checked that the world size divides over the nodes)."""
    s = cfg.train.settings_for(candidate)
    par = s.parallel
    return NodeLayout(par.strategy, par.world_size, par.num_nodes, s.max_restarts)


def dns_label(text: str, *, what: str) -> str:
    """``text`` as a Kubernetes object name (RFC 1035 label): lower case, '-' for '_' and '.'."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if label and not label[0].isalpha():
        label = f"x-{label}"
    if not _DNS_LABEL.match(label):
        raise ConfigError(f"{what} {text!r} cannot be made into a Kubernetes name; use letters, "
                          "digits and '-'")
    return label


def load_plan(config: Path, overrides: list[str], *, context: Path) -> ExportPlan:
    """Read CONFIG with its ``--set`` overrides, pointing output_dir and registry at the
    shared volume. ``context`` is the Docker build context the image copies to APP_DIR."""
    config = Path(config)
    if not config.is_file():
        raise ConfigError(f"config file {str(config)!r} does not exist")
    try:
        relative = config.resolve().relative_to(Path(context).resolve())
    except ValueError:
        raise ConfigError(
            f"config {str(config)!r} is outside {str(context)!r}, the folder the Dockerfile "
            "copies into the image; export from the project folder (relative paths in the "
            "config must resolve in the image as they do here)") from None
    try:
        raw = yaml.safe_load(config.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{config} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    for assignment in [*overrides, f"output_dir={RUNS}", f"registry={REGISTRY}"]:
        apply_override(raw, assignment)
    cfg = parse_config(copy.deepcopy(raw), base_dir=config.resolve().parent)
    candidates = {c.name: dns_label(c.name, what="candidate name") for c in cfg.train.candidates}
    if len(set(candidates.values())) < len(candidates):
        raise ConfigError(f"candidate names {sorted(candidates)} collide as Kubernetes names "
                          f"({sorted(candidates.values())}); rename them")
    return ExportPlan(
        cfg=cfg,
        config_text=yaml.safe_dump(raw, sort_keys=False),
        config_in_image=f"{APP_DIR}/{relative.as_posix()}",
        name=dns_label(cfg.name, what="config name"),
        candidates=candidates,
        layouts={c.name: node_layout(cfg, c) for c in cfg.train.candidates},
    )
