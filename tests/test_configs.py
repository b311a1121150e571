"""Every config in conf/ composes and is instantiated (the commands of the README and docs/ run in test_readme.py)."""

import math
import os
import re
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from spinlab.callbacks import SelfPlayCallback
from spinlab.cards import Run
from spinlab.config import check_config, check_restart, own_keys, redact, renamed_settings
from spinlab.data import SelfPlayDataModule
from spinlab.errors import EXIT_REFUSED, ConfigError
from spinlab.models import tiny_model
from spinlab.module import PolicyModule, RoundSchedule
from spinlab.rounds import Round, round_settings
from spinlab.sources import DataError
from tests import forked
from tests.conftest import CONF, ROOT, compose_cfg
from tests.test_generation_backends import chi_square_p, collect, encode, eos_model, two_token_distribution

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    assert set(GROUPS) >= {
        "model",
        "data",
        "loss",
        "generation",
        "optimizer",
        "trainer",
        "logger",
        "callbacks",
        "experiment",
        "debug",
    }
    for group in GROUPS:
        assert options(group), group


@pytest.mark.parametrize("loss", options("loss"))
def test_loss_configs(loss):
    fn = instantiate(compose_cfg([f"loss={loss}"]).loss)
    value = fn(torch.tensor([0.0, 1.0]))
    assert value.shape == (2,) and value[0] > value[1]  # decreasing in the margin


@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_optimizer_configs(optimizer):
    cfg = compose_cfg([f"optimizer={optimizer}", "optimizer.lr=0.25"])
    opt = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["lr"] == 0.25


def test_generation_config_samples_the_models_own_distribution_seeded_by_the_run_seed():
    """generation=hf as composed draws y' ~ p_θ (temperature 1, no top-k or top-p cut: the paper's
    sampling), and its draws follow the run's `seed`."""
    loaded = eos_model()
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(3.0)  # logits far enough apart for a cut or a temperature to show
    ids = encode(loaded.tokenizer, ["hello"])[0]
    vocab = loaded.model.config.vocab_size

    def draws(seed, n):
        cfg = compose_cfg(
            ["generation=hf", f"seed={seed}", "generation.max_new_tokens=2", "generation.batch_size=1000"]
        )
        rows, _ = collect(instantiate(cfg.generation), loaded, [ids] * n)
        return {r["index"]: (r["synthetic"], r["finished"]) for r in rows}

    n = 6000
    drawn = draws(7, n)
    counts = Counter(drawn.values())
    assert chi_square_p(counts, two_token_distribution(loaded, ids, 1.0, vocab, 1.0), n) > 1e-4
    # The same samples against what a tempered or cut distribution would give: told apart.
    for temperature, top_k, top_p in [(0.7, vocab, 1.0), (1.0, 50, 1.0), (1.0, vocab, 0.9)]:
        wrong = two_token_distribution(loaded, ids, temperature, top_k, top_p)
        assert chi_square_p(counts, wrong, n) < 1e-6, (temperature, top_k, top_p)
    # Batches of 1000 are seeded by (seed, round, first index): the first batch again, then another seed.
    first_batch = {i: drawn[i] for i in range(1000)}
    assert draws(7, 1000) == first_batch
    assert sum(a != first_batch[i] for i, a in draws(8, 1000).items()) > 500


def test_tiny_model_config_is_deterministic():
    a = instantiate(compose_cfg(["model=tiny"]).model)
    b = instantiate(compose_cfg(["model=tiny"]).model)
    c = instantiate(compose_cfg(["model=tiny", "seed=1"]).model)
    assert torch.equal(a.model.lm_head.weight, b.model.lm_head.weight)
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)


