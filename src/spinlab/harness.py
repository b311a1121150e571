"""lm-evaluation-harness benchmarks on the policy's live weights, inside the run.

The policy object itself is handed to lm-eval's HFLM (no reload from disk, no second copy), with
a copy of the tokenizer (HFLM sets or adds a pad token on the one it gets). HFLM switches the
model to eval mode and lm-eval seeds the global random generators: both are put back afterwards,
so training goes on as it would have without the benchmarks.

`eval.benchmarks` (conf/eval/lm_eval.yaml) builds a Harness for the run's RoundEvaluator.
Tasks are lm-eval names (built-in, from `include_path`, or the project's own in
`spinlab/lm_eval_tasks/`). Every task is built once at the start of a run: that loads its data,
so a built-in task whose data is not in the local datasets cache fails then, not after the first
round. Results are flat numbers: `bench/<task>/<metric>` and `bench/<task>/<metric>_stderr` per
metric (`<metric>_<filter>` for a filter other than lm-eval's `none`), `bench/<task>` for the
task's main metric, and the mean of the main metrics under `bench/<average>` when asked for.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from spinlab.errors import ConfigError, NotFoundError

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
PREFIX = "bench/"


# -- the project's own tasks ----------------------------------------------------------------------
def arithmetic_benchmark_rows(split: str, seed: int = 0, n: int = 200) -> list[dict]:
    """Rows of the built-in arithmetic data for the shipped lm-eval tasks: the question, the
    reference response, the answer, and four choices (the answer and three numbers near it)."""
    from spinlab.tasks.arithmetic import ArithmeticTask

    source = ArithmeticTask(n_train=0, n_validation=n, n_test=n, seed=seed)
    out = []
    for i, row in enumerate(source.load(split)):
        rng = random.Random(f"{seed}-{split}-choices-{i}")
        answer = int(row["answer"])
        near = sorted({answer + d for d in (-10, -2, -1, 1, 2, 10)} | {2 * answer} - {answer})
        choices = [answer, *rng.sample([c for c in near if c >= 0], 3)]
        rng.shuffle(choices)
        out.append(
            {
                "question": row["prompt"],
                "response": row["response"],
                "answer": row["answer"],
                "choices": [str(c) for c in choices],
                "label": choices.index(answer),
            }
        )
    return out


def shipped_tasks() -> dict[str, dict]:
    """The project's lm-eval task configs by name, their data files made absolute (lm-eval reads
    relative ones against the working directory, not against the YAML's folder)."""
    tasks = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {k: str(TASKS_DIR / v) for k, v in files.items()}
        tasks[config["task"]] = config
    return tasks


# -- results --------------------------------------------------------------------------------------
def flatten(task: str, numbers: dict, main_metric: str | None) -> dict[str, float]:
    """lm-eval's `{"acc,none": x, "acc_stderr,none": s, "alias": ...}` for one task as
    `bench/<task>/acc`, `bench/<task>/acc_stderr`, and `bench/<task>` for the main metric."""
    out: dict[str, float] = {}
    for key, value in numbers.items():
        if "," not in key or isinstance(value, str):  # "alias"; a stderr lm-eval could not compute ("N/A")
            continue
        metric, filt = key.split(",", 1)
        base = metric.removesuffix("_stderr")
        name = base if filt == "none" else f"{base}_{filt}"
        out[f"{PREFIX}{task}/{name}{'_stderr' if metric.endswith('_stderr') else ''}"] = float(value)
    metrics = [k for k in out if not k.endswith("_stderr")]
    if not metrics:
        raise RuntimeError(f"lm-eval task {task!r} returned no metric (got {sorted(numbers)})")
    main = f"{PREFIX}{task}/{main_metric}" if main_metric else metrics[0]
    if main not in out:
        raise ConfigError(
            f"eval.benchmarks.main_metrics.{task}={main_metric!r} is not among the task's metrics "
            f"{[m.removeprefix(f'{PREFIX}{task}/') for m in metrics]}"
        )
    out[f"{PREFIX}{task}"] = out[main]
    return out


# -- the harness ----------------------------------------------------------------------------------
_BUILTIN_INDEXES: dict = {}


def builtin_index(include_path: str | None):
    """lm-eval's index of its built-in tasks (and of `include_path`'s), made once per process: it
    reads some 15,000 task files (5 s on one core, 15-20 s on a slow disk), and every job of a sweep
    run in one process asks for the same. Loading a task from it makes new objects each time."""
    if include_path not in _BUILTIN_INDEXES:
        from lm_eval.tasks import TaskManager

        _BUILTIN_INDEXES[include_path] = TaskManager(include_path=include_path, include_defaults=True)
    return _BUILTIN_INDEXES[include_path]


