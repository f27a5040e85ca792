"""Whether code that an artifact names may run: the one decision, made where artifacts load.

An artifact's ``spec.json`` may name a user transform or model factory as 'module:function'
(or 'path/to/file.py:function'); loading it would import that module, which can do anything.
An artifact may come from someone else, so such an artifact is refused unless the user trusts
it: ``--trust-code`` (everything) or ``--trust-module``/``serve.trusted_modules`` (those
modules and their submodules, or those .py files). Built-in transforms and zoo models are
not code from the artifact and need no trust.

The policy is a small frozen value: it is pickled into work items, so worker processes
(local pool, Dask, Ray) decide exactly as the command did.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distml.errors import ArtifactError


@dataclass(frozen=True)
class TrustPolicy:
    """What code an artifact may name. The default trusts none."""

    trust_code: bool = False
    modules: tuple[str, ...] = ()

    @classmethod
    def of(cls, *, trust_code: bool = False, modules: Iterable[str] = ()) -> TrustPolicy:
        return cls(trust_code=trust_code, modules=tuple(modules))

    @classmethod
    def for_serve(cls, settings: Any) -> TrustPolicy:
        """From a ``ServeConfig`` (serve.trust_code, serve.trusted_modules)."""
        return cls.of(trust_code=settings.trust_code, modules=settings.trusted_modules)

    def allows(self, import_path: str) -> bool:
        if self.trust_code:
            return True
        module = import_path.rpartition(":")[0]
        for trusted in self.modules:
            if trusted.endswith(".py"):
                if module.endswith(".py") and _same_file(module, trusted):
                    return True
            elif module == trusted or module.startswith(trusted + "."):
                return True
        return False

    def check(self, code: list[tuple[str, str]], *, where: str) -> None:
        """Refuse, naming each function, unless every (what, 'module:function') is trusted."""
        refused = [(what, path) for what, path in code if not self.allows(path)]
        if not refused:
            return
        named = "; ".join(f"{what} {path!r}" for what, path in refused)
        modules = sorted({path.rpartition(":")[0] for _, path in refused})
        raise ArtifactError(
            f"{where} names code that loading it would run: {named}. distml runs code from an "
            "artifact only when you trust it: pass --trust-code, or trust its module with "
            + " ".join(f"--trust-module {m}" for m in modules)
            + " (distml serve: serve.trust_code or serve.trusted_modules in the config)")


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError):
        return False
