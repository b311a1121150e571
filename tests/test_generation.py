import time

import pytest
import torch
from hydra.utils import instantiate

from spinlab.generation import Generator, HFGenerator, StaticCacheGenerator
from spinlab.models import tiny_model
from tests.conftest import CONF, compose_cfg

PROMPTS = ["a", "bbbbbbbb", "cc", "dddd", "e", "ffffff", "g"]


def encoded(tokenizer):
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def collect(gen, loaded, done=frozenset(), round_index=0):
    out = []
    gen.generate(
        loaded.model,
        loaded.tokenizer,
        encoded(loaded.tokenizer),
        out.extend,
        done=done,
        round_index=round_index,
    )
    return {r["index"]: r for r in out}


def test_batches_are_sorted_longest_first_and_cover_every_prompt():
    gen = HFGenerator(batch_size=3)
    plan = gen.batches([[0] * len(p) for p in PROMPTS])
    assert plan == [[1, 5, 3], [2, 0, 4], [6]]


def test_generation_is_seeded_per_batch_so_a_resume_reproduces_it():
    loaded = tiny_model(seed=0)
    gen = HFGenerator(max_new_tokens=12, batch_size=3, seed=5)
    full = collect(gen, loaded)
    assert sorted(full) == list(range(len(PROMPTS)))
    # Batches [1, 5, 3] are on disk already: only the rest is generated, and identically.
    rest = collect(gen, loaded, done={1, 5, 3})
    assert sorted(rest) == [0, 2, 4, 6]
    for i in rest:
        assert rest[i] == full[i]
    # A partly written batch ({2} of [2, 0, 4]) is regenerated, keeping only what is missing.
    part = collect(gen, loaded, done={1, 5, 3, 2})
    assert sorted(part) == [0, 4, 6] and part[0] == full[0]
    # Another round draws other samples.
    other = collect(gen, loaded, round_index=1)
    assert any(other[i]["synthetic"] != full[i]["synthetic"] for i in full)


def test_generation_stops_at_eos_and_restores_train_mode():
    loaded = tiny_model(seed=0)
    eos = loaded.tokenizer.eos_token_id
    # An output layer that always predicts EOS: every response is empty and finished.
    loaded.model.lm_head = torch.nn.Linear(loaded.model.config.hidden_size, len(loaded.tokenizer), bias=True)
    with torch.no_grad():
        loaded.model.lm_head.weight.zero_()
        loaded.model.lm_head.bias.fill_(-100.0)
        loaded.model.lm_head.bias[eos] = 100.0
    loaded.model.train()
    out = collect(HFGenerator(max_new_tokens=8, batch_size=4), loaded)
    assert all(r["synthetic"] == "" and r["finished"] and r["tokens"] == 0 for r in out.values())
    assert loaded.model.training


@pytest.mark.parametrize("loop", ["spinlab", "generate"])
def test_static_cache_generates_what_the_dynamic_cache_does(loop):
    loaded = tiny_model(seed=0)
    dynamic = collect(HFGenerator(max_new_tokens=10, batch_size=3, do_sample=False), loaded)
    static = collect(
        StaticCacheGenerator(max_new_tokens=10, batch_size=3, do_sample=False, loop=loop), loaded
    )
    assert {i: r["synthetic"] for i, r in static.items()} == {i: r["synthetic"] for i, r in dynamic.items()}
    assert all(r["tokens"] > 0 for r in static.values())


def test_greedy_is_a_copy_of_the_backend_that_decodes_greedily():
    gen = StaticCacheGenerator(
        max_new_tokens=64, batch_size=8, temperature=0.7, eos_check_every=4, loop="generate"
    )
    greedy = gen.greedy(max_new_tokens=16, batch_size=4)
    assert type(greedy) is StaticCacheGenerator and (greedy.eos_check_every, greedy.loop) == (4, "generate")
    assert (greedy.do_sample, greedy.max_new_tokens, greedy.batch_size) == (False, 16, 4)
    assert (gen.do_sample, gen.max_new_tokens, gen.batch_size) == (True, 64, 8)
    assert gen.greedy().max_new_tokens == 64