class Harness:
    """Runs lm-eval tasks on a model object.

    num_fewshot: {task: shots} (a group such as mmlu sets every task in it); a task not named
    keeps its own. main_metrics: {task: metric} for the closing table and the average; a task not
    named uses its first metric. average: the name under which the mean of the main metrics goes.
    """

    def __init__(
        self,
        tasks: list[str],
        num_fewshot: dict[str, int] | None = None,
        limit: int | float | None = None,
        batch_size: int = 8,
        include_path: str | None = None,
        main_metrics: dict[str, str] | None = None,
        average: str | None = None,
        bootstrap_iters: int = 1000,
        apply_chat_template: bool = False,
        seed: int = 1234,
    ):
        self.tasks = list(tasks)
        if not self.tasks:
            raise ConfigError(
                "eval.benchmarks.tasks is empty: name at least one lm-eval task, or use eval=default"
            )
        self.num_fewshot = dict(num_fewshot or {})
        self.main_metrics = dict(main_metrics or {})
        for key, where in ((self.num_fewshot, "num_fewshot"), (self.main_metrics, "main_metrics")):
            unknown = sorted(set(key) - set(self.tasks))
            if unknown:
                raise ConfigError(
                    f"eval.benchmarks.{where} names {unknown}, which are not in eval.benchmarks.tasks "
                    f"{self.tasks}: add them to eval.benchmarks.tasks or remove their entries"
                )
        self.limit = limit
        self.batch_size = batch_size
        self.include_path = str(Path(include_path).resolve()) if include_path else None
        if self.include_path and not Path(self.include_path).is_dir():
            raise ConfigError(f"eval.benchmarks.include_path={include_path}: no such directory of task YAMLs")
        self.average = average
        self.bootstrap_iters = bootstrap_iters
        self.apply_chat_template = apply_chat_template
        self.seed = seed
        self._manager = None

    # -- tasks --------------------------------------------------------------------------------
    def manager(self):
        """lm-eval's task index: the user's folder, plus the built-in tasks only when a task
        needs them (indexing those takes 15-20 s)."""
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            own = set(shipped_tasks())
            local = TaskManager(include_path=self.include_path, include_defaults=False)
            if all(t in own or t in local.all_tasks for t in self.tasks):
                self._manager = local
            else:
                self._manager = builtin_index(self.include_path)
                unknown = [t for t in self.tasks if t not in own and t not in self._manager.all_tasks]
                if unknown:
                    raise NotFoundError(
                        f"eval.benchmarks.tasks: {unknown} are not lm-eval tasks, groups or tags (nor in "
                        f"eval.benchmarks.include_path={self.include_path}); `lm-eval ls tasks` lists them"
                    )
        return self._manager

    def load(self, task: str) -> dict:
        """lm-eval's task dict for one requested task, its data loaded and its shots set."""
        own = shipped_tasks()
        manager = self.manager()
        spec = own[task] if task in own and task not in manager.all_tasks else task
        try:
            loaded = manager.load([spec])
        except OSError as err:  # data not in the cache and the hub unreachable (datasets, huggingface_hub)
            raise NotFoundError(self._load_error(task, err)) from err
        for obj in loaded["tasks"].values():
            shots = self.num_fewshot.get(task)
            if shots is not None:
                obj.set_config(key="num_fewshot", value=shots)
            elif obj.get_config("num_fewshot") is None:
                obj.set_config(key="num_fewshot", value=0)
            obj.set_fewshot_seed(seed=self.seed)
        return loaded

    @staticmethod
    def _load_error(task: str, err: Exception) -> str:
        offline = any(
            os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        )
        if offline:
            return (
                f"lm-eval task {task!r}: its data is not in the local datasets cache and the hub is "
                "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE). Either run once with the hub reachable "
                "so that the data is downloaded and cached, or use a local task (a YAML with "
                f"dataset_path: json in eval.benchmarks.include_path). ({type(err).__name__}: {err})"
            )
        return f"lm-eval task {task!r} could not be loaded: {type(err).__name__}: {err}"

    def check(self) -> None:
        """At the start of a run: every task is known and its data loads."""
        started = time.perf_counter()
        for task in self.tasks:
            self.load(task)
        log.info("lm-eval tasks %s ready in %.1f s", self.tasks, time.perf_counter() - started)

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, model, tokenizer, desc: str = "") -> dict[str, float]:
        """Every task on `model` as it is now; training mode, tokenizer and random state kept."""
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        started = time.perf_counter()
        modes = {m: m.training for m in model.modules()}
        states = random.getstate(), np.random.get_state()
        results: dict[str, float] = {}
        mains: list[float] = []
        try:
            device = next(model.parameters()).device
            cuda = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=self.batch_size)
                for task in self.tasks:
                    random.seed(self.seed)
                    np.random.seed(self.seed)
                    torch.manual_seed(self.seed)
                    shots = self.num_fewshot.get(task)
                    log.info("%s lm-eval %s%s", desc, task, f" ({shots}-shot)" if shots is not None else "")
                    out = evaluate(
                        lm=lm,
                        task_dict=self.load(task),
                        limit=self.limit,
                        bootstrap_iters=self.bootstrap_iters,
                        log_samples=False,
                        apply_chat_template=self.apply_chat_template,
                    )
                    # A task or group has its own row; a tag (a list of tasks) has one per task.
                    rows = out["results"]
                    named = {task: rows[task]} if task in rows else rows
                    for name, numbers in named.items():
                        results.update(flatten(name, numbers, self.main_metrics.get(task)))
                        mains.append(results[f"{PREFIX}{name}"])
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            for m, training in modes.items():
                m.training = training
        if self.average:
            results[f"{PREFIX}{self.average}"] = sum(mains) / len(mains) if mains else math.nan
        results[f"{PREFIX}seconds"] = time.perf_counter() - started
        return results
