"""Model and dataset cards of a run's rounds, and `spinlab.push` up to the huggingface_hub calls.

One in-process run of the tiny model (two rounds, the second with its own lr and the first
round's data mixed in) serves every test; nothing here reaches the network: HfApi's methods
and the Hub's card validation are replaced by recorders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import DatasetCard, HfApi, ModelCard, ModelCardData, RepoCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import validate_repo_id

import spinlab.run
from spinlab import push
from spinlab.cards import SMOLLM2, Publication, Run, model_card, start_model
from spinlab.rundir import read_jsonl
from tests.conftest import compose_cfg

RUN = [
    "debug=fast",
    "data.num_prompts=8",
    "eval.heldout_pairs=4",
    "eval.task_prompts=4",
    "round_overrides.1.lr=5e-4",
    "round_overrides.1.mix_previous_rounds=1",
]
# What a run directory holds that must never leave the machine.
PRIVATE = ("checkpoints/", "run.lock", "wandb_id", "run_config.yaml", ".hydra/", "train.log", "csv/")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("cards") / "run")


def make_run(root: Path) -> Path:
    def accepted():
        # What train.py's Hydra start writes once the start is accepted: the command's overrides.
        (root / ".hydra").mkdir(parents=True)
        (root / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*RUN, "hydra.run.dir=/secret/place"]))

    spinlab.run.run(compose_cfg(RUN, root), accepted)
    (root / "wandb_id").write_text("abc123\n")  # what logger=wandb leaves; must not be uploaded
    return root


def summary(root: Path) -> dict[int, dict]:
    return {s["round"]: s for s in json.loads((root / "summary.json").read_text())}


def settings(root: Path) -> dict:
    return yaml.safe_load((root / "run_config.yaml").read_text())


# -- the model card -------------------------------------------------------------------------------
def test_model_card_holds_the_rounds_settings_and_metrics(run_dir):
    config, rounds = settings(run_dir), summary(run_dir)
    for index, lr in ((0, 1e-3), (1, 5e-4)):
        card = ModelCard.load(run_dir / "hf" / f"round_{index:03d}" / "README.md")
        data = card.data
        assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
        assert {"spin", "self-play", "logistic-loss"} <= set(data.tags)
        assert "base_model" not in data.to_dict()  # the tiny model is built in code: no hub id to name
        assert "datasets" not in data.to_dict()  # built-in data, not published: no hub id either
        mine = data.spinlab
        assert (
            mine["round"] == index
            and mine["iteration"] == f"iter{index}"
            and mine["paper"] == "arXiv:2401.01335"
        )
        s = mine["settings"]
        assert s["lr"] == lr == rounds[index]["lr"] and s["lam"] == config["lam"] == rounds[index]["lam"]
        assert s["loss"] == "logistic" and s["objective"] == "SPIN" and s["optimizer"] == "RMSprop"
        assert s["epochs"] == config["epochs_per_round"] and s["seed"] == config["seed"]
        assert s["steps"] == rounds[index]["total_steps"] and s["pairs"] == rounds[index]["pairs"]
        assert s["mix_previous_rounds"] == index  # round_overrides.1.mix_previous_rounds=1
        assert s["generation"] == {k: v for k, v in config["generation"].items() if k != "_target_"}
        expected = {
            k: v
            for k, v in rounds[index].items()
            if k not in ("round", "lam", "lr", "start_step", "total_steps", "pairs")
        }
        assert mine["metrics"] == expected and "eval/heldout_margin" in expected
        assert mine["trained_on_rounds"] == list(range(index + 1))
        # model-index: the task accuracy, as the Hub's leaderboards read it
        name, results = model_index_to_eval_results(data.to_dict()["model-index"])
        assert name == f"tiny-llama-SPIN-iter{index}"
        assert [(r.metric_type, r.metric_value, r.dataset_split) for r in results] == [
            ("accuracy", rounds[index]["eval/task_accuracy"], "validation")
        ]
        text = card.text
        assert "arxiv.org/abs/2401.01335" in text and f"| lr | {lr:.4g} |" in text
        assert f'from_pretrained("hf/round_{index:03d}")' in text


def test_model_card_metadata_validates_as_the_hub_reads_it(run_dir):
    """Offline, what can be checked of the Hub's rules: the metadata parses into ModelCardData
    without errors (model-index included) and round-trips, and every id has a repo id's shape.
    The Hub's own validation runs in spinlab.push before any upload."""
    card = ModelCard.load(run_dir / "hf" / "round_001" / "README.md")
    again = ModelCardData(**card.data.to_dict())
    assert again.to_dict() == card.data.to_dict()
    published = model_card(Run(run_dir), 1, Publication("me/tiny-spin", "me/tiny-spin", base_model="me/base"))
    data = ModelCard(str(published)).data
    for repo in [data.base_model, *data.datasets]:
        validate_repo_id(repo)
    assert data.datasets == ["me/tiny-spin-iter0", "me/tiny-spin-iter1"]  # round 1 mixed round 0's data
    assert data.base_model_relation == "finetune"


