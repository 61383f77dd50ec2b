"""The package's layers, checked from the source: each module imports only its own layer or the
layers below it, pdc-internal imports sit at module top (none hidden in a function to dodge a
cycle), there is no import cycle, and the language layer never imports torch. A string that is
exactly a pdc module's name (`"pdc.stages.train.worker"`: a module started with `python -m`)
counts as a reference to it, like an import: a module starts only its own layer or lower, and
what it starts does not import it back."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pdc

ROOT = Path(pdc.__file__).resolve().parent
PASSES = ROOT.parent / "passes"
GRAMMAR = ROOT.parent / "grammar"
# Bottom to top; a module may import its own layer and the ones below.
LAYERS = [
    ("base", ("pdc", "pdc.errors", "pdc.files", "pdc.arch", "pdc.plotting")),
    ("lang", ("pdc.lang", "pdc.grammar")),
    ("plan", ("pdc.plan",)),
    ("inputs", ("pdc.inputs",)),
    ("graph", ("pdc.graph",)),
    ("passes", ("pdc.passes",)),
    ("emit", ("pdc.emit",)),
    ("stages", ("pdc.stages",)),
    ("runner", ("pdc.runner",)),
    ("cli", ("pdc.cli",)),
]
# A string holding just a dotted pdc module name.
MODULE_NAME = re.compile(r"pdc(\.[A-Za-z_][A-Za-z0-9_]*)+")
# Commands import the layers they need when they run: `pdc fmt` must not import torch.
LAZY_ALLOWED = {"pdc.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for base, prefix in ((ROOT, "pdc"), (PASSES, "pdc.passes"), (GRAMMAR, "pdc.grammar")):
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


def _layer(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or (p != "pdc" and module.startswith(p + ".")):
                best = i
    assert best is not None or module == "pdc", module
    return 0 if best is None else best


def _imports(path: Path, module: str) -> list[tuple[str, bool, int]]:
    """(imported pdc module, at module top?, line)."""
    tree = ast.parse(path.read_text())
    top = set(id(n) for n in tree.body)
    for n in tree.body:  # `if TYPE_CHECKING:` blocks count as top
        if isinstance(n, ast.If):
            top.update(id(c) for c in n.body)
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                pkg = module.split(".")[: -node.level] if not path.name == "__init__.py" else module.split(".")[: len(module.split(".")) - node.level + 1]
                base = ".".join(pkg + [node.module])
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.fullmatch(node.value):
            names = [node.value]  # a module named to be started (`python -m NAME`): a reference at top
            top.add(id(node))
        for name in names:
            if name == "pdc" or name.startswith("pdc."):
                out.append((name, id(node) in top, node.lineno))
    return out


def _resolve(name: str, modules: dict) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_layers_imports_only_downwards_and_at_module_top():
    modules = _modules()
    problems = []
    for mod, path in modules.items():
        for name, at_top, line in _imports(path, mod):
            target = _resolve(name, modules)
            if target is None or target == mod:
                continue
            if _layer(target) > _layer(mod):
                problems.append(f"{mod}:{line} imports {target} from a higher layer")
            if not at_top and mod not in LAZY_ALLOWED:
                problems.append(f"{mod}:{line} imports {target} inside a function")
    assert not problems, "\n".join(dict.fromkeys(problems))


def test_no_import_cycles():
    modules = _modules()
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        for name, at_top, _ in _imports(path, mod):
            target = _resolve(name, modules)
            if at_top and target and target != mod and not mod.startswith(target + "."):
                graph[mod].add(target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("argv", [["fmt", "{spec}"], ["compile", "{bad}", "--dry-run"]])
def test_language_commands_run_without_torch(tmp_path, argv):
    """`pdc fmt` and the checker's diagnostics work with torch made unimportable."""
    spec = tmp_path / "ok.pds"
    spec.write_text('model teacher = dir("m")\nprune width { hidden=32 }\n')
    bad = tmp_path / "bad.pds"
    bad.write_text('model teacher = dir("missing")\nprune width { hiden=32 }\n')
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    (blocker / "transformers.py").write_text("raise ImportError('transformers is blocked in this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
    args = [a.format(spec=spec, bad=bad) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "pdc.cli", *args], capture_output=True, text=True, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    if argv[0] == "fmt":
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("model teacher")
    else:
        assert proc.returncode == 2, proc.stderr
        assert f"{bad}:1:" in proc.stderr and f"{bad}:2:" in proc.stderr
        assert "did you mean 'hidden'" in proc.stderr
