"""The model-family matrix: every family of tests/families.py through the log-probs of training and
of the cached opponent, a SPIN round, greedy generation, sharding, LoRA and vLLM, and the support
table of docs/model-families.md kept to what these tests show."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import spinlab.run
from spinlab.data import SelfPlayDataModule
from spinlab.generation import HFGenerator, StaticCacheGenerator
from spinlab.logprobs import chunked_sequence_logps
from spinlab.models import char_tokenizer, module_names, with_lora
from spinlab.module import ResponseScorer, decoder_layers, output_head
from tests.conftest import ROOT, compose_cfg, made_once
from tests.families import (
    FAMILIES,
    MOE_FAMILIES,
    SLIDING,
    SUPPORT,
    SUPPORT_COLUMNS,
    family_config,
    family_model,
    save_family,
)
from tests.helpers import response_logp

NAMES = list(FAMILIES)
PAIRS = [
    {"prompt": "What is 2 + 3?", "real": "2 + 3 = 5. The answer is 5.", "synthetic": "It is 7, I think."},
    {"prompt": "Half of 10?", "real": "10 / 2 = 5.", "synthetic": "Half of 10 is 5. The answer is 5!"},
    {"prompt": "Three times four, then minus one?", "real": "3 * 4 - 1 = 11.", "synthetic": "12"},
]


def column(name: str, heading: str) -> str:
    return SUPPORT[name][SUPPORT_COLUMNS.index(heading)]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    def make(root):
        for name in NAMES:
            save_family(name, root / name)

    root = made_once(tmp_path_factory, "families", make)
    return {name: root / name for name in NAMES}


# -- a. log-probs ------------------------------------------------------------------------------------


def scoring_batch(tokenizer):
    dm = SelfPlayDataModule(source=None, tokenizer=tokenizer, max_length=96, max_prompt_length=48)
    dm.set_pairs(PAIRS)
    return next(iter(dm.scoring_dataloader()))


@pytest.mark.parametrize("name", NAMES)
def test_chunked_logprobs_equal_the_models_own_logits(name):
    tokenizer = char_tokenizer()
    model = family_model(name)
    batch = scoring_batch(tokenizer)
    scorer = ResponseScorer(model, chunk_size=16)
    with torch.no_grad():
        got = scorer(batch)
    assert scorer.chunked_matches is True, "the family's output path is applied, not fallen back from"
    want = torch.tensor(
        [
            response_logp(model, tokenizer, p["prompt"], p[kind])
            for kind in ("real", "synthetic")
            for p in PAIRS
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)

    head = output_head(model)
    transform = {
        "plain": head["bias"] is None and head["scale"] == 1.0 and head["softcap"] is None,
        "bias": head["bias"] is not None,
        "scale": head["scale"] != 1.0,
        "soft-cap": head["softcap"] is not None,
    }
    assert transform[column(name, "output layer")]
    # Without the family's transform the chunked path would be wrong, by a lot: what the check catches.
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        bare = chunked_sequence_logps(hidden.last_hidden_state, head["weight"], batch["labels"], 16)
    if column(name, "output layer") != "plain":
        assert (bare.double() - want).abs().max() > 1.0


class RescaledLlama(LlamaForCausalLM):
    """An output path spinlab does not know: its logits are multiplied after the output layer."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


def test_an_unknown_output_path_falls_back_to_the_models_logits_and_says_so(caplog):
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = RescaledLlama(config).eval()
    scorer = ResponseScorer(model, chunk_size=16)
    with caplog.at_level(logging.WARNING, logger="spinlab.module"), torch.no_grad():
        got = scorer(scoring_batch(tokenizer))
    assert scorer.chunked_matches is False
    assert "RescaledLlama: log-probs through the chunked output layer differ" in caplog.text
    want = [
        response_logp(model, tokenizer, p["prompt"], p[kind]) for kind in ("real", "synthetic") for p in PAIRS
    ]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-4)


# -- b. one SPIN round per family --------------------------------------------------------------------

ROUND = [
    "model=hf",
    "rounds=1",
    "data.num_prompts=8",
    "data.batch_size=4",
    "generation.max_new_tokens=12",
    "generation.batch_size=8",
    "optimizer.lr=1e-3",
    "eval.heldout_pairs=0",
    "eval.task_prompts=0",
    "module.logprob_chunk_size=16",
]