def test_cards_hold_no_local_path_and_are_the_same_bytes_when_made_again(run_dir, tmp_path):
    copy = tmp_path / "older_run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    cards = [p.relative_to(copy) for p in sorted(copy.rglob("README.md"))]
    assert [str(p) for p in cards] == [
        "hf/round_000/README.md",
        "hf/round_001/README.md",
        "rounds/round_000/README.md",
        "rounds/round_001/README.md",
    ]
    before = {p: (copy / p).read_bytes() for p in cards}
    for text in before.values():
        assert str(run_dir) not in text.decode() and "/secret/place" not in text.decode()
        assert str(Path.home()) not in text.decode()
    # A run made before cards existed: spinlab.push --dry-run writes them, the same bytes.
    for p in cards:
        (copy / p).unlink()
    assert push.main([str(copy), "--repo", "me/tiny-spin", "--dry-run"]) == 0
    assert {p: (copy / p).read_bytes() for p in cards} == before
    # The reproduce line: the overrides, quoted for a shell, without where the run went.
    text = before[Path("hf/round_001/README.md")].decode()
    assert "python train.py debug=fast data.num_prompts=8" in text and "hydra.run.dir" not in text


def test_start_model_is_named_by_its_hub_id_never_by_a_local_path(run_dir, tmp_path):
    def run_with(model: dict) -> Run:
        root = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        root.mkdir()
        (root / "run_config.yaml").write_text(yaml.safe_dump({**settings(run_dir), "model": model}))
        return Run(root)

    local = tmp_path / "my-model"
    local.mkdir()
    spinlab_round = tmp_path / "other_run" / "hf" / "round_001"
    spinlab_round.mkdir(parents=True)
    (spinlab_round / "README.md").write_text("---\nbase_model: org/start\nspinlab:\n  round: 1\n---\n# x\n")
    cases = [
        ({"_target_": "spinlab.models.embedded_smollm2", "cache_dir": None}, SMOLLM2),
        (
            {
                "_target_": "spinlab.models.pretrained",
                "name_or_path": "alignment-handbook/zephyr-7b-sft-full",
            },
            "alignment-handbook/zephyr-7b-sft-full",
        ),
        (
            {
                "_target_": "spinlab.models.pretrained",
                "name_or_path": "/home/u/.cache/huggingface/hub/models--org--name/snapshots/0a1b",
            },
            "org/name",
        ),
        (
            {
                "_target_": "spinlab.models.pretrained",
                "name_or_path": "/home/u/.cache/spinlab/smollm2-135m-instruct",
            },
            SMOLLM2,
        ),
        ({"_target_": "spinlab.models.pretrained", "name_or_path": str(spinlab_round)}, "org/start"),
        ({"_target_": "spinlab.models.pretrained", "name_or_path": str(local)}, None),
        ({"_target_": "spinlab.models.tiny_model", "hidden_size": 64}, None),
    ]
    for model, expected in cases:
        run = run_with(model)
        hub, words = start_model(run)
        assert hub == expected, model
        assert str(tmp_path) not in words and "/home/u" not in words, words
    run = run_with(cases[0][0])
    shutil.copytree(run_dir / "rounds", run.dir.root / "rounds")
    shutil.copy(run_dir / "summary.json", run.dir.root / "summary.json")
    card = model_card(Run(run.dir.root), 0)
    assert card.data.base_model == SMOLLM2 and card.data.base_model_relation == "finetune"
    assert "SmolLM2-135M-Instruct-SPIN-iter0" in card.text
    assert start_model(run_with(cases[5][0]), override="me/base") == (
        "me/base",
        "[me/base](https://huggingface.co/me/base)",
    )