@pytest.mark.slow
def test_smollm2_model_config_loads_the_embedded_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SPINLAB_CACHE", str(Path.home() / ".cache" / "spinlab"))
    loaded = instantiate(compose_cfg(["model=smollm2_135m"]).model)
    assert loaded.model.config.vocab_size == 49152
    assert sum(p.numel() for p in loaded.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert getattr(loaded.model.config, "quantization_config", None) is None
    assert loaded.tokenizer.chat_template and loaded.tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize(
    "overrides", [["model=zephyr"], ["model=zephyr", "loss=logistic"], ["experiment=paper_zephyr"]]
)
def test_zephyr_composes_and_fails_only_at_the_network(overrides):
    cfg = compose_cfg(overrides)
    assert cfg.model.name_or_path == "alignment-handbook/zephyr-7b-sft-full"
    assert cfg.model.dtype == "bfloat16"
    assert cfg.trainer.strategy._target_ == "spinlab.strategy.FSDP2Strategy"
    from hydra.errors import InstantiationException

    with pytest.raises(
        InstantiationException, match="HF_HUB_OFFLINE=1 is set and the model is not in the local cache"
    ) as err:
        instantiate(cfg.model)
    assert isinstance(err.value.__cause__, RuntimeError)


def test_hf_model_config_loads_a_local_directory(tmp_path):
    tiny = instantiate(compose_cfg(["model=tiny"]).model)
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    loaded = instantiate(compose_cfg(["model=hf", f"model.name_or_path={tmp_path / 'm'}"]).model)
    assert torch.equal(loaded.model.lm_head.weight, tiny.model.lm_head.weight)


@pytest.mark.parametrize("data", options("data"))
def test_data_configs(data, tmp_path):
    tokenizer = instantiate(compose_cfg(["model=tiny"]).model).tokenizer
    overrides = [f"data={data}"]
    if data == "local":
        path = tmp_path / "sft.jsonl"
        path.write_text('{"prompt": "1+1?", "response": "2"}\n{"prompt": "2+2?", "response": "4"}\n')
        overrides.append(f"data.source.train={path}")
    cfg = compose_cfg(overrides)
    if data == "ultrachat":  # the paper's limits: over the tiny model's 512 positions
        assert cfg.data.max_length == 1024 and cfg.data.max_prompt_length == 512
        with pytest.raises(DataError, match="max_length=1024 is over the model's position limit of 512"):
            instantiate(own_keys(cfg, "data"), tokenizer=tokenizer).setup()
        dm = instantiate(own_keys(cfg, "data"), tokenizer=tokenizer, max_positions=4096)
        with pytest.raises(RuntimeError, match="ultrachat_200k.*hub"):
            dm.setup()
        return
    dm = instantiate(own_keys(cfg, "data"), tokenizer=tokenizer)
    assert isinstance(dm, SelfPlayDataModule)
    assert dm.max_new_tokens == cfg.generation.max_new_tokens
    dm.setup()  # the limits are measured for the character-level tokenizer: nothing to tune
    rows = dm.load_split("train")
    assert len(rows) == (2 if data == "local" else cfg.data.num_prompts)
    all_rows = [r for split in ("train", "validation", "test") for r in dm.load_split(split)]
    longest_prompt = max(len(dm.encode_prompt(r["prompt"])) for r in all_rows)
    assert dm.max_prompt_length == longest_prompt
    assert dm.max_length == max(
        longest_prompt + cfg.generation.max_new_tokens + 1,
        *(
            len(dm.encode_prompt(r["prompt"])) + len(tokenizer(r["response"])["input_ids"]) + 1
            for r in all_rows
        ),
    )


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_configs(trainer):
    cfg = compose_cfg([f"trainer={trainer}"])
    if cfg.trainer.accelerator == "cpu":
        t = instantiate(cfg.trainer, max_epochs=2, logger=False)
        assert isinstance(t, L.Trainer) and t.max_epochs == 2
        assert t.world_size == cfg.trainer.devices
        return
    # GPU trainers: the strategy is built here; the Trainer itself needs a GPU (tests/test_gpu.py).
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    if "strategy" in cfg.trainer:
        strategy = instantiate(cfg.trainer.strategy)
        assert type(strategy).__name__ == "FSDP2Strategy"
        assert strategy._timeout.total_seconds() == 60 * cfg.trainer.strategy.timeout_minutes
        assert strategy._tensor_parallel_size == 1 and strategy._save_distributed_checkpoint
    if torch.cuda.is_available():
        assert isinstance(instantiate(cfg.trainer, logger=False), L.Trainer)


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_configs(logger, tmp_path):
    cfg = compose_cfg([f"logger={logger}"], tmp_path)
    loggers = {k: instantiate(v) for k, v in cfg.logger.items()}
    assert "csv" in loggers  # always there, whatever else is on
    assert Path(loggers["csv"].log_dir) == tmp_path / "csv"
    if logger == "wandb":
        assert type(loggers["wandb"]).__name__ == "WandbLogger"


def test_callbacks_and_module_configs(tmp_path):
    cfg = compose_cfg(["model=tiny"], tmp_path)
    callbacks = {k: instantiate(v) for k, v in cfg.callbacks.items()}
    assert isinstance(callbacks["self_play"], SelfPlayCallback)
    assert callbacks["self_play"].rounds == cfg.rounds
    assert callbacks["checkpoint"].path == tmp_path / "checkpoints" / "last.ckpt"
    module = instantiate(cfg.module, policy=instantiate(cfg.model).model)
    assert isinstance(module, PolicyModule) and module.lam == cfg.lam and module.opponent is None


def spin_loss(module, policy, opponent):
    """The module's training loss for fixed per-pair log-probs: its objective, λ and cached opponent."""
    module.policy_logps = lambda batch: {
        "real": torch.tensor(policy[0]),
        "synthetic": torch.tensor(policy[1]),
    }
    batch = {"opponent_logps": torch.tensor(opponent).T}
    return module.loss_and_metrics(batch)["loss"].item()


# Per pair: log p(real), log p(synthetic) under the policy and the opponent.
POLICY = ([-10.0, -10.0], [-20.0, -20.0])
OPPONENT = ([-11.0, -14.0], [-20.0, -20.0])  # log-ratio margins 1 and 4 before λ


def test_cli_example_builds_the_hinge_loss_at_lam_and_the_rounds_it_names(tmp_path):
    """The README's `debug=fast loss=hinge lam=0.5 rounds=3`: the module it builds trains on
    max(0, 1 − λ·m) with λ = 0.5, and the self-play callback runs 3 rounds."""
    cfg = compose_cfg(["debug=fast", "loss=hinge", "lam=0.5", "rounds=3"], tmp_path)
    module = instantiate(cfg.module, policy=instantiate(cfg.model).model)
    # Margins 0.5 and 2: hinge 0.5 and 0 (λ = 0.1 would give 0.75, the logistic loss 0.30).
    assert spin_loss(module, POLICY, OPPONENT) == pytest.approx((0.5 + 0.0) / 2)
    callback = instantiate(cfg.callbacks.self_play)
    assert callback.rounds == 3 and callback.base["lam"] == 0.5


def test_demo_preset_runs_what_the_readme_says(tmp_path):
    readme = (ROOT / "README.md").read_text()
    rounds, prompts = map(
        int, re.search(r"runs (\d+) rounds on (\d+) prompts of the built-in", readme).groups()
    )
    pairs, task = map(int, re.search(r"\((\d+) held-out pairs, (\d+) task prompts\)", readme).groups())
    cfg = compose_cfg(["experiment=demo"], tmp_path)
    assert instantiate(cfg.callbacks.self_play).rounds == rounds
    dm = instantiate(own_keys(cfg, "data"), tokenizer=tiny_model(seed=0).tokenizer)
    assert len(dm.load_split("train")) == prompts
    evaluator = instantiate(cfg.eval)
    assert (evaluator.heldout_pairs, evaluator.task_prompts) == (pairs, task)


def test_debug_fast_evaluates_at_its_own_size_as_the_docs_say():
    fast, full = compose_cfg(["debug=fast"]).eval, compose_cfg(["debug=fast", "eval=default"]).eval
    sizes = ("heldout_pairs", "task_prompts", "max_new_tokens")
    # One evaluation batch of each, greedy answers as long as the round's synthetic responses.
    assert fast.heldout_pairs == fast.task_prompts == fast.batch_size
    assert fast.max_new_tokens == compose_cfg(["debug=fast"]).generation.max_new_tokens
    assert all(fast[k] < full[k] for k in sizes)
    assert {k: v for k, v in fast.items() if k not in sizes} == {
        k: v for k, v in full.items() if k not in sizes
    }
    for page in ("configuration.md", "evaluation.md"):
        text = (ROOT / "docs" / page).read_text()
        said = re.search(r"(\d+) held-out pairs, (\d+) task\s+prompts, (\d+)-token answers", text)
        assert said and tuple(map(int, said.groups())) == tuple(fast[k] for k in sizes), page


def test_paper_recipe_trains_each_round_as_the_paper_does(tmp_path):
    """arXiv 2401.01335, §5.1 and Appendix B, against what the preset builds: RMSprop without weight
    decay; per iteration 0..3 a peak lr of 5e-7, 5e-7, 1e-7, 1e-7 with 10 % linear warm-up then
    linear decay; the logistic loss at λ = 0.1, 0.1, 0.1, 5.0; iteration 1 also trains on
    iteration 0's synthetic data; 2 epochs per iteration; global batch 64."""
    cfg = compose_cfg(["experiment=paper_zephyr"], tmp_path)
    callback = instantiate(cfg.callbacks.self_play)
    assert (callback.rounds, callback.epochs_per_round) == (4, 2)
    module = instantiate(cfg.module, policy=tiny_model(seed=0).model)
    built = module.configure_optimizers()
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.RMSprop) and optimizer.param_groups[0]["weight_decay"] == 0
    assert isinstance(scheduler, RoundSchedule)
    steps = 20  # per round here; the warm-up is 2 of them
    for index, (peak, lam, mix) in enumerate(
        [(5e-7, 0.1, 0), (5e-7, 0.1, 1), (1e-7, 0.1, 0), (1e-7, 5.0, 0)]
    ):
        settings = round_settings(index, callback.base, callback.round_overrides)
        assert settings["mix_previous_rounds"] == mix
        module.begin_round(
            Round(index, settings["lam"], settings["lr"], mix, index * steps, steps, 64), fresh=True
        )
        scheduler.refresh()
        lrs = []
        for _ in range(steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        expected = [peak * (s + 1) / 2 if s < 2 else peak * (steps - s) / (steps - 2) for s in range(steps)]
        assert lrs == pytest.approx(expected, rel=1e-6)
        margins = [lam * m for m in (1.0, 4.0)]
        expected_loss = sum(math.log1p(math.exp(-m)) for m in margins) / 2
        assert spin_loss(module, POLICY, OPPONENT) == pytest.approx(expected_loss, rel=1e-6)
    # 8 GPUs × the per-device batch × gradient accumulation.
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.accumulate_grad_batches == 64


def test_unknown_key_fails_at_compose():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="lamda"):
        compose_cfg(["lamda=0.5"])
    with pytest.raises(ConfigCompositionException, match="hingee"):
        compose_cfg(["loss=hingee"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=tiny"],
        ["model=hf", "data=local"],
        pytest.param(["model=smollm2_135m"], marks=pytest.mark.slow),
    ],
)
def test_model_and_data_choices_start_without_hand_tuning(overrides, tmp_path, monkeypatch):
    """The length limits follow the model's tokenizer: every row fits, none is cut, no weights needed."""
    import spinlab.run

    monkeypatch.setenv("SPINLAB_CACHE", str(Path.home() / ".cache" / "spinlab"))
    if "model=hf" in overrides:
        tiny = instantiate(compose_cfg(["model=tiny"]).model)
        tiny.model.save_pretrained(tmp_path / "m")
        tiny.tokenizer.save_pretrained(tmp_path / "m")
        data = tmp_path / "sft.jsonl"
        data.write_text(
            '{"prompt": "What is 2 + 3?", "response": "2 + 3 = 5."}\n'
            '{"prompt": "Name a colour.", "response": "' + "Red, the colour of the sunset. " * 8 + '"}\n'
        )
        overrides = [*overrides, f"model.name_or_path={tmp_path / 'm'}", f"data.source.train={data}"]
    loaded, dm = spinlab.run.preflight(compose_cfg(overrides))
    assert not loaded.weights_loaded
    rows = [r for split in ("train", "validation", "test") for r in dm.load_split(split)]
    pairs = [{"prompt": r["prompt"], "real": r["response"], "synthetic": "x"} for r in rows]
    lengths = [(len(e["prompt"]), len(e["prompt"]) + len(e["real"])) for e in dm.encode_pairs(pairs)]
    assert dm.max_prompt_length == max(p for p, _ in lengths)
    assert max(t for _, t in lengths) <= dm.max_length <= loaded.max_positions
    for e, r in zip(dm.encode_pairs(pairs), rows, strict=True):  # no real response was cut
        assert loaded.tokenizer.decode(e["real"][:-1]) == r["response"]


