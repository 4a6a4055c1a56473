"""The package layering, read from the source: ``flmm`` has no import cycle, neither ``flmm`` nor
``pipeline`` imports the toy world, and ``flmm`` imports neither Ray nor pyarrow. Function-local
imports count like top-level ones (they are where cycles used to hide)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flmm", "pipeline", "jobs", "toyworld", "schemas")


def imports_of(path: Path, package: str | None = None) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as absolute dotted names; relative
    imports are resolved against ``package`` (by default the file's folder under the root)."""
    if package is None:
        package = ".".join(path.resolve().parent.relative_to(ROOT).parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            if base:
                found.add(base)
            found.update(f"{base}.{alias.name}".lstrip(".") for alias in node.names)
    return found


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from ... import`` names, with the dots of a relative import resolved."""
    if node.level == 0:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def module_graph() -> dict[str, set[str]]:
    """Project module → the project modules it imports (``from flmm import x`` counts as an
    import of ``flmm.x`` when that is a module, else of ``flmm``)."""
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for package in PACKAGES
        for path in (ROOT / package).glob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in imports_of(path) if m in modules and m != name}
    return graph


def cycle_in(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """One import cycle among ``nodes`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node] & nodes):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(nodes):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_finds_a_cycle_and_reads_local_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert cycle_in(graph, set(graph)) == ["a", "b", "c", "a"]
    assert cycle_in(graph, {"a", "b", "d"}) is None
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from flmm.build import x\n    import toyworld.scenes\n"
        "from . import heads\nfrom .lmm import y\nfrom .. import pipeline\n"
    )
    found = imports_of(source, package="flmm")
    assert {"flmm.build", "flmm.build.x", "toyworld.scenes"} <= found
    assert {"flmm.heads", "flmm.lmm", "flmm.lmm.y", "pipeline"} <= found


def test_flmm_has_no_import_cycle():
    graph = module_graph()
    # ``flmm/__init__`` only re-exports, and every ``flmm.x`` (or ``from flmm import x``) runs it
    # first: counted as a node, it would close a cycle through each re-export.
    flmm = {m for m in graph if m.startswith("flmm.")}
    assert len(flmm) > 10
    assert cycle_in(graph, flmm) is None


def test_flmm_and_pipeline_do_not_import_the_toy_world():
    for path in [*ROOT.glob("flmm/*.py"), *ROOT.glob("pipeline/*.py")]:
        toy = sorted(m for m in imports_of(path) if m.split(".")[0] == "toyworld")
        assert not toy, f"{path.relative_to(ROOT)} imports {toy}"


def test_flmm_imports_neither_ray_nor_pyarrow_nor_the_pipeline():
    for path in ROOT.glob("flmm/*.py"):
        banned = {"ray", "pyarrow", "pipeline", "schemas"}
        hits = sorted(m for m in imports_of(path) if m.split(".")[0] in banned)
        assert not hits, f"{path.relative_to(ROOT)} imports {hits}"


def test_the_annotate_jobs_driver_imports_no_model_code():
    """The driver describes the model and plans the stages; the actors build it. Model libraries
    imported by the driver cost seconds before Ray can start (bench/NOTES.md), so a fresh
    interpreter that parses the job's flags and builds its config must not have them."""
    code = (
        "import sys, jobs.annotate as job\n"
        "config = job.config_of(job.parse_args(['--input', 'x.tar', '--cot']))\n"
        "import pipeline.annotate as run\n"
        "assert run.ModelStage.__module__ == 'pipeline.annotate'\n"
        "heavy = ('transformers', 'segment_anything', 'torchvision', 'flmm.build', 'flmm.lmm',\n"
        "         'pipeline.grounding')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True)  # fmt: skip
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