# -- the dataset card -----------------------------------------------------------------------------
def test_load_dataset_reads_the_rounds_synthetic_rows_alone(run_dir, tmp_path):
    import datasets

    for index in (0, 1):
        folder = run_dir / "rounds" / f"round_{index:03d}"
        assert {"heldout.jsonl", "samples.jsonl", "task_answers.jsonl", "eval.json"} <= {
            p.name for p in folder.iterdir()
        }
        rows = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))
        assert rows.to_list() == read_jsonl(folder / "synthetic.jsonl")
        card = DatasetCard.load(folder / "README.md")
        mine = card.data.spinlab
        assert mine["round"] == index and mine["pairs"] == len(rows) == 8
        assert mine["opponent_round"] == (index - 1 if index else None)
        stats = json.loads((folder / "stats.json").read_text())
        gen = {k: v for k, v in settings(run_dir)["generation"].items() if k != "_target_"}
        assert mine["generation"] == {"backend": stats["generation"]["backend"], **gen}
        for field in (
            "prompt",
            "real",
            "synthetic",
            "meta.round",
            "meta.tokens",
            "meta.finished",
            "meta.answer",
        ):
            assert f"| {field} |" in card.text
        expected = "the start model" if index == 0 else "the policy after round 0 (`hf/round_000`)"
        assert expected in card.text


