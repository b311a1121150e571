import torch

from spinlab.generation import HFGenerator
from spinlab.models import tiny_model

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


def test_static_cache_generates_what_the_dynamic_cache_does():
    loaded = tiny_model(seed=0)
    dynamic = collect(HFGenerator(max_new_tokens=10, batch_size=3, do_sample=False), loaded)
    static = collect(
        HFGenerator(max_new_tokens=10, batch_size=3, do_sample=False, cache_implementation="static"), loaded
    )
    assert {i: r["synthetic"] for i, r in static.items()} == {i: r["synthetic"] for i, r in dynamic.items()}
    assert all(r["tokens"] > 0 for r in static.values())
