"""lm-evaluation-harness benchmarks inside the run (spinlab.harness): numbers checked against
plain-torch computations on the same rows and model, the run's records, resume and the offline start."""

import csv
import json
import random

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

import spinlab.run
from spinlab.errors import ConfigError
from spinlab.harness import TASKS_DIR, Harness, arithmetic_benchmark_rows, flatten
from spinlab.models import LoadedModel, tiny_model
from tests.conftest import compose_cfg
from tests.helpers import Crash

pytest.importorskip("lm_eval")

LIMIT = 12


def test_shipped_data_files_are_the_generated_rows():
    for split in ("test", "validation"):
        shipped = [
            json.loads(line) for line in (TASKS_DIR / f"arithmetic_{split}.jsonl").read_text().splitlines()
        ]
        assert shipped == arithmetic_benchmark_rows(split)
    row = shipped[0]
    assert row["choices"][row["label"]] == row["answer"] and len(set(row["choices"])) == 4


def test_flatten_names_metrics_and_skips_missing_stderr():
    numbers = {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict": 0.25,
               "exact_match_stderr,strict": "N/A"}  # fmt: skip
    assert flatten("t", numbers, None) == {
        "bench/t/acc": 0.5,
        "bench/t/acc_stderr": 0.1,
        "bench/t/exact_match_strict": 0.25,
        "bench/t": 0.5,
    }
    assert flatten("t", numbers, "exact_match_strict")["bench/t"] == 0.25
    with pytest.raises(ValueError, match="main_metrics.t='f1'"):
        flatten("t", numbers, "f1")


def test_config_mistakes_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="num_fewshot names"):
        Harness(tasks=["arithmetic_mc"], num_fewshot={"gsm8k": 5})
    with pytest.raises(ConfigError, match="include_path"):
        Harness(tasks=["arithmetic_mc"], include_path=str(tmp_path / "missing"))


def continuation_logp(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    ids = torch.tensor([context_ids + continuation_ids])
    logps = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    picked = logps.gather(1, targets[:, None])[:, 0]
    return float(picked[len(context_ids) - 1 :].sum())


@pytest.fixture
def tiny():
    loaded = tiny_model(seed=3)
    model = loaded.model
    model.train()
    return model, loaded.tokenizer


def test_multiple_choice_accuracy_is_the_log_likelihood_argmax(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vocab, pad = len(tok), tok.pad_token
    rng = torch.get_rng_state(), random.getstate()
    results = Harness(tasks=["arithmetic_mc"], limit=LIMIT, batch_size=4).evaluate(model, tok)
    assert (
        torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    )  # training's draws unchanged
    assert model.training and all(m.training for m in model.modules())  # HFLM set eval mode: put back
    assert (len(tok), tok.pad_token) == (vocab, pad)  # HFLM worked on a copy
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    model.eval()
    correct = 0
    with torch.no_grad():
        for row in arithmetic_benchmark_rows("test")[:LIMIT]:
            context = tok(f"Question: {row['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
            scores = [
                continuation_logp(model, context, tok(f" {c}", add_special_tokens=False)["input_ids"])
                for c in row["choices"]
            ]
            correct += scores.index(max(scores)) == row["label"]
    assert results["bench/arithmetic_mc/acc"] == pytest.approx(correct / LIMIT)
    assert results["bench/arithmetic_mc"] == results["bench/arithmetic_mc/acc"]
    p = correct / LIMIT
    assert results["bench/arithmetic_mc/acc_stderr"] == pytest.approx((p * (1 - p) / (LIMIT - 1)) ** 0.5)


def greedy(model, tok, prompt: str, max_new: int) -> str:
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out).split("\n")[0]


def test_generate_exact_match_counts_correct_greedy_answers_of_a_local_task(tiny, tmp_path):
    """A local task (eval.benchmarks.include_path) whose reference is the model's own greedy answer for every
    other row: lm-eval's exact match is then the share of those rows. The prompts end in the
    answer's digits, which the random model repeats: answers differ from row to row."""
    model, tok = tiny
    model.eval()
    rows = arithmetic_benchmark_rows("test")[:8]
    answers = [greedy(model, tok, f"Q: {r['question']}\nA: {r['answer']}", 6) for r in rows]
    assert len(set(answers[::2])) > 2
    data = [{"question": r["question"], "hint": r["answer"], "answer": a if i % 2 == 0 else "never"} for i, (r, a) in enumerate(zip(rows, answers, strict=True))]  # fmt: skip
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data))
    task = {
        "task": "echo_gen",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "data.jsonl")}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "Q: {{question}}\nA: {{hint}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 6},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "echo_gen.yaml").write_text(yaml.safe_dump(task))
    model.train()
    results = Harness(tasks=["echo_gen"], include_path=str(tmp_path / "tasks"), batch_size=4).evaluate(
        model, tok
    )
    assert results["bench/echo_gen/exact_match"] == 0.5
    assert model.training


# -- inside a run ---------------------------------------------------------------------------------
RUN = ["debug=fast", "data.num_prompts=8", "eval=lm_eval", f"eval.benchmarks.limit={LIMIT // 3}", "eval.task_prompts=0",
       "eval.heldout_pairs=4", "eval.benchmarks.average=arithmetic"]  # fmt: skip


def bench_rows(run_dir) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("bench/arithmetic_mc/acc")]