# -- spinlab.push ---------------------------------------------------------------------------------
class Hub:
    """HfApi's upload calls and the Hub's card validation, recorded instead of sent."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.calls: list[tuple] = []
        self.uploads: list[dict] = []
        hub = self

        def create_repo(api, repo_id, **kw):
            hub.calls.append(("create_repo", repo_id, kw["repo_type"], kw.get("private")))

        def create_branch(api, repo_id, **kw):
            hub.calls.append(("create_branch", repo_id, kw["repo_type"], kw["branch"]))

        def upload_folder(api, **kw):
            if fail_at is not None and len(hub.uploads) == fail_at:
                raise OSError("connection reset")
            folder = Path(kw["folder_path"])
            files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            hub.calls.append(("upload_folder", kw["repo_id"], kw["repo_type"], kw["revision"]))
            hub.uploads.append(
                {**kw, "files": files, "content": {f: (folder / f).read_bytes() for f in files}}
            )

        def validate(card, repo_type=None):
            hub.calls.append(("validate", card.repo_type))

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(RepoCard, "validate", validate)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


MODEL_FILES = [
    "README.md",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]


def test_push_uploads_each_round_to_its_iter_repositories_and_nothing_else(run_dir, monkeypatch, capsys):
    hub = Hub(monkeypatch)
    assert push.main([str(run_dir), "--repo", "me/tiny-spin", "--license", "apache-2.0"]) == 0
    # Every card validated before the first upload, then data before model, round by round.
    assert hub.calls[:4] == [("validate", "dataset"), ("validate", "model")] * 2
    assert [c for c in hub.calls[4:] if c[0] == "upload_folder"] == [
        ("upload_folder", "me/tiny-spin-iter0", "dataset", None),
        ("upload_folder", "me/tiny-spin-iter0", "model", None),
        ("upload_folder", "me/tiny-spin-iter1", "dataset", None),
        ("upload_folder", "me/tiny-spin-iter1", "model", None),
    ]
    assert ("create_repo", "me/tiny-spin-iter1", "model", None) in hub.calls
    assert not any(c[0] == "create_branch" for c in hub.calls)
    for upload in hub.uploads:
        index = int(upload["repo_id"][-1])
        if upload["repo_type"] == "dataset":
            assert upload["files"] == ["README.md", "stats.json", "synthetic.jsonl"]
            source = run_dir / "rounds" / f"round_{index:03d}"
            assert upload["content"]["synthetic.jsonl"] == (source / "synthetic.jsonl").read_bytes()
            card = DatasetCard(upload["content"]["README.md"].decode())
            assert card.data.license == "apache-2.0"
            assert f'load_dataset("me/tiny-spin-iter{index}", split="train")' in card.text
        else:
            assert upload["files"] == MODEL_FILES
            source = run_dir / "hf" / f"round_{index:03d}"
            assert upload["content"]["model.safetensors"] == (source / "model.safetensors").read_bytes()
            card = ModelCard(upload["content"]["README.md"].decode())
            assert card.data.spinlab["metrics"]["loss"] == summary(run_dir)[index]["loss"]
            assert card.data.datasets == [f"me/tiny-spin-iter{t}" for t in range(index + 1)]
            assert f'from_pretrained("me/tiny-spin-iter{index}")' in card.text
            if index:
                assert "[`me/tiny-spin-iter0`](https://huggingface.co/me/tiny-spin-iter0)" in card.text
        for name in upload["files"]:
            assert not name.startswith(PRIVATE) and not name.endswith((".ckpt", ".pt", ".log"))
        for text in (upload["content"][n].decode() for n in upload["files"] if n.endswith((".md", ".json"))):
            assert "hf_test_token" not in text and "abc123" not in text and str(run_dir) not in text
    out = capsys.readouterr().out
    assert "round 1: model -> https://huggingface.co/me/tiny-spin-iter1 (7 files)" in out


def test_push_with_revisions_puts_each_round_on_its_branch(run_dir, monkeypatch):
    hub = Hub(monkeypatch)
    assert push.main([str(run_dir), "--repo", "me/tiny-spin", "--rounds", "1", "--no-data", "--private"]) == 0
    assert [c for c in hub.calls if c[0] != "validate"] == [
        ("create_repo", "me/tiny-spin-iter1", "model", True),
        ("upload_folder", "me/tiny-spin-iter1", "model", None),
    ]
    hub = Hub(monkeypatch)
    args = [str(run_dir), "--repo", "me/spin", "--layout", "revisions", "--data-repo", "me/spin-data"]
    assert push.main(args) == 0
    assert [c for c in hub.calls if c[0] != "validate"] == [
        ("create_repo", "me/spin-data", "dataset", None),
        ("create_branch", "me/spin-data", "dataset", "iter0"),
        ("upload_folder", "me/spin-data", "dataset", "iter0"),
        ("create_repo", "me/spin", "model", None),
        ("create_branch", "me/spin", "model", "iter0"),
        ("upload_folder", "me/spin", "model", "iter0"),
        ("create_branch", "me/spin-data", "dataset", "iter1"),
        ("upload_folder", "me/spin-data", "dataset", "iter1"),
        ("create_branch", "me/spin", "model", "iter1"),
        ("upload_folder", "me/spin", "model", "iter1"),
    ]
    card = ModelCard(hub.uploads[-1]["content"]["README.md"].decode())
    assert 'from_pretrained("me/spin", revision="iter1")' in card.text


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("offline", "refused: the hub is offline (HF_HUB_OFFLINE=1 is set)"),
        ("no token", "refused: no Hugging Face token: run `hf auth login` or set HF_TOKEN"),
        ("no finished round", "has no finished round yet"),
        ("unknown round", "refused: round 7 is not a finished round of"),
        ("not a run", "is missing: "),
        ("bad repo id", "refused: --repo: Repo id must be in the form"),
    ],
)
def test_push_refuses_at_start_in_one_line(run_dir, tmp_path, monkeypatch, capsys, case, message):
    hub = Hub(monkeypatch)
    target, extra = run_dir, []
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif case == "no token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    elif case == "no finished round":  # a run killed in its first round
        target = tmp_path / "run"
        target.mkdir()
        shutil.copy(run_dir / "run_config.yaml", target)
        shutil.copytree(run_dir / "rounds" / "round_000", target / "rounds" / "round_000")
    elif case == "unknown round":
        extra = ["--rounds", "0,7"]
    elif case == "not a run":
        target = tmp_path
    elif case == "bad repo id":
        extra = ["--repo", "me/a/b"]
    assert push.main([str(target), "--repo", "me/tiny-spin", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("refused: ") and message in err, err
    assert hub.calls == []


def test_a_failed_upload_says_what_was_pushed(run_dir, monkeypatch, capsys):
    hub = Hub(monkeypatch, fail_at=2)
    assert push.main([str(run_dir), "--repo", "me/tiny-spin"]) == 1
    err = capsys.readouterr().err
    assert "failed: push of round 1 (dataset) to me/tiny-spin-iter1 failed: OSError: connection reset" in err
    assert (
        "pushed before it: https://huggingface.co/datasets/me/tiny-spin-iter0, https://huggingface.co/me/tiny-spin-iter0"
        in err
    )
    assert len(hub.uploads) == 2


def test_push_leaves_hidden_files_home_and_refuses_a_local_path(run_dir, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    folder = copy / "hf" / "round_000"
    (folder / ".env").write_text("HF_TOKEN=hf_secret\n")
    (folder / "config.json.tmp").write_text("{}")  # a leftover of an interrupted save
    hub = Hub(monkeypatch)
    assert push.main([str(copy), "--repo", "me/x", "--rounds", "0", "--no-data"]) == 0
    assert hub.uploads[0]["files"] == MODEL_FILES
    (folder / "notes.txt").write_text(f"trained from {copy}/hf/round_000\n")
    hub = Hub(monkeypatch)
    assert push.main([str(copy), "--repo", "me/x", "--rounds", "0", "--no-data"]) == 2
    err = capsys.readouterr().err
    assert f"refused: round 0: notes.txt would upload the local path {str(copy.resolve())!r}" in err
    assert hub.calls == []
