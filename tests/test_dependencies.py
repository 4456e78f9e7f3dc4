"""Every third-party package that `latentcot/*.py` imports is declared in pyproject's runtime dependencies.

A user installs `pip install latentcot` without the dev extra, so an import that only the dev tools bring
(fastcore came through nbdev) fails for them and never in CI. This test reads the imports with `ast`.
"""
import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_norm(re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0]) for d in deps}


def imported() -> dict[str, set[str]]:
    "Top-level third-party module -> the files importing it (anywhere in the file, lazy imports too)."
    out: dict[str, set[str]] = {}
    for f in sorted((ROOT / "latentcot").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top != "latentcot":
                    out.setdefault(top, set()).add(f.name)
    return out


def test_imports_are_declared():
    dists, want = md.packages_distributions(), declared()
    found = imported()
    assert {"torch", "transformers", "diffusers"} <= set(found)  # the scan sees the package's imports
    missing = {
        top: sorted(files)
        for top, files in found.items()
        if not any(_norm(d) in want for d in dists.get(top, [top]))
    }
    assert not missing, f"imported by latentcot but not in pyproject's [project] dependencies: {missing}"


def test_the_check_catches_an_undeclared_import(tmp_path, monkeypatch):
    "The same rule on a fake tree: an import of a package outside the list is reported."
    fake = tmp_path / "latentcot"
    fake.mkdir()
    (fake / "m.py").write_text("import torch\ndef f():\n    from fastcore.basics import patch\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imported() == {"torch": {"m.py"}, "fastcore": {"m.py"}}