def test_a_run_benchmarks_the_start_and_every_round_once_across_a_crash(tmp_path, monkeypatch, capsys):
    """Killed after round 1's training, before its benchmarks: the rerun benchmarks round 1 once."""
    calls = []
    evaluate = Harness.evaluate

    def crash_before_round_1(self, model, tokenizer, desc=""):
        calls.append(desc)
        if desc == "round 1" and calls.count(desc) == 1:
            raise Crash("killed before round 1's benchmarks")
        return evaluate(self, model, tokenizer, desc)

    monkeypatch.setattr(Harness, "evaluate", crash_before_round_1)
    cfg = compose_cfg(RUN, tmp_path / "run")
    with pytest.raises(Crash):
        spinlab.run.run(cfg)
    assert calls == ["start", "round 0", "round 1"]
    spinlab.run.run(compose_cfg(RUN, tmp_path / "run"))
    assert calls[3:] == ["round 1"]  # the start and round 0 are not evaluated again

    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["round"] for s in summary] == [-1, 0, 1]
    for s in summary:
        for key in (
            "bench/arithmetic_gen/exact_match_answer",
            "bench/arithmetic_mc/acc",
            "bench/arithmetic_mc/acc_norm",
        ):
            assert 0 <= s[key] <= 1 and f"{key}_stderr" in s
        assert s["bench/arithmetic"] == pytest.approx(
            (s["bench/arithmetic_gen"] + s["bench/arithmetic_mc"]) / 2
        )
        assert s["bench/seconds"] > 0
    rows = bench_rows(run_dir)
    assert [int(r["round"]) for r in rows] == [-1, 0, 1]  # one row each, the start first
    for row, s in zip(rows, summary, strict=True):
        assert float(row["bench/arithmetic_mc/acc"]) == pytest.approx(s["bench/arithmetic_mc/acc"])
        assert float(row["bench/arithmetic_mc/acc_stderr"]) == pytest.approx(
            s["bench/arithmetic_mc/acc_stderr"]
        )
    # The round's model card reports its benchmarks once (the rerun's numbers), with the start model's.
    card = ModelCard.load(run_dir / "hf" / "round_001" / "README.md")
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    bench = {
        (r.dataset_type, r.metric_type): r.metric_value for r in results if r.dataset_type != "spinlab-task"
    }
    expected = {
        tuple(k.split("/")[1:]): v
        for k, v in summary[2].items()
        if k.count("/") == 2 and not k.endswith("_stderr")
    }
    assert bench == expected and ("arithmetic_mc", "acc") in bench
    start = summary[0]["bench/arithmetic_mc/acc"]
    assert f"| arithmetic_mc | acc | {start:.4g} | {summary[2]['bench/arithmetic_mc/acc']:.4g} |" in card.text
    table = capsys.readouterr().out
    assert "arithmetic_gen" in table.splitlines()[-5] and "arithmetic" in table
    start_row = table.splitlines()[-4].split()
    assert start_row[0] == "start" and start_row[1] == "-"  # no training loss before round 0
    assert float(start_row[-1]) == pytest.approx(summary[0]["bench/arithmetic"], abs=5e-4)  # the average


def test_offline_builtin_task_without_cached_data_fails_before_weights_load(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)

    def no_weights(self):
        raise AssertionError("the weights loaded before the benchmarks' data was checked")

    monkeypatch.setattr(LoadedModel, "model", property(no_weights))
    cfg = compose_cfg(
        ["debug=fast", "eval=lm_eval", "eval.benchmarks.tasks=[arithmetic_mc,arc_easy]"], tmp_path / "run"
    )
    with pytest.raises(RuntimeError, match="arc_easy") as err:
        spinlab.run.run(cfg)
    message = str(err.value)
    assert "hub reachable" in message and "local task" in message and "include_path" in message


def test_the_builtin_task_index_is_made_once_per_process(monkeypatch):
    """A sweep's jobs in one process share lm-eval's index of its built-in tasks (made here, or by
    the test above in this process); each gets its own index of local tasks, which is quick."""
    from lm_eval import tasks

    made = []
    real = tasks.TaskManager
    monkeypatch.setattr(tasks, "TaskManager", lambda **kw: made.append(kw["include_defaults"]) or real(**kw))
    first, second = Harness(tasks=["arithmetic_mc", "arc_easy"]), Harness(tasks=["arc_easy"])
    assert first.manager() is second.manager() and "arc_easy" in first.manager().all_tasks
    assert made.count(False) == 2 and made.count(True) <= 1
    assert Harness(tasks=["arithmetic_mc"]).manager() is not first.manager()  # local tasks only


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(tmp_path):
    """trainer=fsdp_cpu: every process runs the benchmarks on the gathered weights; no hang, and
    the numbers of one process (the start exactly; after training, weights agree to ~1e-5)."""
    from tests.test_sharded import SHARDED, train

    bench = ["eval=lm_eval", "eval.benchmarks.limit=4", "eval.task_prompts=0", "eval.heldout_pairs=4"]
    train(tmp_path / "sharded", *SHARDED, *bench)
    train(tmp_path / "single", "data.batch_size=4", *bench)
    sharded, single = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("sharded", "single"))
    assert [s["round"] for s in sharded] == [s["round"] for s in single] == [-1, 0, 1]
    for a, b in zip(sharded, single, strict=True):
        keys = sorted(k for k in b if k.startswith("bench/") and k != "bench/seconds")
        assert sorted(k for k in a if k.startswith("bench/") and k != "bench/seconds") == keys
        assert len(keys) >= 8
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["round"], key)
    assert len(bench_rows(tmp_path / "sharded")) == 3
