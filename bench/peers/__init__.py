"""The Python model servers that bench/serve.py compares distml with, each serving the digits
artifact through its own documented API. A peer whose dependencies clash with distml's
installs into a virtual environment of its own under bench/.venvs/<peer>/, made on first use;
torch, numpy and distml come from the running environment through a .pth file placed after
the peer's own packages, so the peer's pins win and torch is not installed twice."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).parents[2]
VENVS = ROOT / "bench" / ".venvs"
PEERS = Path(__file__).parent

# Peer -> its requirements (pinned: a benchmark compares versions it names).
REQUIREMENTS = {
    "mlserver": ["mlserver==1.7.1"],
    "kserve": ["kserve==0.21.0"],
    "litserve": ["litserve==0.2.19"],
    # drift peers (bench/drift.py); Evidently's legacy API needs pandas < 3
    "evidently": ["evidently==0.7.23", "pandas==2.2.3"],
    "alibi_detect": ["alibi-detect==0.13.0"],
    "nannyml": ["nannyml==0.13.1", "statsmodels==0.15.0", "pandas==2.2.3"],
    # Ray Serve needs its extras (grpcio-reflection, ...) that the shared environment lacks;
    # the version is the shared environment's Ray.
    "rayserve": ["ray[serve]==2.60.0"],
    # bench/elastic.py: torchft's wheel wants torch >= 2.7, which ours is (installed with
    # ours visible, so that pip takes torch and OpenTelemetry from it: no second torch)
    "torchft": ["torchft==0.2.0"],
}
SEES_OURS = {"torchft"}  # peers installed with the .pth already in place


def python(peer: str) -> Path:
    """The interpreter of the peer's environment, made (once) if missing."""
    venv = VENVS / peer
    exe = venv / "bin" / "python"
    marker = venv / ".ready"
    if marker.is_file():
        return exe
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    site = subprocess.run([str(exe), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    # After the peer's own site-packages: distml's sources, then torch & co. from ours.
    pth = Path(site.stdout.strip()) / "zz_distml_bench.pth"
    ours = f"{ROOT / 'src'}\n{ROOT}\n{sysconfig.get_paths()['purelib']}\n"
    if peer in SEES_OURS:
        pth.write_text(ours)
    subprocess.run([str(exe), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *REQUIREMENTS[peer]], check=True)
    pth.write_text(ours)
    marker.touch()
    return exe
