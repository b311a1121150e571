"""Every command of the README's and the docs pages' `bash` blocks runs as written (slow; CI runs it).

The commands are taken from the fenced bash blocks of README.md and of the pages of docs/, so a
command added there is tested without touching this file; a command that is not to run here is
named in NOT_RUN with the reason, and a command neither run nor named fails the quick test. They
run in reading order, as a user would type them: the README, then the pages in the order of
mkdocs.yml's nav (a later one may use what an earlier one made: a saved policy, a sweep), in a
fresh copy of the repository's runnable part (train.py, conf/) so that what they write (outputs/,
multirun/, sft.jsonl, reports/) lands there; nothing is added to a command, except `debug=fast`
(the documented size override) to a `cluster:` command that needs only time, whose sweep is also
cut to the first two values of each swept key (`toy_size`).
A `cluster:` command that needs what this machine lacks (GPUs, the hub, Slurm) must stop with
the message the README documents for it; so must a `python -m spinlab.push` that is not a dry run
(the session is offline). A `generation=vllm` command runs with `.venv-vllm/` beside the copy, as
after `make vllm` (skipped, saying why, without SPINLAB_VLLM_PYTHON).

A `python train.py` run must end with its summary table (one row per round), a multirun with
the sweep report; any other command must succeed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from spinlab.harness import shipped_tasks
from spinlab.models import embedded_smollm2_dir
from tests import forked
from tests.conftest import ROOT, compose_cfg

README = ROOT / "README.md"
DOCS = ROOT / "docs"


def sources() -> list[Path]:
    """README.md, then the docs pages in the order of mkdocs.yml's nav: the order commands run in."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [README, *(DOCS / page for item in nav for page in item.values())]


# Commands of the README and the docs that do not run here (by their code, comment left out), and why.
NOT_RUN = {
    "make demo": "`make setup`, then `python train.py experiment=demo`, the quick start's first command",
    "make test": "the suite this test is part of",
    "make vllm": "`make test` builds the same .venv-vllm/ first (SPINLAB_VLLM_PYTHON names it)",
    "make lint": "tests/test_tooling.py runs what it runs: the pre-commit hooks on every file",
    "make format": "it rewrites the files; `make lint` checks the same rules",
    "make docs": "tests/test_docs.py builds the same pages with `mkdocs build --strict`",
    ".venv/bin/pre-commit install": "it installs a git hook into the clone",
    ".venv/bin/python benchmarks/round_footprint.py": "tests/test_benchmarks.py runs it (with --json)",
    '.venv/bin/python -m pytest -m "not slow"': "the quick part of the suite this test is part of",
    "srun python train.py trainer=fsdp model=... hydra.run.dir=$SCRATCH/spin/run1": (
        "a line of an sbatch script: srun needs Slurm, and `model=...` is the user's to fill in"
    ),
}
SIZE_OVERRIDE = "debug=fast"
MESSAGES = {  # what a cluster command stops with where a need is missing; the README documents each
    "gpu": "torch sees no CUDA device",
    "hub": "HF_HUB_OFFLINE=1 is set and the model is not in the local cache",
    "slurm": 'Could not detect "srun", are you indeed on a slurm cluster?',
    "task data": "its data is not in the local datasets cache and the hub is offline",
    "hub push": "refused: the hub is offline (HF_HUB_OFFLINE=1 is set)",
}
TABLE = re.compile(
    r"^(?:SPIN|T-SPIN|SFT) rounds .*\n *round +loss .*\n((?:start .*\n)?(?: +\d+ .*\n)+)run directory: .+\n*\Z",
    re.MULTILINE,
)


