"""Refused starts: one message on the refused process's own stderr, a documented exit status, and
nothing changed in the run directory; every setting that changes training is compared at restart,
whichever config path sets it."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import spinlab.run
from spinlab.config import check_config, check_restart, redact
from spinlab.errors import EXIT_BUSY, EXIT_REFUSED, UserError
from tests import forked
from tests.conftest import REFERENCE, ROOT, compose_cfg
from tests.test_reliability import subprocess_env

COMMAND = REFERENCE


@pytest.fixture(scope="module")
def finished(reference_run, tmp_path_factory):
    """A finished two-round run, with the record a command-line start leaves (.hydra/, train.log)."""
    root = tmp_path_factory.mktemp("finished") / "run"
    shutil.copytree(reference_run, root)
    (root / ".hydra").mkdir()
    (root / ".hydra" / "config.yaml").write_text("lam: 0.1\nloss:\n  _target_: spinlab.losses.logistic\n")
    (root / ".hydra" / "overrides.yaml").write_text("- debug=fast\n")
    (root / "train.log").write_text("[spinlab][INFO] - round 1 done\n")
    return root


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def start(run_dir: Path, *overrides: str, fresh=False, **env) -> subprocess.CompletedProcess:
    """`python train.py ...`, forked from this process (tests/forked.py), or a fresh interpreter."""
    command = [sys.executable, str(ROOT / "train.py"), *COMMAND, *overrides, f"hydra.run.dir={run_dir}"]
    return (subprocess.run if fresh else forked.run)(
        command, capture_output=True, text=True, timeout=300, env={**subprocess_env(), **env}, cwd=ROOT
    )


def test_a_changed_setting_is_refused_with_status_2_one_message_and_nothing_changed(finished, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(finished, root)
    before = snapshot(root)
    # A fresh interpreter: nothing it prints while importing comes before the refusal.
    out = start(root, "rounds=3", "lam=0.5", "loss=hinge", fresh=True)
    assert out.returncode == EXIT_REFUSED, out.stderr[-3000:]
    assert out.stderr.startswith("refused: this run directory holds a run started with other settings")
    assert "lam: 0.1 when the run was started, 0.5 now" in out.stderr
    assert "Traceback" not in out.stderr and "HYDRA_FULL_ERROR" not in out.stderr
    assert snapshot(root) == before  # no .hydra/ rewrite, no line in train.log, no run_config.yaml


def test_hydra_full_error_keeps_the_traceback_of_a_refusal(finished, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(finished, root)
    out = start(root, "callbacks.self_play.lam=0.5", HYDRA_FULL_ERROR="1")
    assert out.returncode == EXIT_REFUSED
    assert "Traceback (most recent call last)" in out.stderr
    assert "callbacks.self_play.lam: 0.1 when the run was started, 0.5 now" in out.stderr


def test_a_busy_run_directory_is_refused_with_status_3_and_nothing_changed(finished, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(finished, root)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from spinlab.rundir import RunDir, claim; "
         "claim(RunDir(sys.argv[1])); print('held', flush=True); time.sleep(120)", str(root)],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=ROOT,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(root)
        out = start(root, "rounds=3")
        assert out.returncode == EXIT_BUSY, out.stderr[-3000:]
        assert out.stderr.startswith(f"refused: {root} is in use by another run (host ")
        assert f"PID {holder.pid}" in out.stderr and "Traceback" not in out.stderr
        assert snapshot(root) == before
    finally:
        holder.kill()
        holder.wait()


def test_an_accepted_start_writes_the_hydra_record_and_the_log(finished, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(finished, root)
    out = start(root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert OmegaConf.load(root / ".hydra" / "config.yaml").lam == 0.1
    assert "debug=fast" in OmegaConf.load(root / ".hydra" / "overrides.yaml")
    assert OmegaConf.load(root / ".hydra" / "hydra.yaml").hydra.run.dir == str(root)
    assert "all 2 rounds of" in (root / "train.log").read_text()


def test_a_directory_holding_other_files_is_refused_and_keeps_them(tmp_path):
    """The reproduction of issue 28: a run must never delete what it did not write."""
    root = tmp_path / "mydir"
    (root / "project" / "backup.old").mkdir(parents=True)
    (root / "project" / "backup.old" / "thesis.tex").write_text("x\n")
    (root / ".draft.tmp").touch()
    before = snapshot(root)
    out = start(root, "~eval", "rounds=1")
    assert out.returncode == EXIT_REFUSED, out.stderr[-3000:]
    assert out.stderr.startswith(
        f"refused: {root} is not empty (.draft.tmp, project) and holds no spinlab run"
    )
    assert "allow_foreign_run_dir=true" in out.stderr and len(out.stderr.splitlines()) == 1
    assert snapshot(root) == before and sorted(p.name for p in root.iterdir()) == [".draft.tmp", "project"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model._target_=tests.helpers.broken_model", "a bug inside model loading"),
        ("model._target_=tests.helpers.broken_chat_template", "a bug inside the tokenizer's chat templating"),
        ("data.source._target_=tests.helpers.BrokenSource", "a bug inside the data source, reading train"),
    ],
)
def test_a_bug_while_loading_the_model_or_data_is_not_a_refusal(tmp_path, override, message):
    # Raised inside the start checks, where the expected errors (spinlab.errors) are refusals: a
    # RuntimeError of any other code is a defect, and main lets it reach Hydra with its traceback
    # (in a constructor, inside Hydra's InstantiationException naming the node).
    with pytest.raises(Exception, match=message) as err:
        spinlab.run.run(compose_cfg([*COMMAND, override], tmp_path / "run"))
    assert not isinstance(err.value, UserError)
    assert not (tmp_path / "run" / "run_config.yaml").exists()  # raised before the start was accepted


def test_an_unexpected_error_keeps_its_traceback_and_status_1(tmp_path):
    # A defect, not bad input: Hydra's report of an error it did not expect either: exit status 1,
    # its short traceback and the hint; the whole traceback with HYDRA_FULL_ERROR=1. A loss whose
    # code fails (after the start), and a tokenizer whose chat templating fails (inside the start
    # checks, which call it on every prompt).
    (tmp_path / "broken_loss.py").write_text(
        "def loss(margin):\n    raise ZeroDivisionError('inside the loss')\n"
    )
    path = f"{tmp_path}:{subprocess_env()['PYTHONPATH']}"
    out = start(tmp_path / "run", "loss._target_=broken_loss.loss", PYTHONPATH=path)
    assert out.returncode == 1 and "refused:" not in out.stderr
    assert "ZeroDivisionError: inside the loss" in out.stderr
    assert "Error executing job" in out.stderr and "HYDRA_FULL_ERROR=1" in out.stderr
    full = start(tmp_path / "run2", "loss._target_=broken_loss.loss", PYTHONPATH=path, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback (most recent call last)" in full.stderr
    root = tmp_path / "run3"
    bug = start(root, "model._target_=tests.helpers.broken_chat_template", HYDRA_FULL_ERROR="1")
    assert bug.returncode == 1 and "refused:" not in bug.stderr, bug.stderr[-3000:]
    assert "Traceback (most recent call last)" in bug.stderr
    assert "RuntimeError: a bug inside the tokenizer's chat templating" in bug.stderr
    assert "in apply_chat_template" in bug.stderr  # where it was raised


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model=hf", "model.name_or_path=no/such-model"],
            "cannot load model 'no/such-model' (Hugging Face hub id): HF_HUB_OFFLINE=1 is set",
        ),
        (["model=hf", "model.name_or_path=MISSING_DIR"], "cannot load model"),
        (
            ["eval=lm_eval", "eval.benchmarks.tasks=[arc_challenge]"],
            "lm-eval task 'arc_challenge': its data is not in the local datasets cache",
        ),
    ],
    ids=["hub id offline", "missing directory", "lm-eval task offline"],
)
def test_a_model_or_benchmark_that_cannot_load_is_refused_and_leaves_no_run_directory(
    tmp_path, overrides, message
):
    if "eval=lm_eval" in overrides:
        pytest.importorskip("lm_eval")
    overrides = [o.replace("MISSING_DIR", str(tmp_path / "no_such_model")) for o in overrides]
    root = tmp_path / "outputs" / "run"
    out = start(root, *overrides)
    assert out.returncode == EXIT_REFUSED, out.stderr[-3000:]
    assert out.stderr.startswith("refused: ") and message in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "HYDRA_FULL_ERROR" not in out.stderr
    assert not root.exists()  # Hydra made it for this start; the refusal takes it away again


@pytest.mark.parametrize(
    "override, message",
    [
        ("lam=nan", r"lam must be a finite number in \(0, 1e\+06\]"),
        ("lam=inf", r"lam must be a finite number in \(0, 1e\+06\]"),
        ("lam=-1", r"lam must be a finite number in \(0, 1e\+06\]"),
        (
            "lam=1e30",
            r"got 1e\+30 \(larger λ make the margin and the gradients, squared by the optimizer, overflow",
        ),
        ("round_overrides.1.lam=1e30", r"round_overrides.1.lam must be a finite number in \(0, 1e\+06\]"),
        ("round_overrides.1.lr=nan", r"round_overrides.1.lr must be a finite number >= 0"),
        ("seed=-1", r"seed must be an int in \[0, 2\*\*32 - 1\]"),
        ("seed=4294967296", r"seed must be an int in \[0, 2\*\*32 - 1\]"),
        ("data.seed=-3", r"data.seed must be an int in \[0, 2\*\*32 - 1\].*got -3"),
        ("optimizer.lr=-1e-5", r"optimizer.lr must be a finite number >= 0"),
        ("warmup_ratio=1.5", r"warmup_ratio must be in \[0, 1\]"),
        ("warmup_ratio=-0.1", r"warmup_ratio must be in \[0, 1\]"),
        ("data.batch_size=0", "data.batch_size must be an int >= 1"),
        ("data.num_prompts=0", "data.num_prompts must be an int >= 1"),
        ("data.mix_previous_rounds=-1", "data.mix_previous_rounds must be an int >= 0"),
        ("data.mix_previous_rounds=1.5", "data.mix_previous_rounds must be an int >= 0"),
        ("epochs_per_round=0", "epochs_per_round must be >= 1"),
        (
            "data.max_prompt_length=64 data.max_length=64",
            r"data.max_prompt_length \(64\) must be below data.max_length \(64\)",
        ),
        ("objective=sft opponent=model", "objective SFT uses no opponent log-probs: leave opponent=cached"),
        (
            "objective=tspin opponent=model",
            "objective TSPIN uses no opponent log-probs: leave opponent=cached",
        ),
        ("trainer=fsdp_cpu model.lora={r:4}", r"model.lora with a sharded trainer \(fsdp, fsdp_cpu\) is not"),
        (
            "module.liger_kernels=true",
            r"module.liger_kernels=true needs liger-kernel, which is not installed",
        ),
    ],
)
def test_impossible_values_are_refused_at_start(override, message):
    with pytest.raises(UserError, match=message):
        check_config(compose_cfg(["debug=fast", *override.split()]))


@pytest.mark.parametrize(
    "overrides, said",
    [
        (["optimizer.lr=0"], "rounds 0, 1 train with lr 0 (optimizer.lr=0)"),
        (["round_overrides.1.lr=0"], "round 1 trains with lr 0 (optimizer.lr=0.001, round_overrides)"),
    ],
)
def test_a_round_with_lr_0_is_said_at_start(overrides, said, caplog):
    with caplog.at_level("WARNING", logger="spinlab.config"):
        check_config(compose_cfg(["debug=fast", *overrides]))
    assert said in caplog.text and "the policy stays as the round began" in caplog.text


# -- every setting that changes training is compared, whichever path sets it -------------------

# Keys under these nodes that a restart may change: where files go, what is shown, and the keys
# checked as `rounds` and `round_overrides` are.
MAY_CHANGE = {
    "callbacks.progress.refresh_rate",
    "callbacks.progress._target_",
    "callbacks.checkpoint.dirpath",
    "callbacks.self_play.run_dir",
    "callbacks.self_play.num_samples",
    "callbacks.self_play.rounds",
}


def leaves(node, prefix=""):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return value + 1
    if isinstance(value, str):
        return value + "_changed"
    return 7  # None, {} or []


def with_leaf(node: dict, key: str, value) -> dict:
    node = OmegaConf.to_container(OmegaConf.create(node))
    *path, last = key.split(".")
    target = node
    for part in path:
        target = target[part]
    target[last] = value
    return node


@pytest.mark.parametrize("group", ["callbacks", "module", "objective", "generation", "data"])
def test_every_node_of_a_group_is_compared_at_restart(group):
    before = redact(OmegaConf.to_container(compose_cfg(["debug=fast"], Path("/run")), resolve=True))
    keys = [k for k, _ in leaves(before[group], f"{group}.")]
    assert len(keys) >= 3
    for key, value in leaves(before[group], f"{group}."):
        now = with_leaf(before, key, changed(value))
        if key in MAY_CHANGE or key.startswith(
            ("callbacks.self_play.round_overrides", "callbacks.self_play.generator")
        ):
            check_restart(before, now, finished=1, started=2)
            continue
        with pytest.raises(ValueError, match=rf"\n  {key}: "):
            check_restart(before, now, finished=1, started=2)


def test_a_top_level_change_is_named_once_where_it_was_set():
    before = redact(OmegaConf.to_container(compose_cfg(["debug=fast"], Path("/run")), resolve=True))
    now = redact(OmegaConf.to_container(compose_cfg(["debug=fast", "lam=0.5"], Path("/run")), resolve=True))
    with pytest.raises(ValueError) as err:
        check_restart(before, now, finished=1, started=2)
    assert "\n  lam: 0.1 when the run was started, 0.5 now" in str(err.value)
    assert "callbacks.self_play.lam" not in str(err.value)
