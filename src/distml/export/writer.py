"""``distml export kubernetes``: write the Dockerfile and every manifest into one folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import distml
from distml.errors import ConfigError
from distml.export import argo, katib, kubernetes
from distml.export.dockerfile import DOCKERFILE, dockerignore
from distml.export.plan import ExportPlan, load_plan
from distml.fsutil import write_text_atomic

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
DEFAULT_IMAGE = f"distml:{distml.__version__}"


def manifests(plan: ExportPlan, *, image: str, device: str) -> dict[str, list[dict[str, Any]]]:
    """File name -> the objects it holds, in the order a user applies them."""
    files: dict[str, list[dict[str, Any]]] = {
        "pvc.yaml": [kubernetes.volume_claim(plan)],
        "configmap.yaml": [kubernetes.config_map(plan)],
        "rbac.yaml": kubernetes.rbac(plan),
    }
    for cand, label in plan.candidates.items():
        name = kubernetes.trainjob_name(plan, cand)
        kubernetes.check_trainjob_name(name, plan.layouts[cand])
        kubernetes.check_trainjob_name(argo.sample_trainjob_name(plan, cand), plan.layouts[cand])
        files[f"trainjob-{label}.yaml"] = [kubernetes.trainjob(
            plan, cand, image=image, device=device, name=name,
            args=[plan.config_in_image, "--candidate", cand])]
    for cand in plan.cfg.train.candidates:
        if cand.search is not None:
            files[f"experiment-{plan.candidates[cand.name]}.yaml"] = [katib.experiment(
                plan, cand, image=image, device=device)]
    files["inferenceservice.yaml"] = [kubernetes.inference_service(plan, image=image)]
    files["workflow.yaml"] = [argo.workflow(plan, image=image, device=device)]
    return files


def export_kubernetes(
    config: Path, out: Path, *, image: str = DEFAULT_IMAGE, overrides: list[str] | None = None,
    device: str = "cpu", context: Path | None = None,
) -> list[Path]:
    """Write the Dockerfile, its ignore file and the manifests for CONFIG under ``out``;
    ``context`` (default: the working directory) is the Docker build context."""
    if device not in DEVICES:
        raise ConfigError(f"--device {device!r}: use one of {', '.join(DEVICES)}")
    if not image.strip() or any(c.isspace() for c in image):
        raise ConfigError(f"--image {image!r} is not an image reference; e.g. "
                          "registry.example.com/team/distml:0.1.0")
    context = Path(context or Path.cwd())
    plan = load_plan(config, overrides or [], context=context)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    header = (f"# Written by `distml export kubernetes {config}` (distml "
              f"{distml.__version__}); see README, Scaling out.\n")
    for file, objects in manifests(plan, image=image, device=device).items():
        written.append(_write(out / file, header + kubernetes.to_yaml(*objects)))
    inside = _relative(out, context)
    written.append(_write(out / "Dockerfile", DOCKERFILE))
    written.append(_write(out / "Dockerfile.dockerignore", dockerignore(inside)))
    logger.info("wrote %d files to %s", len(written), out)
    return written


def _write(path: Path, text: str) -> Path:
    write_text_atomic(path, text)
    return path


def _relative(path: Path, root: Path) -> str | None:
    rel = os.path.relpath(path.resolve(), root.resolve())
    return None if rel.startswith("..") else Path(rel).as_posix()
