"""The README's two commands are exactly what CI runs, and its quickstart names exist."""

from __future__ import annotations

import re
from pathlib import Path

import guardrail

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"<!-- ci:command-\d[^>]*-->\n```bash\n(.+?)\n```", readme)


def test_ci_runs_the_readme_install_demo_and_test_commands_verbatim():
    commands = readme_commands()
    assert len(commands) == 2 and "guardrail demo" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"{command!r} is not a line of .ci/run"


def test_every_name_the_readme_imports_from_guardrail_exists():
    readme = (ROOT / "README.md").read_text()
    for names in re.findall(r"from guardrail import ([\w, ]+)", readme):
        for name in names.split(","):
            assert hasattr(guardrail, name.strip()), name


def test_no_doc_or_example_names_the_retired_runwayml_repository():
    """`runwayml/stable-diffusion-v1-5` left the Hub in 2024; a copied command must name a repository that exists."""
    paths = [ROOT / "README.md", *(ROOT / "examples").rglob("*.py"), *(ROOT / "docs").rglob("*.md"),
             *(ROOT / "guardrail").rglob("*.py"), *(ROOT / "blocklists").rglob("*.md")]
    stale = [str(path.relative_to(ROOT)) for path in paths if "runwayml/" in path.read_text(encoding="utf-8")]
    assert not stale, f"use stable-diffusion-v1-5/stable-diffusion-v1-5 instead of runwayml/ in {stale}"