@pytest.mark.parametrize("name", NAMES)
def test_a_spin_round_trains_saves_and_caches_the_opponents_own_logprobs(name, family_dirs, tmp_path):
    start = family_dirs[name]
    summary = spinlab.run.run(compose_cfg([*ROUND, f"model.name_or_path={start}"], tmp_path / "run"))
    assert torch.isfinite(torch.tensor(summary[0]["loss"])) and summary[0]["pairs"] == 8

    saved_dir = tmp_path / "run" / "hf" / "round_000"
    before, after = (
        load_file(str(start / "model.safetensors")),
        load_file(str(saved_dir / "model.safetensors")),
    )
    assert before.keys() == after.keys()
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-4, "the weights moved"

    # The saved directory reloads as the family's own class and gives the trained policy's logits:
    # those of the weights in the Lightning checkpoint, put into a fresh model of the family.
    saved = AutoModelForCausalLM.from_pretrained(saved_dir).eval()
    assert type(saved).__name__ == type(family_model(name)).__name__
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    trained = AutoModelForCausalLM.from_config(family_config(name)).eval()
    trained.load_state_dict(
        {k.removeprefix("scorer.model."): v for k, v in state.items() if k.startswith("scorer.")}
    )
    ids = torch.tensor([[5, 17, 40, 41, 60, 3, 22, 9, 70]])
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, trained(input_ids=ids).logits)

    # The cached opponent log-probs of round 0 are the start model's own, pair by pair.
    opponent = AutoModelForCausalLM.from_pretrained(start).eval()
    # As the run loads it: transformers picks some families' own tokenizer class (Qwen2's drops spaces).
    tokenizer = AutoTokenizer.from_pretrained(start)
    pairs = [
        json.loads(line) for line in (tmp_path / "run" / "rounds" / "round_000" / "synthetic.jsonl").open()
    ]
    cached = torch.load(tmp_path / "run" / "rounds" / "round_000" / "opponent_logps.pt", weights_only=True)
    want = [
        [response_logp(opponent, tokenizer, p["prompt"], p[k]) for k in ("real", "synthetic")] for p in pairs
    ]
    torch.testing.assert_close(cached.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-3)


# -- c. greedy generation ----------------------------------------------------------------------------

PROMPTS = [[5, 17, 40, 41, 60, 22, 9, 70, 33, 34, 35, 36], [20 + i for i in range(20)], [8, 9, 10], [44] * 15]


def greedy_tokens(model, prompts, new_tokens, eos):
    """transformers' greedy generate, one prompt at a time (no padding), cut before EOS."""
    out = []
    for ids in prompts:
        tokens = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )[0, len(ids) :].tolist()
        out.append(tokens[: tokens.index(eos)] if eos in tokens else tokens)
    return out


def greedy_rows(generator, model, tokenizer, prompts):
    rows = {}
    stats = generator.generate(
        model, tokenizer, prompts, lambda batch: rows.update({r["index"]: r for r in batch})
    )
    return [rows[i]["synthetic"] for i in range(len(prompts))], stats


@pytest.mark.parametrize("name", NAMES)
def test_greedy_hf_and_static_equal_generate(name):
    tokenizer = char_tokenizer()
    new = 20
    windows = [None] if name not in SLIDING else [None, 64]  # 64: a window that covers prompt + new tokens
    for window in windows:
        model = family_model(name, **({"sliding_window": window} if window else {}))
        tokens = greedy_tokens(model, PROMPTS, new, tokenizer.eos_token_id)
        want = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]  # the text a row keeps
        hf, _ = greedy_rows(
            HFGenerator(max_new_tokens=new, batch_size=4, do_sample=False), model, tokenizer, PROMPTS
        )
        static = StaticCacheGenerator(max_new_tokens=new, batch_size=2, do_sample=False, pad_to_multiple_of=8)
        rows, stats = greedy_rows(static, model, tokenizer, PROMPTS)
        assert hf == want and rows == want
        loop = stats.get("loop", "spinlab")
        if column(name, "static") == "loop" or window is not None:
            assert loop == "spinlab" and stats["decode_steps"] > 0
        else:  # a window shorter than the cache: transformers' generate with its static cache
            assert loop == "generate" and "sliding-window attention over 32 tokens" in stats["loop_reason"]


# -- d. sharding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_the_decoder_layers_are_found_for_sharding(name):
    model = family_model(name)
    layers = decoder_layers(model)
    assert len(layers) == model.config.get_text_config().num_hidden_layers == 2
    assert {type(layer).__name__ for layer in layers} <= set(model._no_split_modules)
    assert all(sum(p.numel() for p in layer.parameters()) > 0 for layer in layers)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Gemma-2", "Qwen3-MoE"])  # sliding-window + soft-cap; mixture of experts