def section_commands(text: str, titles=None) -> list[str]:
    """Commands of the fenced bash blocks under the given `## ` headings (None: the whole text),
    continuation lines joined."""
    commands = []
    sections = re.split(r"^## ", text, flags=re.MULTILINE)
    for number, section in enumerate(sections):
        if titles is not None and (number == 0 or not section.startswith(titles)):
            continue
        for block in re.findall(r"^```bash\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL):
            pending = ""
            for line in block.splitlines():
                pending += line + "\n"
                if not line.endswith("\\"):
                    if pending.strip() and not pending.lstrip().startswith("#"):
                        commands.append(pending.strip())
                    pending = ""
    return commands


def split_comment(command: str) -> tuple[str, str]:
    """(code, comment) of a shell command: the comment starts at a `#` after blank space, outside quotes."""
    quote = None
    for i, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip(), command[i + 1 :].strip()
    return command, ""


def shell_words(code: str) -> list[str]:
    return shlex.split(code.replace("\\\n", " "))


def is_multirun(words: list[str]) -> bool:
    return "-m" in words or "--multirun" in words


def train_overrides(words: list[str]) -> list[str] | None:
    """A `python train.py` command's overrides, each sweep's first value; None for other commands."""
    if words[:2] != ["python", "train.py"]:
        return None
    multirun = is_multirun(words)
    overrides = [w for w in words[2:] if w not in ("-m", "--multirun") and not w.startswith("hydra")]
    return [o.split(",")[0] if multirun and "=" in o else o for o in overrides]


def toy_size(words: list[str]) -> list[str]:
    """A `cluster:` command at toy size: `debug=fast` appended, each sweep cut to its first two values."""
    multirun = is_multirun(words)

    def cut(word: str) -> str:
        key, _, value = word.partition("=")
        if not multirun or not value or key.startswith("hydra") or "," not in value:
            return word
        return f"{key}={','.join(value.split(',')[:2])}"

    return [cut(w) for w in words] + [SIZE_OVERRIDE]


def missing_need(words: list[str], cfg, cwd: Path) -> str | None:
    """What the command needs that this machine lacks, in the order train.py meets it."""
    if "hydra/launcher=slurm" in words and not shutil.which("srun"):
        return "slurm"
    if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
        return "gpu"
    if cfg.model._target_ == "spinlab.models.pretrained" and not (cwd / cfg.model.name_or_path).exists():
        return "hub"
    tasks = ((cfg.get("eval") or {}).get("benchmarks") or {}).get("tasks") or []
    if any(task not in shipped_tasks() for task in tasks):  # lm-eval's own tasks: data from the hub
        return "task data"
    return None


def all_commands() -> list[tuple[str, str]]:
    """(file, command) of every bash block of the README and the docs pages, in reading order."""
    return [(str(p.relative_to(ROOT)), c) for p in sources() for c in section_commands(p.read_text())]


ALL = all_commands()
RUN = [(where, c) for where, c in ALL if split_comment(c)[0] not in NOT_RUN]
COMMANDS = [c for _, c in RUN]


def test_the_sections_hold_the_commands_a_newcomer_runs():
    assert any("experiment=demo" in c for c in COMMANDS)  # what `make demo` runs
    assert any(" -m " in c for c in COMMANDS) and any("cluster:" in c for c in COMMANDS)
    pushes = [c for c in COMMANDS if "spinlab.push" in c]
    assert any("--dry-run" in c for c in pushes) and any("cluster:" in c for c in pushes)
    assert any("generation=vllm" in c for c in COMMANDS)
    assert {where for where, _ in RUN} >= {"README.md", "docs/sweeps.md", "docs/evaluation.md"}
    text = "## Quick start\n```bash\na  # x\n# only a comment\nb \\\n  c # cluster: y\n```\n## Other\n```bash\nd\n```\n"
    assert section_commands(text, ("Quick start",)) == ["a  # x", "b \\\n  c # cluster: y"]
    assert section_commands("```bash\nz\n```\n" + text) == ["z", "a  # x", "b \\\n  c # cluster: y", "d"]
    assert split_comment("printf '%s # not a comment' > f  # a comment") == (
        "printf '%s # not a comment' > f",
        "a comment",
    )
    python, home = sys.executable, {"HOME": "/home/u"}
    assert argv("python train.py a=$HOME/m b=${HOME} lam=0.1,1 x=[1,2]", home) == [
        *[python, "train.py", "a=/home/u/m", "b=/home/u", "lam=0.1,1", "x=[1,2]"]
    ]
    assert argv("python train.py a={x:5}", home) == [python, "train.py", "a={x:5}"]  # no brace expansion
    for shell in (
        "python train.py > log",
        "python train.py a={1,2}",
        "python train.py a={0..3}",
        "python train.py a=$UNSET",
        "python -m x",
    ):
        assert argv(shell, home) == ["bash", "-c", shell]
    assert argv("python train.py a=$HOME", {"HOME": "/my home"})[0] == "bash"
    for message in MESSAGES.values():
        assert message in README.read_text(), message
    assert f"with `{SIZE_OVERRIDE}` appended" in README.read_text()
    assert toy_size(shell_words("python train.py -m loss=a,b,c lam=1,2,3 rounds=3 hydra.x=1,2,3")) == [
        *["python", "train.py", "-m", "loss=a,b", "lam=1,2", "rounds=3", "hydra.x=1,2,3"],
        SIZE_OVERRIDE,
    ]
    assert toy_size(["python", "train.py", "seed=1,2,3"]) == [
        "python",
        "train.py",
        "seed=1,2,3",
        SIZE_OVERRIDE,
    ]


def test_every_command_of_the_docs_runs_here_or_says_why_not():
    """A command added to a bash block runs in `test_readme_command`, or NOT_RUN names it."""
    codes = {split_comment(c)[0] for _, c in ALL}
    assert not set(NOT_RUN) - codes, f"NOT_RUN names commands no page holds: {sorted(set(NOT_RUN) - codes)}"
    assert len(RUN) + sum(split_comment(c)[0] in NOT_RUN for _, c in ALL) == len(ALL)


# What bash would read otherwise than shlex: operators, expansions, globs, and a brace expansion
# (a brace group with a comma or `..`; `{gsm8k:5}` stays as typed).
SHELL_SYNTAX = set("|&;<>()$`*?~")
BRACE_EXPANSION = re.compile(r"\{[^{}]*(?:,|\.\.)[^{}]*\}")
VARIABLE = re.compile(r"\$(?:([A-Za-z_]\w*)|\{([A-Za-z_]\w*)\})")


def expand(code: str, env: dict) -> str:
    """`$NAME` and `${NAME}` replaced as bash would, where the value is set and one plain word."""

    def value(match):
        text = env.get(match.group(1) or match.group(2)) or ""
        plain = text and not (set(text) & SHELL_SYNTAX) and shlex.split(text) == [text]
        return text if plain else match.group(0)

    return VARIABLE.sub(value, code)


def plain_python(code: str) -> bool:
    """A `python script.py args` that bash would only split into words (after `expand`): run as
    bash would run it, the script in this interpreter (`python` on the session's PATH is it), but
    forked from this process (tests/forked.py) instead of importing torch again."""
    words = shell_words(code)
    plain = not (SHELL_SYNTAX & set(code) or BRACE_EXPANSION.search(code))
    return len(words) >= 2 and words[0] == "python" and words[1].endswith(".py") and plain


def argv(code: str, env: dict) -> list[str]:
    expanded = expand(code, env)
    if plain_python(expanded):
        return [sys.executable, *shell_words(expanded)[1:]]
    return ["bash", "-c", code]


def needs_vllm(words: list[str]) -> bool:
    return "generation=vllm" in words


def copy_runnable_part(cwd: Path) -> None:
    """What a user runs commands in: train.py and conf/ (src/ comes from the installed package)."""
    shutil.copy(ROOT / "train.py", cwd / "train.py")
    shutil.copytree(ROOT / "conf", cwd / "conf")


class Session:
    """A fresh copy of the repository's runnable part, where the README's commands run in order."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        copy_runnable_part(cwd)
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # `python` is ours
            # Submitit jobs are fresh processes that unpickle train.py's task: they need it and src/.
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(cwd), str(ROOT / "src"), os.environ.get("PYTHONPATH")])
            ),
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "disabled",
        }
        self.results: dict[int, tuple[subprocess.CompletedProcess, float, str]] = {}

    def run(self, index: int) -> tuple[subprocess.CompletedProcess, float, str]:
        if index not in self.results:
            command = COMMANDS[index]
            code, comment = split_comment(command)
            words = shell_words(code)
            how = "as written"
            if needs_vllm(words) and not (self.cwd / ".venv-vllm").exists():
                # The interpreter itself: the engines start as a user's do (skips, saying why,
                # without the venv).
                from tests.test_vllm import fresh_vllm_python

                (self.cwd / ".venv-vllm").symlink_to(Path(fresh_vllm_python()).parent.parent)
            if "smollm2-135m-instruct" in code:
                # The directory `make demo` converts on a fresh machine: under pytest-xdist the
                # demo runs in another worker (and has converted it by now); converted here if not.
                embedded_smollm2_dir()
            overrides = train_overrides(words)
            if overrides is not None and comment.startswith("cluster:"):
                need = missing_need(words, compose_cfg(overrides), self.cwd)
                if need is None:
                    code, how = shlex.join(toy_size(words)), f"with {SIZE_OVERRIDE}"
                else:
                    how = f"needs {need}"
            elif words[:3] == ["python", "-m", "spinlab.push"] and "--dry-run" not in words:
                assert comment.startswith("cluster:"), f"a push reaches the hub: mark it cluster: ({command})"
                how = "needs hub push"
            start = time.perf_counter()
            command_line = argv(code, self.env)
            options = dict(cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=1800)
            if command_line[0] == sys.executable:  # a run's other ranks start as the user's would
                result = forked.run(command_line, fresh_ranks=True, **options)
            else:
                result = subprocess.run(command_line, **options)
            self.results[index] = (result, time.perf_counter() - start, how)
        return self.results[index]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    session = Session(tmp_path_factory.mktemp("readme"))
    yield session
    print("\nREADME and docs commands, wall time (s):")
    for index in sorted(session.results):
        _, seconds, how = session.results[index]
        print(f"{seconds:8.1f}  {RUN[index][0]}: {COMMANDS[index]}  [{how}]")


DEMO = next(i for i, c in enumerate(COMMANDS) if "experiment=demo" in c)  # what `make demo` runs


class TestDemo:
    """The demo's command, the longest: under pytest-xdist a unit of its own (tests/conftest.py),
    run in its own copy while the other commands run in order in another worker."""

    @pytest.mark.slow
    def test_readme_command(self, session):
        check_command(session, DEMO)


@pytest.mark.slow
@pytest.mark.parametrize(
    "index",
    [i for i in range(len(COMMANDS)) if i != DEMO],
    ids=[f"{where}: {split_comment(c)[0][:80]}" for i, (where, c) in enumerate(RUN) if i != DEMO],
)
def test_readme_command(session, index):
    check_command(session, index)


def check_command(session, index):
    result, _, how = session.run(index)
    out = result.stdout + result.stderr
    tail = (
        f"{COMMANDS[index]}\n--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
    )
    if how.startswith("needs "):
        assert result.returncode != 0, tail
        assert MESSAGES[how.removeprefix("needs ")] in out, tail
        return
    words = shell_words(split_comment(COMMANDS[index])[0])
    if needs_vllm(words) and result.returncode != 0:
        from tests.test_vllm import cpu_permitting

        with cpu_permitting():  # skips, saying why, on a CPU vLLM's build cannot run on
            raise RuntimeError(tail)
    assert result.returncode == 0, tail
    overrides = train_overrides(words)
    if overrides is None:
        return
    if is_multirun(words):
        # The sweep's last word, in whichever stream Hydra logs to: its report, written.
        ends = [re.search(r"sweep report: (\S+)\s*\Z", stream) for stream in (result.stdout, result.stderr)]
        report = next((m.group(1) for m in ends if m), None)
        assert report and (session.cwd / report).is_file(), tail
        sweep = (session.cwd / report).parent
        if "hydra/launcher=submitit_local" in words:  # the jobs really went through submitit, each finished
            assert list((sweep / ".submitit").iterdir()), tail
            for loss in ("logistic", "hinge"):
                job = sweep / f"debug=fast,loss={loss}"
                summary = json.loads((job / "summary.json").read_text())
                assert [s["round"] for s in summary] == [0, 1], tail
                assert (job / ".hydra" / "config.yaml").is_file(), tail
        return
    table = TABLE.search(result.stdout)
    assert table, tail
    if how == "as written":
        rounds = [line for line in table.group(1).splitlines() if not line.startswith("start")]
        assert len(rounds) == compose_cfg(overrides).rounds, tail
    if needs_vllm(words):  # the rows came from the engine
        run_dir = session.cwd / re.search(r"^run directory: (.+)$", result.stdout, re.MULTILINE).group(1)
        stats = json.loads((run_dir / "rounds" / "round_000" / "stats.json").read_text())["generation"]
        assert stats["backend"] == "vllm" and stats["responses"] == 16, stats


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if train_overrides(shell_words(split_comment(c)[0])) is not None]
)
def test_readme_train_command_passes_the_start_checks(command, tmp_path, monkeypatch):
    """The quick part: each train.py command composes and passes check_config, or a cluster
    command stops there with its documented message (the slow test above runs them)."""
    from spinlab.config import check_config
    from spinlab.errors import NotFoundError

    code, comment = split_comment(command)
    words = shell_words(code)
    if needs_vllm(words):  # its generation.python is relative to the copy, as after `make vllm`
        from tests.test_vllm import fresh_vllm_python

        (tmp_path / ".venv-vllm").symlink_to(Path(fresh_vllm_python()).parent.parent)
        monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(train_overrides(words))
    OmegaConf.resolve(cfg)
    no_gpu = cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available()
    if no_gpu and comment.startswith("cluster:"):
        with pytest.raises(NotFoundError, match=MESSAGES["gpu"]):
            check_config(cfg)
    else:
        check_config(cfg)
