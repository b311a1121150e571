"""Every generation backend: the same greedy tokens, the model's own sampling distribution, resume."""

import math
from collections import Counter

import pytest
import torch

from spinlab.generation import HFGenerator, StaticCacheGenerator
from spinlab.models import tiny_model

BACKENDS = {
    "hf": lambda **kw: HFGenerator(**kw),
    "static": lambda **kw: StaticCacheGenerator(pad_to_multiple_of=8, eos_check_every=4, **kw),
    "static-generate": lambda **kw: StaticCacheGenerator(loop="generate", pad_to_multiple_of=8, **kw),
}


def eos_model(**shape):
    """The tiny model (`shape`: tiny_model's sizes), made to say varied things, with an EOS that
    some prompts reach early.

    Its layers are scaled up so that the context matters. Hidden coordinates 0 and 1 carry
    nothing but two planted facts, since no layer writes there: the token `y` is followed by `z`
    and `z` by EOS. A prompt ending in `y` gets "z" then EOS, one ending in `z` an empty
    response; others ramble, some into `z` and EOS, some up to the length limit.
    """
    loaded = tiny_model(seed=0, **shape)
    model, tok = loaded.model, loaded.tokenizer
    y, z = tok.convert_tokens_to_ids(["y", "z"])
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:2] = 0
            layer.mlp.down_proj.weight[:2] = 0
        emb = model.model.embed_tokens.weight
        head = emb.detach().clone() * 3
        emb[:, :2] = 0
        head[:, :2] = 0
        emb[y, 0] = emb[z, 1] = 20.0
        head[z, 0] = head[tok.eos_token_id, 1] = 20.0
        model.lm_head.weight = torch.nn.Parameter(head)
    model.config.tie_word_embeddings = False
    return loaded


def encode(tok, texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def collect(gen, loaded, prompts, **kw):
    out = []
    stats = gen.generate(loaded.model, loaded.tokenizer, prompts, out.extend, **kw)
    return out, stats


def by_index(rows):
    assert len({r["index"] for r in rows}) == len(rows), "a prompt was reported twice"
    return {r["index"]: r for r in rows}


PROMPTS = [
    "aaaa",
    "b",
    "cd",
    "hi there",
    "0123456789",
    "a",
    "hello wor",
    "xy",
    "ab z",
    "the quick brown fox",
    "mn",
]


def reference(loaded, prompts, max_new_tokens):
    """Each prompt alone through `generate`, greedy: no padding, no batching."""
    tok, eos = loaded.tokenizer, loaded.tokenizer.eos_token_id
    rows = {}
    for i, ids in enumerate(prompts):
        out = loaded.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )[0, len(ids) :].tolist()
        finished = eos in out
        out = out[: out.index(eos)] if finished else out
        rows[i] = {
            "index": i,
            "synthetic": tok.decode(out, skip_special_tokens=True),
            "tokens": len(out),
            "finished": finished,
        }
    return rows


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_greedy_tokens_are_the_same_on_every_backend(backend):
    loaded = eos_model()
    prompts = encode(loaded.tokenizer, PROMPTS)
    expected = reference(loaded, prompts, max_new_tokens=12)
    # The prompts cover all three endings: EOS at once, EOS after a few tokens, the length limit.
    assert expected[PROMPTS.index("ab z")] == {"index": 8, "synthetic": "", "tokens": 0, "finished": True}
    assert expected[PROMPTS.index("xy")]["synthetic"] == "z" and expected[PROMPTS.index("xy")]["finished"]
    assert any(r["finished"] and r["tokens"] > 1 for r in expected.values())
    cut = [r for r in expected.values() if not r["finished"]]
    assert len(cut) >= 3 and all(r["tokens"] == 12 for r in cut)
    loaded.model.train()
    gen = BACKENDS[backend](max_new_tokens=12, batch_size=4, do_sample=False)
    rows, stats = collect(gen, loaded, prompts)
    assert by_index(rows) == expected
    assert stats["backend"] == backend.split("-")[0] and stats["responses"] == len(PROMPTS)
    assert stats["new_tokens"] == sum(r["tokens"] + r["finished"] for r in expected.values())
    assert stats["truncated"] == len(cut)
    assert loaded.model.training  # the caller's mode is restored
    assert loaded.model.config._attn_implementation == "sdpa"


def test_the_static_loop_under_eager_attention_equals_generate():
    # Eager attention adds the mask to the scores: the loop hands it an additive mask, not booleans.
    loaded = eos_model()
    loaded.model.set_attn_implementation("eager")
    prompts = encode(loaded.tokenizer, PROMPTS[:4])
    rows, stats = collect(
        BACKENDS["static"](max_new_tokens=6, batch_size=2, do_sample=False), loaded, prompts
    )
    assert stats.get("loop", "spinlab") == "spinlab" and stats["decode_steps"] > 0
    assert by_index(rows) == reference(loaded, prompts, max_new_tokens=6)


# -- sampling: each backend draws from the model's own (tempered, truncated) distribution ------------
TEMPERATURE, TOP_K, TOP_P = 0.7, 3, 0.9


def warp(logits, temperature, top_k, top_p):
    """Next-token probabilities under temperature, then top-k, then top-p, written out by hand."""
    logits = logits / temperature
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep[logits.topk(top_k).indices] = True
    probs = torch.where(keep, logits, -math.inf).softmax(-1)
    order = probs.argsort(descending=True)
    above = probs[order].cumsum(0) - probs[order]  # mass of the tokens more likely than each
    keep[order[above >= top_p]] = False
    return torch.where(keep, logits, -math.inf).softmax(-1)