def test_a_sharded_round_matches_the_single_process_opponent(name, family_dirs, tmp_path):
    from tests.test_sharded import train as sharded_train

    assert name in SLIDING | MOE_FAMILIES
    overrides = [*ROUND, f"model.name_or_path={family_dirs[name]}"]
    # 2 processes of 2 pairs: the single process's global batch of 4
    sharded_train(tmp_path / "sharded", "trainer=fsdp_cpu", *overrides, "data.batch_size=2")
    single = compose_cfg(overrides, tmp_path / "single")
    spinlab.run.run(single)
    for run in ("sharded", "single"):
        assert (tmp_path / run / "hf" / "round_000" / "model.safetensors").exists()
    logps = [
        torch.load(tmp_path / run / "rounds" / "round_000" / "opponent_logps.pt", weights_only=True)
        for run in ("sharded", "single")
    ]
    torch.testing.assert_close(logps[0], logps[1], rtol=1e-4, atol=1e-3)
    summaries = [
        json.loads((tmp_path / run / "summary.json").read_text())[0] for run in ("sharded", "single")
    ]
    assert summaries[0]["pairs"] == summaries[1]["pairs"] == 8
    assert abs(summaries[0]["loss"] - summaries[1]["loss"]) < 1e-3


# -- e. LoRA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_lora_default_targets_exist_in_every_family(name):
    pytest.importorskip("peft")
    config = family_config(name)
    wrapped = with_lora({"r": 2}, lambda: module_names(config), name)(family_model(name))
    targets = set(wrapped.peft_config["default"].target_modules)
    expected = column(name, "LoRA targets")
    stem, _, suffix = expected.partition("_")
    assert targets == {f"{part}_{suffix}" for part in stem.split("/")} if suffix else {expected}
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(
        ValueError, match=r"has no module named \['attn_q'\]; its modules are named \[.*lm_head"
    ):
        with_lora({"r": 2, "target_modules": ["attn_q"]}, lambda: module_names(config), name)


# -- f. vLLM -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_greedy_vllm_equals_hf_in_every_family(family_dirs, tmp_path):
    from tests.test_vllm import cpu_permitting, vllm_python

    python = vllm_python()
    tokenizer = char_tokenizer()
    new = 12
    supported = [n for n in NAMES if column(n, "vllm") == "yes"]
    job = {"models": {n: str(family_dirs[n]) for n in supported}, "prompts": PROMPTS, "new": new, "eos": 3}
    with cpu_permitting():
        got = run_vllm_matrix(python, job, tmp_path)
    for name in supported:
        assert got[name] == greedy_tokens(family_model(name), PROMPTS, new, tokenizer.eos_token_id), name


def run_vllm_matrix(python: str, job: dict, tmp_path) -> dict:
    """Greedy tokens of every model in `job` from one vLLM process (one import, an engine per model)."""
    import subprocess

    from spinlab.generation.vllm import DISTRIBUTED_ENV

    env = {k: v for k, v in __import__("os").environ.items() if k not in DISTRIBUTED_ENV}
    env |= {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(tmp_path),
    }
    script = ROOT / "tests" / "vllm_families.py"
    out = subprocess.run(
        [python, str(script)], input=json.dumps(job), capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"vLLM family check failed (exit code {out.returncode}): {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the support table of docs/model-families.md -----------------------------------------------------


def test_the_support_table_is_what_the_matrix_shows():
    text = (ROOT / "docs" / "model-families.md").read_text()
    header = "| family | " + " | ".join(SUPPORT_COLUMNS) + " |"
    assert header in text, "docs/model-families.md's support table has the matrix's columns"
    table = text[text.index(header) :].split("\n\n", 1)[0].splitlines()[2:]
    rows = {}
    for line in table:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = tuple(re.sub(r"`", "", c) for c in cells[1:])
    assert rows == SUPPORT


def test_a_model_that_is_not_a_causal_lm_is_refused_at_start(tmp_path):
    from transformers import T5Config

    from spinlab.errors import ConfigError
    from spinlab.models import pretrained

    tokenizer = char_tokenizer()
    T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=1, num_heads=2).save_pretrained(
        tmp_path
    )
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(
        ConfigError, match=r"is an encoder-decoder model, which transformers does not load as a causal"
    ):
        pretrained(str(tmp_path))
