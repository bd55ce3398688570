"""Check a vLLM release's *source* against the symbols vllm-steer relies on, without importing it.

For a vLLM that cannot be imported here (a CUDA wheel on a GPU-less machine), this reads the wheel's
Python files and checks each ``compat.REQUIRED`` entry by parsing them: the module, the class and
attribute path, and the leading parameter names of each callable. It is the same list a steering
engine checks at start-up on an importable vLLM.

    python scripts/check_vllm_source.py vllm-0.33.0-*.whl      (or an unpacked source folder)

Prints one line per symbol and exits 1 when any is missing or changed.
"""

from __future__ import annotations

import ast
import sys
import zipfile
from pathlib import Path

from vllm_steer.integration.compat import REQUIRED, Needed


class Source:
    def __init__(self, where: Path) -> None:
        self.where = where
        self.zip = zipfile.ZipFile(where) if where.is_file() else None
        self.names = set(self.zip.namelist()) if self.zip else None

    def read(self, rel: str) -> str | None:
        if self.zip is not None:
            return self.zip.read(rel).decode() if rel in self.names else None
        path = self.where / rel
        return path.read_text() if path.is_file() else None

    def module(self, dotted: str) -> ast.Module | None:
        base = dotted.replace(".", "/")
        for rel in (f"{base}.py", f"{base}/__init__.py"):
            text = self.read(rel)
            if text is not None:
                return ast.parse(text)
        return None


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, ...]:
    args = node.args
    return tuple(a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs])


def _defined_in(body: list[ast.stmt], name: str):
    """The statement of ``body`` (a module's or a class's) that defines ``name``, or None."""
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node
    return None


def _lookup(src: Source, module: str, name: str, depth: int = 0):
    """The AST node defining ``name`` at the top of ``module`` (following imports), or None."""
    tree = src.module(module)
    if tree is None or depth > 6:
        return None
    package = module if src.read(module.replace(".", "/") + "/__init__.py") is not None else module.rpartition(".")[0]
    defined = _defined_in(tree.body, name)
    if defined is not None:
        return defined
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            origin = node.module or ""
            if node.level:
                parts = package.split(".")
                origin = ".".join(parts[: len(parts) - node.level + 1] + ([origin] if origin else []))
            for alias in node.names:
                if alias.name == "*" or (alias.asname or alias.name) == name:
                    found = _lookup(src, origin, alias.name if alias.name != "*" else name, depth + 1)
                    if found is not None:
                        return found
    return None


def _member(src: Source, module: str, cls: ast.ClassDef, name: str, depth: int = 0):
    """``name`` defined in ``cls`` or, failing that, in a base class named in its bases that ``module``
    defines or imports (the methods a subclass inherits)."""
    defined = _defined_in(cls.body, name)
    if defined is not None:
        return defined
    if depth > 6:
        return None
    for base in cls.bases:
        if isinstance(base, ast.Name):
            parent = _lookup(src, module, base.id)
            if isinstance(parent, ast.ClassDef):
                found = _member(src, module, parent, name, depth + 1)
                if found is not None:
                    return found
    return None


def problem(src: Source, needed: Needed) -> str | None:
    head, *rest = needed.path.split(".")
    node = _lookup(src, needed.module, head)
    if node is None:
        return f"{needed.name}: missing"
    for part in rest:
        if not isinstance(node, ast.ClassDef):
            return f"{needed.name}: {part} is not looked up inside a class here"
        inner = _member(src, needed.module, node, part)
        if inner is None:
            return (f"{needed.name}: missing (not defined in class {node.name} nor in its base classes "
                    "that this module defines or imports by name)")
        node = inner
    if needed.params is None:
        return None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None  # a class: its signature is its __init__'s, not checked here
    found = _params(node)
    decorators = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in node.decorator_list}
    if "classmethod" in decorators or "staticmethod" in decorators:
        found = found[1:] if "classmethod" in decorators else found
    if found[: len(needed.params)] != needed.params:
        return f"{needed.name}: expected parameters ({', '.join(needed.params)}, ...), found ({', '.join(found)})"
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-3].strip(), file=sys.stderr)
        return 2
    src = Source(Path(argv[0]))
    bad = 0
    for needed in REQUIRED:
        issue = problem(src, needed)
        bad += issue is not None
        print(f"{'MISSING ' if issue else 'ok      '}{issue or needed.name}")
    print(f"{len(REQUIRED) - bad} of {len(REQUIRED)} symbols as vllm-steer expects them")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
