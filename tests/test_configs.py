"""Every config in conf/ composes and is instantiated (the README's commands run in test_readme.py)."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from spinlab.callbacks import SelfPlayCallback
from spinlab.config import own_keys
from spinlab.data import SelfPlayDataModule
from spinlab.module import PolicyModule
from spinlab.rounds import round_settings
from spinlab.sources import DataError
from tests.conftest import CONF, compose_cfg

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


def test_generation_config():
    gen = instantiate(compose_cfg(["generation=hf", "seed=7"]).generation)
    assert gen.seed == 7 and gen.do_sample and gen.temperature == 1.0


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


def test_cli_example_values():
    cfg = compose_cfg(["model=tiny", "loss=hinge", "lam=0.5", "rounds=3"])
    assert (cfg.loss._target_, cfg.lam, cfg.rounds, cfg.module.lam) == ("spinlab.losses.hinge", 0.5, 3, 0.5)
    demo = compose_cfg(["experiment=demo"])
    assert demo.model._target_ == "spinlab.models.embedded_smollm2" and demo.rounds == 2


def test_paper_recipe_values():
    cfg = compose_cfg(["experiment=paper_zephyr"])
    assert cfg.optimizer._target_ == "torch.optim.RMSprop" and cfg.optimizer.lr == 5e-7
    assert (cfg.rounds, cfg.epochs_per_round, cfg.lam, cfg.warmup_ratio) == (4, 2, 0.1, 0.1)
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.accumulate_grad_batches == 64
    base = {"lam": cfg.lam, "lr": cfg.optimizer.lr, "mix_previous_rounds": cfg.data.mix_previous_rounds}
    overrides = OmegaConf.to_container(cfg.round_overrides)
    per_round = [round_settings(r, base, overrides) for r in range(4)]
    assert [s["lr"] for s in per_round] == [5e-7, 5e-7, 1e-7, 1e-7]
    assert [s["lam"] for s in per_round] == [0.1, 0.1, 0.1, 5.0]
    assert [s["mix_previous_rounds"] for s in per_round] == [0, 1, 0, 0]


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
    import train

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
    loaded, dm = train.preflight(compose_cfg(overrides))
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

    evaluator = instantiate(compose_cfg([f"eval={evaluation}"]).eval)
    assert isinstance(evaluator, RoundEvaluator)
    harness = evaluator.harness
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
