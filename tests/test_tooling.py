"""The developer commands of docs/development.md (what `make lint` runs), as a fresh clone runs them."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_pre_commit_hooks_run_without_the_venv_on_path():
    """`.venv/bin/pre-commit run --all-files`, venv not activated: the hooks bring their own ruff
    and nbstripout (language: python), so none is looked up on PATH."""
    pre_commit = ROOT / ".venv" / "bin" / "pre-commit"
    if not pre_commit.exists():
        pytest.skip("no .venv/bin/pre-commit: run `make setup` first")
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT / ".venv"))
    )
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"PATH": path}
    out = subprocess.run(
        [str(pre_commit), "run", "--all-files", "--show-diff-on-failure"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    for hook in ("ruff check", "ruff format", "nbstripout"):
        assert any(
            line.startswith(hook) and line.endswith(("Passed", "(no files to check)Skipped"))
            for line in out.stdout.splitlines()
        ), (hook, out.stdout)
