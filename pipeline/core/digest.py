"""Code digests: which `pipeline` modules a stage runs, found by parsing, and a hash of them.

One function serves the workflow (each rule's `params.code`, so editing a module reruns exactly
the stages that import it; `workflow/rules/common.smk`) and the trainer's resume hash (an edited
model or loss never resumes an old run). Standard library only: the workflow imports this
module at start-up.

`module_closure` follows every import form, anywhere in a file (also inside functions):
`import pipeline.a.b`, `from pipeline import a`, `from pipeline.a import b` (b a submodule or a
name), relative imports (`from . import b`, `from ..a import b`). Importing a module runs its
packages' `__init__.py`, so those count too.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "pipeline"
#: the folder that holds the `pipeline` package (the repository root)
ROOT = Path(__file__).resolve().parents[2]


def module_path(name: str, root: Path = ROOT) -> Path | None:
    """`pipeline.a.b` -> root/pipeline/a/b.py or root/pipeline/a/b/__init__.py, else None."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _parents(name: str) -> list[str]:
    """`pipeline.a.b` -> [`pipeline`, `pipeline.a`, `pipeline.a.b`]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module name of a (possibly relative) `from` import's module part."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def direct_imports(name: str, root: Path = ROOT) -> frozenset[str]:
    """The `pipeline` modules (and packages) that module `name` imports directly."""
    path = module_path(name, root)
    if path is None:
        return frozenset()
    stat = path.stat()
    return _parsed_imports(name, path, stat.st_mtime_ns, stat.st_size, root)


@lru_cache(maxsize=4096)
def _parsed_imports(name: str, path: Path, mtime_ns: int, size: int, root: Path
                    ) -> frozenset[str]:
    """`direct_imports` of one version of a file (cached by its mtime and size)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, is_package, node.level, node.module)
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate == PACKAGE or candidate.startswith(PACKAGE + "."):
                found.update(p for p in _parents(candidate) if module_path(p, root))
    return frozenset(found)


def module_closure(name: str, root: Path = ROOT) -> list[str]:
    """Module `name`, its packages and every `pipeline` module it imports, transitively; sorted."""
    seen: set[str] = set()
    todo = [p for p in _parents(name) if module_path(p, root)]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(direct_imports(current, root) - seen)
    return sorted(seen)


def code_digest(name: str, root: Path = ROOT) -> str:
    """sha256 (16 hex digits) over the names and source bytes of `module_closure(name)`."""
    digest = hashlib.sha256()
    for module in module_closure(name, root):
        path = module_path(module, root)
        digest.update(module.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