@torch.no_grad()
def two_token_distribution(loaded, ids, temperature, top_k, top_p) -> dict:
    """P(response) for every 2-token response, keyed as the rows report it: (text, finished)."""
    model, tok = loaded.model, loaded.tokenizer
    eos = tok.eos_token_id
    dist = Counter()
    first = warp(model(torch.tensor([ids])).logits[0, -1].double(), temperature, top_k, top_p)
    tokens = [t for t in first.nonzero().flatten().tolist() if t != eos]
    if first[eos] > 0:
        dist[("", True)] += first[eos].item()
    after = model(torch.tensor([[*ids, t] for t in tokens])).logits[:, -1].double() if tokens else []
    for t1, logits in zip(tokens, after, strict=True):
        second = warp(logits, temperature, top_k, top_p)
        for t2 in second.nonzero().flatten().tolist():
            key = (
                tok.decode([t1], skip_special_tokens=True)
                + ("" if t2 == eos else tok.decode([t2], skip_special_tokens=True)),
                t2 == eos,
            )
            dist[key] += first[t1].item() * second[t2].item()
    return dist


def chi_square_p(counts: Counter, expected: dict, n: int) -> float:
    """p-value of Pearson's chi-square test; cells expecting under 5 samples are pooled."""
    small = [k for k, p in expected.items() if p * n < 5]
    observed = {k: counts.get(k, 0) for k in expected if k not in small}
    observed["pooled"] = n - sum(observed.values())
    probs = {k: expected[k] for k in observed if k != "pooled"}
    probs["pooled"] = max(0.0, 1.0 - sum(probs.values()))
    stat = sum((observed[k] - n * p) ** 2 / (n * p) for k, p in probs.items() if p > 0)
    stat += sum(observed[k] for k, p in probs.items() if p == 0) * 1e9  # an impossible response
    df = sum(p > 0 for p in probs.values()) - 1
    return torch.special.gammaincc(
        torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)
    ).item()


@pytest.fixture(scope="module")
def sampling_setup():
    loaded = eos_model()
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(3.0)  # logits far enough apart for the temperature to matter
    ids = encode(loaded.tokenizer, ["hello"])[0]
    expected = two_token_distribution(loaded, ids, TEMPERATURE, TOP_K, TOP_P)
    wrong = two_token_distribution(loaded, ids, 1.0, TOP_K, TOP_P)  # the temperature ignored
    return loaded, ids, expected, wrong


def test_the_sampling_test_distribution_is_spread_and_temperature_matters(sampling_setup):
    _, _, expected, wrong = sampling_setup
    assert sum(expected.values()) == pytest.approx(1.0)
    assert len(expected) >= 4 and max(expected.values()) < 0.6
    assert len(expected) < TOP_K**2  # top-p removed some responses that top-k kept
    tv = 0.5 * sum(abs(expected.get(k, 0) - wrong.get(k, 0)) for k in expected.keys() | wrong.keys())
    assert tv > 0.05


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_sampling_matches_the_models_probabilities(backend, sampling_setup):
    loaded, ids, expected, wrong = sampling_setup
    n = 3000
    gen = BACKENDS[backend](
        max_new_tokens=2,
        batch_size=500,
        do_sample=True,
        temperature=TEMPERATURE,
        top_k=TOP_K,
        top_p=TOP_P,
        seed=3,
    )
    rows, _ = collect(gen, loaded, [ids] * n)
    assert sorted(r["index"] for r in rows) == list(range(n))
    for r in rows:  # valid: two tokens, or fewer and finished at EOS
        assert (r["tokens"], r["finished"]) == (2, False) or (r["tokens"] < 2 and r["finished"])
    counts = Counter((r["synthetic"], r["finished"]) for r in rows)
    assert chi_square_p(counts, expected, n) > 1e-4
    # The same samples against the untempered distribution: the test can tell them apart.
    assert chi_square_p(counts, wrong, n) < 1e-6


# -- a crash during generation, then a rerun with what was written ----------------------------------
class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("do_sample", [True, False])
def test_a_crash_mid_generation_then_a_rerun_gives_one_response_per_prompt(backend, do_sample):
    loaded = eos_model()
    prompts = encode(loaded.tokenizer, PROMPTS)
    gen = BACKENDS[backend](max_new_tokens=10, batch_size=2, do_sample=do_sample, seed=1)
    full = by_index(collect(gen, loaded, prompts, round_index=2)[0])
    written, calls = [], []

    def dies_after_two(rows):
        written.extend(rows)
        calls.append(len(rows))
        if len(calls) == 2:
            raise Crash("killed")

    loaded.model.train()
    with pytest.raises(Crash):
        gen.generate(loaded.model, loaded.tokenizer, prompts, dies_after_two, round_index=2)
    assert loaded.model.training
    assert 0 < len(written) < len(prompts)
    rest, stats = collect(gen, loaded, prompts, done={r["index"] for r in written}, round_index=2)
    assert stats["responses"] == len(rest)
    final = by_index(written + rest)
    assert sorted(final) == list(range(len(prompts)))
    assert final == full  # bit-identical to the uninterrupted run