def test_synced_ranks_make_the_same_number_of_generate_calls(monkeypatch):
    """A sharded model needs every rank in every forward pass: the plan is padded with re-runs."""
    loaded = tiny_model(seed=0)
    calls = []
    original = loaded.model.generate

    def recording(**kwargs):
        calls.append(kwargs.pop("synced_gpus"))
        return original(**kwargs)  # one process: nothing to synchronise with

    monkeypatch.setattr(loaded.model, "generate", recording)
    prompts = encoded(loaded.tokenizer)
    gen = HFGenerator(max_new_tokens=4, batch_size=2, do_sample=False)
    assert len(gen.batches(prompts)) == 4  # over 3 ranks: 2, 1 and 1 batches
    per_rank = {}
    for rank in range(3):
        calls.clear()
        out = []
        gen.generate(loaded.model, loaded.tokenizer, prompts, out.extend, shard=(rank, 3), synced=True)
        per_rank[rank] = (len(calls), sorted(r["index"] for r in out))
        assert calls and all(calls)
    plan = gen.batches(prompts)
    assert per_rank == {0: (2, sorted(plan[0] + plan[3])), 1: (2, sorted(plan[1])), 2: (2, sorted(plan[2]))}
    # A rank whose share is on disk already still joins every call, and reports nothing again.
    calls.clear()
    out = []
    gen.generate(
        loaded.model, loaded.tokenizer, prompts, out.extend, done=set(plan[1]), shard=(1, 3), synced=True
    )
    assert (len(calls), out) == (2, [])
    # Unsynced, a rank makes only its own calls.
    calls.clear()
    gen.generate(loaded.model, loaded.tokenizer, prompts, out.extend, shard=(1, 3))
    assert calls == [False]


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="top_p"):
        HFGenerator(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        HFGenerator(temperature=0.0)
    with pytest.raises(ValueError, match="memory_share"):
        StaticCacheGenerator(memory_share=60)


# generation=vllm needs its own interpreter and a model whose heads vLLM's CPU build takes:
# tests/test_vllm.py composes, instantiates and generates with it.
@pytest.mark.parametrize(
    "backend", sorted(p.stem for p in (CONF / "generation").glob("*.yaml") if p.stem != "vllm")
)
def test_every_generation_config_composes_and_generates(backend):
    cfg = compose_cfg([f"generation={backend}", "seed=7", "generation.max_new_tokens=5"])
    gen = instantiate(cfg.generation)
    assert isinstance(gen, Generator) and gen.backend == backend
    assert gen.seed == 7 and gen.do_sample and gen.temperature == 1.0 and gen.top_k == 0
    loaded = tiny_model(seed=0)
    out = []
    started = time.perf_counter()
    stats = gen.generate(loaded.model, loaded.tokenizer, encoded(loaded.tokenizer), out.extend)
    elapsed = time.perf_counter() - started
    assert sorted(r["index"] for r in out) == list(range(len(PROMPTS)))
    assert stats["backend"] == backend and stats["responses"] == len(PROMPTS)
    # A response cut at max_new_tokens has all 5 tokens; a finished one fewer, plus its EOS.
    for r in out:
        assert r["tokens"] + r["finished"] <= 5 and (r["finished"] or r["tokens"] == 5), r
    assert stats["new_tokens"] == sum(r["tokens"] + r["finished"] for r in out)
    assert stats["truncated"] == sum(not r["finished"] for r in out)
    assert 0 < stats["seconds"] <= elapsed
    assert stats["tokens_per_s"] == pytest.approx(stats["new_tokens"] / stats["seconds"], rel=1e-9)


def test_a_mistyped_generation_key_fails_at_instantiation():
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="eos_check_evry"):
        instantiate(compose_cfg(["generation=static", "+generation.eos_check_evry=3"]).generation)