@pytest.mark.parametrize("evaluation", options("eval"))
def test_eval_configs(evaluation):
    from spinlab.evaluation import RoundEvaluator

    evaluator = instantiate(compose_cfg([f"eval={evaluation}", "eval.batch_size=5"]).eval)
    assert isinstance(evaluator, RoundEvaluator)
    harness = evaluator.harness
    if harness is not None:  # eval.benchmarks.batch_size follows eval.batch_size
        assert harness.batch_size == evaluator.batch_size == 5
    if evaluation == "lm_eval":
        assert (
            harness.tasks == ["arithmetic_gen", "arithmetic_mc"]
            and harness.num_fewshot == {}
            and harness.main_metrics == {}
        )
    elif evaluation == "open_llm_v1":  # the paper's Table 1: six tasks at its shot counts, averaged
        assert harness.num_fewshot == {
            "arc_challenge": 25,
            "hellaswag": 10,
            "truthfulqa_mc2": 0,
            "mmlu": 5,
            "winogrande": 5,
            "gsm8k": 5,
        }
        assert harness.tasks == list(harness.num_fewshot) and harness.average == "open_llm_average"
        assert harness.main_metrics["gsm8k"] == "exact_match_strict-match"
    else:
        assert harness is None


# The lm-eval settings as `eval` held them before they moved into `eval.benchmarks` (issue 30).
OLD_LM_EVAL = {
    "tasks": ["arithmetic_gen", "arithmetic_mc"],
    "num_fewshot": None,
    "limit": None,
    "include_path": None,
    "main_metrics": None,
    "average": None,
    "bootstrap_iters": 1000,
    "apply_chat_template": False,
}


