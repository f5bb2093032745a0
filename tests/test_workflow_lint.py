"""Workflow hygiene: snakemake --lint, snakefmt, every rule's log/benchmark/conda, conda envs.

The env check follows each rule's ``script:`` through the evoformer modules it imports
and asserts that the rule's ``conda:`` environment provides every third-party import, except
optional ones: an import inside a ``try:`` whose handler catches ImportError (the code works
without it, e.g. the ``omnipath`` client of the prior rule).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RULE_FILES = [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]

# import name -> conda package names that provide it (default: the same name)
CONDA_NAMES = {
    "sklearn": {"scikit-learn"},
    "skmisc": {"scikit-misc"},
    "yaml": {"pyyaml"},
    "torch": {"pytorch", "pytorch-cpu", "pytorch-gpu"},
    "matplotlib": {"matplotlib", "matplotlib-base"},
    "umap": {"umap-learn"},
    "tensorboard": {"tensorboard"},
}


@pytest.mark.slow
def test_snakemake_lint_is_clean(make_workflow):
    wf = make_workflow("lint")
    proc = wf.run("--lint")
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout, proc.stdout


def test_snakefmt_check_is_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "--diff", *map(str, RULE_FILES)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _rules() -> dict[str, tuple[Path, str]]:
    """rule name -> (file, body text) for every rule in the Snakefile and rules/."""
    rules = {}
    for path in RULE_FILES:
        text = path.read_text()
        starts = list(re.finditer(r"^(?:local)?rule (\w+):", text, flags=re.M))
        for i, match in enumerate(starts):
            end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
            body = text[match.end() : end]
            # the body ends at the first non-indented, non-empty line
            lines = []
            for line in body.splitlines()[1:]:
                if line and not line[0].isspace():
                    break
                lines.append(line)
            rules[match.group(1)] = (path, "\n".join(lines))
    return rules


def _directive(body: str, name: str) -> str | None:
    match = re.search(rf"^\s+{name}:\s*\n\s+(?:\w+=)?f?\"([^\"]+)\"", body, flags=re.M)
    return match.group(1) if match else None


def test_every_rule_with_outputs_has_log_benchmark_and_conda():
    rules = _rules()
    assert {"hvg", "bin", "split", "pbmc68k", "synthetic"} <= set(rules)
    for name, (_, body) in rules.items():
        if not re.search(r"^\s+output:", body, flags=re.M):
            continue
        for directive in ("log", "benchmark", "conda"):
            assert _directive(body, directive), f"rule {name} has no {directive}:"
        assert _directive(body, "log").startswith("logs/"), name
        assert _directive(body, "benchmark").startswith("results/benchmarks/"), name


def _env(path: Path) -> dict:
    env = yaml.safe_load(path.read_text())
    assert set(env) >= {"channels", "dependencies"}, path
    return env


def _conda_packages(env: dict) -> set[str]:
    names = set()
    for dep in env["dependencies"]:
        assert isinstance(dep, str), f"pip sections are not used: {dep}"
        names.add(re.split(r"[=<>!\s]", dep, maxsplit=1)[0].strip())
    return names


@pytest.mark.parametrize("path", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_files_parse_and_pin_python(path):
    env = _env(path)
    packages = _conda_packages(env)
    assert "python" in packages
    assert any(re.fullmatch(r"python\s*[=>]=?\s*3\.1[1-9].*", d) for d in env["dependencies"]), path


def _module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _optional_imports(tree: ast.AST) -> set[int]:
    """ids of the import nodes in the bodies of ``try`` blocks that catch ImportError."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = {
            name.id
            for h in node.handlers
            if h.type is not None
            for name in ast.walk(h.type)
            if isinstance(name, ast.Name)
        }
        if caught & {"ImportError", "ModuleNotFoundError"}:
            ids |= {
                id(n)
                for stmt in node.body
                for n in ast.walk(stmt)
                if isinstance(n, ast.Import | ast.ImportFrom)
            }
    return ids


def _third_party_imports(script: Path) -> set[str]:
    """Top-level third-party modules imported by ``script`` and the evoformer modules it uses."""
    found: set[str] = set()
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text())
        optional = _optional_imports(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top == "evoformer":
                    target = _module_file(module)
                    if target is not None:
                        todo.append(target)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.add(top)
    return found


def test_rule_envs_cover_what_the_code_imports():
    checked = 0
    for name, (path, body) in _rules().items():
        script, conda = _directive(body, "script"), _directive(body, "conda")
        if not script or not conda:
            continue
        env = _conda_packages(_env((path.parent / conda).resolve()))
        imports = _third_party_imports((path.parent / script).resolve())
        missing = {m for m in imports if not (CONDA_NAMES.get(m, {m}) & env)}
        assert not missing, f"rule {name}: {conda} lacks {sorted(missing)}"
        checked += 1
    assert checked >= 5
