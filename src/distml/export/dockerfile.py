"""The project's Dockerfile (CPU PyTorch by default, CUDA by build argument) and its ignore
file. Build from the project folder, which is the context the Dockerfile copies::

    docker build -f k8s/Dockerfile -t IMAGE .
    docker build -f k8s/Dockerfile -t IMAGE \\
        --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .

BuildKit reads ``k8s/Dockerfile.dockerignore`` (a Dockerfile's own ignore file) instead of a
``.dockerignore`` at the context's root.
"""

from __future__ import annotations

from distml.export.plan import APP_DIR

TORCH_SPEC = "torch==2.13.0"  # the Makefile's pin
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

DOCKERFILE = f"""\
# syntax=docker/dockerfile:1
# distml: the project and its dependencies. CPU PyTorch by default; for CUDA:
#   docker build -f k8s/Dockerfile -t IMAGE \\
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
# (CUDA wheels bring their CUDA libraries: the nodes need only the NVIDIA driver), or start
# from an image with CUDA PyTorch already installed: --build-arg BASE_IMAGE=... .
ARG BASE_IMAGE=python:3.11-slim
FROM ${{BASE_IMAGE}}
ARG TORCH_SPEC={TORCH_SPEC}
ARG TORCH_INDEX_URL={CPU_INDEX}
# Extras to install, e.g. --build-arg EXTRAS=mlflow,dask
ARG EXTRAS=
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, pinned, from the index above (as the Makefile does): installing the project
# alone would pull the default CUDA wheel and gigabytes of CUDA packages into a CPU image.
RUN pip install --index-url "${{TORCH_INDEX_URL}}" "${{TORCH_SPEC}}"

WORKDIR {APP_DIR}
COPY . {APP_DIR}
RUN pip install "{APP_DIR}${{EXTRAS:+[$EXTRAS]}}" \\
    && python -c "import distml, torch; print('distml', distml.__version__, torch.__version__)"

# Not root: the manifests give the pods fsGroup 1000 so this user can write on the volume.
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin distml
USER 1000
CMD ["distml", "--help"]
"""


def dockerignore(out_dir_in_context: str | None) -> str:
    """What the build context leaves out: environments, runs, caches, and the export's own
    folder (``out_dir_in_context``, when it is inside the context)."""
    lines = [".git", ".venv", "venv", "**/__pycache__", "**/*.pyc", ".pytest_cache",
             ".ruff_cache", "*.egg-info", "build", "dist", "runs", "registry", "mlruns",
             "mlartifacts", "bench/results"]
    if out_dir_in_context and out_dir_in_context != ".":
        lines.append(out_dir_in_context)
    return "\n".join(lines) + "\n"
