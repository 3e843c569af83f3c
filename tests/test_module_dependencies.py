"""The house rules on imports, read from the source (AST), lazy imports inside functions included.

The library never imports the command (`guardrail.cli`), its modules import each other without cycles, and
`import guardrail` exports the documented names without loading torch, diffusers, open_clip or faiss.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import guardrail

PACKAGE = Path(guardrail.__file__).resolve().parent
CLI_MODULES = {"cli"}  # `guardrail/cli.py`, or every module of a `guardrail/cli/` package


def module_parts(path: Path) -> tuple[list[str], bool]:
    """(`["cli", "verbs"]`, False) for `guardrail/cli/verbs.py`; (`["cli"]`, True) for `guardrail/cli/__init__.py`."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return (parts[:-1] if is_package else parts), is_package


def imported_modules(source: str, module: list[str], is_package: bool = False) -> set[str]:
    """The guardrail modules that `source` (the module `module`) imports anywhere in its body, as dotted names
    relative to the package: relative and absolute imports, at the top or inside functions."""
    package = module if is_package else module[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name[len("guardrail."):] for alias in node.names if alias.name.startswith("guardrail."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and (node.module == "guardrail" or node.module.startswith("guardrail.")):
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                found.add(".".join(target))
            # `from . import cli` / `from guardrail import demo`: the imported names may be modules themselves
            found.update(".".join([*target, alias.name]) for alias in node.names)
    return found


def library_graph() -> dict[str, set[str]]:
    """Each guardrail module -> the guardrail modules it imports (imported names that are not modules are dropped).

    The package's own `__init__` is the key `"__init__"`.
    """
    sources = {}
    for path in PACKAGE.rglob("*.py"):
        parts, is_package = module_parts(path)
        sources[".".join(parts) or "__init__"] = (path.read_text(encoding="utf-8"), parts, is_package)
    return {
        name: {dep for dep in imported_modules(*source) if dep in sources and dep != name}
        for name, source in sources.items()
    }


def is_cli(module: str) -> bool:
    return module.split(".")[0] in CLI_MODULES


def test_the_scanner_sees_every_spelling_of_an_import():
    """The rules below are only as good as this scanner: it must catch each way of importing the CLI."""
    source = (
        "from .cli import main\n"
        "import guardrail.build\n"
        "def later():\n"
        "    from . import demo\n"
        "    from guardrail import calibration\n"
    )
    assert {"cli", "build", "demo", "calibration"} <= imported_modules(source, ["scores"])
    assert "cli" in imported_modules("from ..cli import main\n", ["sub", "module"])
    assert "cli.verbs" in imported_modules("from .verbs import run\n", ["cli"], is_package=True)


def test_no_library_module_imports_the_cli():
    offenders = {name: sorted(filter(is_cli, deps)) for name, deps in library_graph().items() if not is_cli(name)}
    offenders = {name: deps for name, deps in offenders.items() if deps}
    assert not offenders, f"library modules import the command (argparse code belongs in guardrail.cli): {offenders}"


def test_library_modules_import_each_other_without_cycles():
    graph = {name: deps for name, deps in library_graph().items() if name != "__init__"}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == "open":
                cycle = trail[trail.index(dep):] + [dep] if dep in trail else [name, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*trail, dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_demo_does_not_reach_into_calibration():
    """The demo shares the score summary through `guardrail.scores`, not by importing the calibration module."""
    assert "calibration" not in library_graph()["demo"]


def test_the_documented_names_are_exported_without_loading_heavy_libraries():
    code = (
        "import sys, guardrail\n"
        "from guardrail import calibrate, CalibrationResult, load_image, Blocklist, BlocklistIndex, Guard, Verdict, "
        "GuardedPipeline, GuardReport, Embedder, OpenCLIPEmbedder, build_blocklist, merge_blocklists, GuardrailError, "
        "BlocklistError, EmbedderMismatchError, ImageDecodeError\n"
        "import guardrail.calibration as module\n"
        "assert calibrate is module.calibrate and CalibrationResult is module.CalibrationResult\n"
        "assert callable(load_image)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'open_clip', 'faiss') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"import guardrail loaded {done.stdout.strip()}"
