"""W&B logging, per-round evaluation and the MT-Bench export."""

import json
import re

import pytest
import torch

from spinlab import losses
from spinlab.collective import SingleProcess
from spinlab.config import redact
from spinlab.data import SelfPlayDataModule
from spinlab.evaluation import RoundEvaluator, mtbench_questions
from spinlab.models import pretrained, tiny_model
from spinlab.module import PolicyModule
from spinlab.objectives import SPIN
from spinlab.rundir import RunDir
from spinlab.tasks.arithmetic import ArithmeticTask
from tests.helpers import response_logp
from tests.test_e2e import reference, rows, run  # noqa: F401  (the module-scoped reference run)


def test_heldout_evaluation_matches_a_hand_computation(reference):  # noqa: F811
    root, _, cfg = reference
    rd = root / "rounds" / "round_000"
    pairs = rows(rd / "heldout.jsonl")
    assert len(pairs) == cfg.eval.heldout_pairs
    # Log-probs from the logits, written in the test: the policy after round 0, the initial model.
    loaded = pretrained(str(root / "hf" / "round_000"))
    initial = tiny_model(seed=cfg.seed).model
    policy, opponent = (
        torch.tensor(
            [
                [response_logp(model, loaded.tokenizer, p["prompt"], p[k]) for k in ("real", "synthetic")]
                for p in pairs
            ],
            dtype=torch.float64,
        )
        for model in (loaded.model, initial)
    )
    # The opponent of round 0 is the initial model: the recorded log-probs are its own.
    recorded = torch.tensor([[p["opponent_logp_real"], p["opponent_logp_synthetic"]] for p in pairs])
    torch.testing.assert_close(recorded.double(), opponent, rtol=1e-5, atol=1e-3)
    margin = cfg.lam * ((policy[:, 0] - opponent[:, 0]) - (policy[:, 1] - opponent[:, 1]))
    results = json.loads((rd / "eval.json").read_text())
    assert results["eval/heldout_margin"] == pytest.approx(float(margin.mean()), rel=1e-4)
    assert results["eval/heldout_accuracy"] == pytest.approx(float((margin > 0).double().mean()))
    assert results["eval/heldout_logp_real"] == pytest.approx(float(policy[:, 0].mean()), rel=1e-4)


def final_number(response: str) -> str | None:
    """The number after the last "the answer is", the grading the task's prompts ask for."""
    found = re.findall(r"the answer is\s*(-?\d+)", response, re.IGNORECASE)
    return found[-1] if found else None


def test_task_answers_of_a_run_are_graded_and_counted(reference):  # noqa: F811
    root, summary, cfg = reference
    for index in (0, 1):
        graded = rows(root / "rounds" / f"round_{index:03d}" / "task_answers.jsonl")
        assert len(graded) == cfg.eval.task_prompts
        # The tiny random model writes no "The answer is": graded here, none is correct.
        assert [g["correct"] for g in graded] == [final_number(g["response"]) == g["answer"] for g in graded]
        share = sum(final_number(g["response"]) == g["answer"] for g in graded) / len(graded)
        assert summary[index]["eval/task_accuracy"] == pytest.approx(share)


class Answering:
    """A generation backend that gives prompt i the response `responses[i]`."""

    loads_weights = False

    def __init__(self, responses: list[str]):
        self.responses = responses

    def greedy(self, max_new_tokens=None, batch_size=None):
        return self

    def generate(self, model, tokenizer, prompt_ids, on_batch, **kwargs):
        on_batch(
            [
                {"index": i, "synthetic": r, "tokens": 1, "finished": True}
                for i, r in enumerate(self.responses)
            ]
        )
        return {"new_tokens": len(self.responses), "responses": len(self.responses), "seconds": 1.0}


def test_task_accuracy_is_the_share_of_correct_answers(tmp_path):
    loaded = tiny_model()
    dm = SelfPlayDataModule(ArithmeticTask(n_train=8, n_validation=5, n_test=0), loaded.tokenizer)
    answers = [r["answer"] for r in dm.load_split("validation")]
    responses = [
        f"Adding them up. The answer is {answers[0]}.",
        f"The answer is {int(answers[1]) + 1}.",
        "",
        f"The answer is {int(answers[3]) + 1}, no: the answer is {answers[3]}",
        f"The answer is {answers[4]}0",
    ]
    evaluator = RoundEvaluator(heldout_pairs=0, task_prompts=5)
    evaluator.generator = Answering(responses)
    module = PolicyModule(policy=loaded.model, objective=SPIN(losses.logistic))
    results = evaluator._task(0, SingleProcess(), module, dm, RunDir(tmp_path / "run"))
    graded = rows(tmp_path / "run" / "rounds" / "round_000" / "task_answers.jsonl")
    assert [g["response"] for g in graded] == responses
    assert [g["correct"] for g in graded] == [True, False, False, True, False]
    assert results["eval/task_accuracy"] == pytest.approx(2 / 5)


