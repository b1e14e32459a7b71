"""The package's import graph: no cycles, and dependencies that run one way
(modules -> parallel -> diffusion -> service / runner)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stepvideo"

# importer prefix -> prefixes it must not import (module-level or inside functions)
FORBIDDEN = {
    "stepvideo.modules": ("stepvideo.parallel", "stepvideo.service", "stepvideo.diffusion",
                          "stepvideo.runner", "stepvideo.suite_runner", "stepvideo.bench"),
    "stepvideo.text_encoder": ("stepvideo.parallel", "stepvideo.service", "stepvideo.diffusion",
                               "stepvideo.runner"),
    "stepvideo.vae": ("stepvideo.parallel", "stepvideo.service", "stepvideo.diffusion",
                      "stepvideo.runner"),
    "stepvideo.conditioning": ("stepvideo.modules", "stepvideo.parallel", "stepvideo.service",
                               "stepvideo.diffusion", "stepvideo.runner"),
    "stepvideo.parallel": ("stepvideo.diffusion", "stepvideo.service", "stepvideo.runner"),
    "stepvideo.diffusion": ("stepvideo.service", "stepvideo.runner"),
    "stepvideo.service": ("stepvideo.diffusion", "stepvideo.parallel", "stepvideo.runner"),
    # The generation server sits beside the runner: the runner enters it and hands it the loaded
    # VideoGenerator, so it never imports the runner (nor does anything below import it).
    "stepvideo.genserver": ("stepvideo.runner", "stepvideo.suite_runner"),
}
for _lower in ("stepvideo.modules", "stepvideo.text_encoder", "stepvideo.vae",
               "stepvideo.conditioning", "stepvideo.parallel", "stepvideo.diffusion",
               "stepvideo.service"):
    FORBIDDEN[_lower] += ("stepvideo.genserver",)
# The release's call form ``pipeline.setup_api(vae_url, caption_url)`` builds the HTTP clients
# (one per address, or a replicated one for a list): the one upward import, at call time (the
# clients never import the pipeline, so no cycle).
ALLOWED = {("stepvideo.diffusion.video_pipeline", "stepvideo.service.replicas")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every stepvideo module ``path`` imports, at module level or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` also imports a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for importer, targets in graph.items():
        for prefix, banned in FORBIDDEN.items():
            if importer != prefix and not importer.startswith(prefix + "."):
                continue
            for target in sorted(targets):
                if (importer, target) in ALLOWED:
                    continue
                if any(target == b or target.startswith(b + ".") for b in banned):
                    out.append(f"{importer} imports {target}")
    return out


def test_graph_sees_imports():
    graph = import_graph()
    assert "stepvideo.modules.attention" in graph["stepvideo.modules.model"]
    assert "stepvideo.parallel.context" in graph["stepvideo.parallel.torch_backend"]
    assert "stepvideo.service.replicas" in graph["stepvideo.diffusion.video_pipeline"]  # in a function
    assert len(graph) >= 25


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_dependencies_run_one_way():
    assert violations(import_graph()) == []


def test_checks_catch_what_they_guard():
    """The two checks on a graph with a planted cycle and a planted upward import."""
    graph = {"stepvideo.modules.model": {"stepvideo.parallel"},
             "stepvideo.parallel": {"stepvideo.modules.model"}}
    assert find_cycle(graph) is not None
    assert violations(graph) == ["stepvideo.modules.model imports stepvideo.parallel"]


@pytest.mark.parametrize("snippet, expected", [
    ("from ..parallel import setup_parallel", "stepvideo.parallel"),
    ("def f():\n    from ..service.client import RemoteVAE", "stepvideo.service.client"),
    ("import stepvideo.diffusion.scheduler", "stepvideo.diffusion.scheduler"),
])
def test_imports_of_resolves_relative_and_nested(tmp_path, snippet, expected):
    fake = tmp_path / "model.py"
    fake.write_text(snippet + "\n", encoding="utf-8")
    found = imports_of("stepvideo.modules.model", fake, set(modules()))
    assert expected in found, found