def test_a_renamed_eval_key_is_refused_naming_its_new_name(tmp_path):
    # On the command line: before Hydra composes (its own error would not name the new key).
    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "debug=fast", "eval=lm_eval", "eval.limit=4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}"}
    out = forked.run(
        [*command, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == EXIT_REFUSED, out.stderr[-3000:]
    assert out.stderr.startswith(
        "refused: eval.limit is now eval.benchmarks.limit (eval.benchmarks.limit=4): the lm-eval settings "
        "moved into eval.benchmarks"
    ), out.stderr[-3000:]
    assert not run_dir.exists()
    # In a YAML file (one's own preset): the start's config check.
    with pytest.raises(ConfigError, match=r"^eval.num_fewshot is now eval.benchmarks.num_fewshot \("):
        check_config(compose_cfg(["debug=fast", "eval=lm_eval", "+eval.num_fewshot={gsm8k: 5}"]))


@pytest.mark.parametrize("evaluation", ["default", "lm_eval"])
def test_a_run_recorded_before_the_benchmarks_moved_restarts_and_cards_read_it(evaluation, tmp_path):
    now = redact(OmegaConf.to_container(compose_cfg(["debug=fast", f"eval={evaluation}"]), resolve=True))
    before = {**now, "eval": {k: v for k, v in now["eval"].items() if k != "benchmarks"}}
    if evaluation == "lm_eval":
        before["eval"] |= OLD_LM_EVAL
    assert check_restart(renamed_settings(before), now, finished=1, started=1) == []
    if evaluation == "lm_eval":  # a benchmark setting changed since is refused, under its new name
        changed = {**before, "eval": {**before["eval"], "limit": 8}}
        with pytest.raises(ConfigError, match="eval.benchmarks.limit: 8 when the run was started, None now"):
            check_restart(renamed_settings(changed), now, finished=1, started=1)
        (tmp_path / "run_config.yaml").write_text(yaml.safe_dump(changed))
        assert Run(tmp_path).benchmarks()["limit"] == 8  # what the model card says
    else:
        (tmp_path / "run_config.yaml").write_text(yaml.safe_dump(before))
        assert Run(tmp_path).benchmarks() == {}


def overrides_of(path: Path) -> list[str]:
    """The groups a config file's defaults list overrides (`- override /generation@...: static`)."""
    defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
    keys = [k for entry in defaults if isinstance(entry, dict) for k in entry if k.startswith("override /")]
    return [k.removeprefix("override /").split("@")[0] for k in keys]


def test_a_choice_made_by_another_groups_config_is_named():
    from hydra import initialize_config_dir

    from spinlab.config import picked_choices

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        gpu = picked_choices("train", ["trainer=gpu"])
        chosen = picked_choices("train", ["trainer=gpu", "generation=hf"])
        zephyr = picked_choices("train", ["model=zephyr"])
        files = {(p.parent.name, p.stem): overrides_of(p) for p in CONF.glob("*/*.yaml")}
        found = {(g, o): picked_choices("train", [f"{g}={o}"]) for (g, o), groups in files.items() if groups}
    assert gpu == {
        "generation": {"choice": "static", "by": "trainer=gpu", "file": str(CONF / "trainer/gpu.yaml")}
    }
    assert chosen == {}  # the command line's choice is the user's own
    assert {g: (p["choice"], p["by"]) for g, p in zephyr.items()} == {
        "trainer": ("fsdp", "model=zephyr"),
        "generation": ("static", "trainer=fsdp"),  # a pick of a pick
    }
    # Every config that overrides another group's choice is seen doing it.
    assert {("trainer", "gpu"), ("trainer", "fsdp"), ("objective", "sft"), ("debug", "fast")} <= set(found)
    for (group, option), picks in found.items():
        for picked in files[group, option]:
            assert picks[picked]["by"] == f"{group}={option}", (group, option, picks)


def test_a_run_says_and_records_what_another_group_picked_and_an_older_run_restarts(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "debug=fast", "objective=sft", "rounds=1", "~eval"]
    command += ["data.num_prompts=4", f"hydra.run.dir={run_dir}"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}",
    }
    out = forked.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    said = [
        line.split(" - ", 1)[1]
        for line in (run_dir / "train.log").read_text().splitlines()
        if "picked by" in line
    ]
    assert said == [
        "model=tiny, picked by debug=fast (conf/debug/fast.yaml); set model=... on the command line to "
        "choose another (hf, smollm2_135m, tiny, zephyr)",
        "pairs=real, picked by objective=sft (conf/objective/sft.yaml); set pairs=... on the command line to "
        "choose another (real, synthetic, triplets)",
    ]
    picked = {
        "model": {"choice": "tiny", "by": "debug=fast"},
        "pairs": {"choice": "real", "by": "objective=sft"},
    }
    for record in ("run_config.yaml", ".hydra/config.yaml"):
        assert yaml.safe_load((run_dir / record).read_text())["picked"] == picked
    # A run started before `picked` was recorded restarts (here: finds its one round done).
    settings = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    del settings["picked"]
    (run_dir / "run_config.yaml").write_text(yaml.safe_dump(settings))
    again = forked.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and "all 1 rounds of" in again.stdout, again.stderr[-3000:]
    assert yaml.safe_load((run_dir / "run_config.yaml").read_text())["picked"] == picked