def test_evaluation_can_be_switched_off(tmp_path):
    summary, _ = run(tmp_path, "run", "~eval")
    assert not any(k.startswith("eval/") for k in summary[0])
    assert not (tmp_path / "run" / "rounds" / "round_000" / "eval.json").exists()


def test_mtbench_answers_in_fastchat_format(tmp_path):
    questions = mtbench_questions()
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    loaded = tiny_model()
    dm = SelfPlayDataModule(None, loaded.tokenizer)
    module = PolicyModule(policy=loaded.model, objective=SPIN(losses.logistic))
    evaluator = RoundEvaluator(mtbench=True, mtbench_questions=3, mtbench_max_new_tokens=4, batch_size=2)
    run_dir = RunDir(tmp_path / "run")
    assert evaluator._mtbench(2, None, module, dm, run_dir) == {"eval/mtbench_answers": 3}
    answers = rows(run_dir.round_dir(2) / "mt_bench" / "run-round002.jsonl")
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions[:3]]
    for a in answers:
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert a["model_id"] == "run-round002" and len(a["choices"][0]["turns"]) == 2


def test_redact_hides_secret_looking_keys():
    cfg = {
        "logger": {"wandb": {"api_key": "x", "project": "p"}},
        "hub_token": "y",
        "items": [{"password": "z"}],
        "generation": {"max_new_tokens": 24},
    }
    assert redact(cfg) == {
        "logger": {"wandb": {"api_key": "<redacted>", "project": "p"}},
        "hub_token": "<redacted>",
        "items": [{"password": "<redacted>"}],
        "generation": {"max_new_tokens": 24},  # a setting, not a secret: compared at restart
    }


def test_wandb_offline_run_has_metrics_config_and_sample_table(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-0042")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tmp_path, "run", "logger=wandb", "lam=0.5")
    wandb.finish()
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    files = offline / "files"
    # The offline record log (protobuf, read by `wandb sync`) carries metric names and config values.
    (records,) = offline.glob("run-*.wandb")
    data = records.read_bytes()
    for key in ("train/loss", "train/margin", "train/accuracy", "eval/heldout_accuracy", "gen/tokens_per_s"):
        assert key.encode() in data, key
    assert b"spinlab.losses.logistic" in data and b"lam" in data
    tables = list(files.glob("media/table/samples/round_000*.table.json"))
    assert tables, list(files.rglob("*"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["round", "prompt", "real", "synthetic"] and len(table["data"]) == 3
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert b"wandb-secret-0042" not in path.read_bytes(), path


def test_ngram_distance_and_length_ratio_by_hand():
    from spinlab.evaluation import length_ratio, ngram_tv

    real = ["a b c", "a b"]  # bigrams: (a b) twice, (b c) once
    assert ngram_tv(real, real) == 0.0
    assert ngram_tv(["x y"], real) == pytest.approx(1.0)
    # ["a b d"]: (a b) 1/2, (b d) 1/2 against (a b) 2/3, (b c) 1/3 -> TV = (1/6 + 1/2 + 1/3) / 2
    assert ngram_tv(["a b d"], real) == pytest.approx(0.5)
    assert ngram_tv([""], [""]) == 0.0 and ngram_tv([""], real) == 1.0  # no bigrams at all
    assert length_ratio(["abcd"], ["ab", "ab"]) == 1.0 and length_ratio(["a"], ["abcd"]) == 0.25
    # Texts sharing no bigram: exactly 1, whatever order the string-hash seed gives the set of
    # bigrams (a plain sum of these 7 + 3 shares gives 0.9999999999999998, and other texts' sums
    # differ in the last bit from one process to the next).
    many = [" ".join(f"w{i}" for i in range(8))]
    other = [" ".join(f"v{i}" for i in range(4))]
    assert ngram_tv(many, other) == 1.0


def test_task_answers_come_from_the_runs_generation_backend():
    from types import SimpleNamespace

    from hydra.utils import instantiate

    from spinlab.generation import HFGenerator, StaticCacheGenerator
    from tests.conftest import compose_cfg

    evaluator = RoundEvaluator(heldout_pairs=0, max_new_tokens=7, batch_size=3)
    assert type(evaluator.generator) is HFGenerator  # before any round: plain HF generate
    generator = instantiate(compose_cfg(["generation=static"]).generation)
    evaluator.prepare(
        0, None, None, SimpleNamespace(load_split=lambda split: []), generator, RunDir("unused")
    )
    greedy = evaluator.generator.greedy(evaluator.max_new_tokens, evaluator.batch_size)
    assert type(greedy) is StaticCacheGenerator
    assert (greedy.do_sample, greedy.max_new_tokens, greedy.batch_size) == (False, 7, 3)
