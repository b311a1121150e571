"""generation=static's own decode loop: its random numbers, EOS checks, graph check, batch sizing."""

import json
import logging

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

import spinlab.generation.static as static_backend
import spinlab.run
from spinlab.generation import HFGenerator, StaticCacheGenerator
from spinlab.generation.static import (
    _mix32,
    _row_bytes,
    _StaticDecoder,
    _uniform,
    _unsupported,
    left_pad,
)
from spinlab.models import tiny_model
from tests.conftest import compose_cfg
from tests.helpers import Crash
from tests.test_generation_backends import PROMPTS, by_index, collect, encode, eos_model, reference


def test_the_hash_is_the_same_on_ints_and_tensors_and_spreads_its_input():
    values = [0, 1, 2, 12345, 2**31 - 1, 2**32 - 1]
    hashed = _mix32(torch.tensor(values))
    assert hashed.tolist() == [_mix32(v) for v in values]
    assert all(0 <= h < 2**32 for h in hashed.tolist())
    assert len(set(hashed.tolist())) == len(values)
    # Neighbouring inputs differ in about half of the 32 output bits.
    flips = [bin(_mix32(v) ^ _mix32(v + 1)).count("1") for v in range(1000)]
    assert 14 < sum(flips) / len(flips) < 18


def test_a_rows_random_numbers_depend_on_key_prompt_and_step_only():
    key, step = _mix32(7), torch.tensor([3])
    alone = _uniform(key, torch.tensor([9]), step)
    with_others = _uniform(key, torch.tensor([5, 9, 11]), step)
    assert with_others[1] == alone[0]
    assert with_others[0] != alone[0]
    assert _uniform(key, torch.tensor([9]), torch.tensor([4])) != alone
    assert _uniform(_mix32(8), torch.tensor([9]), step) != alone


def test_the_random_numbers_are_uniform_on_0_1():
    index = torch.arange(20000).repeat_interleave(10)
    step = torch.arange(10).repeat(20000)
    u = _uniform(_mix32(1), index, step)
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    counts = torch.bincount((u * 50).long(), minlength=50).double()
    expected = len(u) / 50
    stat = ((counts - expected) ** 2 / expected).sum()
    p = torch.special.gammaincc(torch.tensor(49 / 2, dtype=torch.float64), stat / 2).item()
    assert p > 1e-4
    # Consecutive steps of a row are not correlated.
    rows = u.view(20000, 10)
    assert abs(torch.corrcoef(rows[:, :2].T)[0, 1]) < 0.03


def test_a_prompts_draws_do_not_depend_on_its_batch():
    loaded = eos_model()
    prompts = encode(loaded.tokenizer, PROMPTS)
    kw = {"max_new_tokens": 8, "do_sample": True, "seed": 4, "pad_to_multiple_of": 32}
    alone = by_index(collect(StaticCacheGenerator(batch_size=1, **kw), loaded, prompts, round_index=1)[0])
    together = by_index(collect(StaticCacheGenerator(batch_size=11, **kw), loaded, prompts, round_index=1)[0])
    assert alone == together
    other_round = by_index(
        collect(StaticCacheGenerator(batch_size=11, **kw), loaded, prompts, round_index=2)[0]
    )
    assert sum(other_round[i] != alone[i] for i in alone) >= 6


# Every prompt ends in `y` (then "z", EOS) or `z` (EOS at once): all rows end within 2 tokens.
ENDING = ["xy", "ab z", "y", "hello z", "z", "abcy"]


@pytest.mark.parametrize(("every", "synced", "steps"), [(4, False, 3), (16, False, 15), (4, True, 39)])
def test_eos_is_read_every_k_steps_and_a_sharded_policy_runs_every_step(every, synced, steps):
    loaded = eos_model()
    prompts = encode(loaded.tokenizer, ENDING)
    gen = StaticCacheGenerator(max_new_tokens=40, batch_size=6, do_sample=False, eos_check_every=every)
    rows, stats = collect(gen, loaded, prompts, synced=synced)
    assert by_index(rows) == reference(loaded, prompts, max_new_tokens=40)
    assert all(r["finished"] and r["tokens"] <= 1 for r in rows)
    assert stats["decode_steps"] == steps and stats["loop"] == "spinlab" and not stats["cuda_graph"]


class CachelessGraph:
    """Stands in for a CUDA graph on CPU, computed another way than the eager step: a replay
    scores the whole sequence so far (the batch's prompts and the tokens written) without the KV
    cache, samples from those logits and advances the step's state as `step` does. `corrupt`:
    "tokens" overwrites the sampled tokens with 0, "logits" adds 1 to every logit (the same tokens,
    since sampling ignores a shift, so only the logits comparison can see it)."""

    def __init__(self, decoder, batch, corrupt=None):
        self.decoder, self.batch, self.corrupt = decoder, batch, corrupt
        self.logits = None

    def record(self):
        self.logits = torch.zeros(self.decoder.shape[0], self.decoder.model.config.vocab_size)
        return self, self.logits

    def replay(self):
        d = self.decoder
        rows, width, _ = d.shape
        ids, mask = left_pad(self.batch["prompts"], width, d.pad)
        written = int(d.step_no)
        attention = torch.cat([mask, torch.ones(rows, written, dtype=mask.dtype)], 1)
        logits = d.model(
            input_ids=torch.cat([ids, d.out[:, :written]], 1),
            attention_mask=attention,
            position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        ).logits[:, -1]
        self.logits.copy_(logits + 1.0 if self.corrupt == "logits" else logits)
        d.attend.index_fill_(1, d.slot, True)
        d.pos += 1
        d.slot += 1
        d._emit(self.logits)
        if self.corrupt == "tokens":
            d.last.fill_(0)


def decode(loaded, prompts, graph, corrupt=None, do_sample=True, max_new_tokens=10):
    """Tokens per prompt index from the static loop, its decode step eager or replayed by CachelessGraph."""
    gen = StaticCacheGenerator(
        max_new_tokens=max_new_tokens, batch_size=4, do_sample=do_sample, seed=2, pad_to_multiple_of=4
    )
    tok = loaded.tokenizer
    decoder = _StaticDecoder(
        loaded.model,
        gen.generation_config(loaded.model, tok.eos_token_id, tok.pad_token_id),
        gen,
        graph,
        False,
    )
    batch = {}
    decoder._record = lambda: CachelessGraph(decoder, batch, corrupt).record()
    loaded.model.eval()
    out = {}
    for indices in gen.batches(prompts):
        batch["prompts"] = [prompts[i] for i in indices]
        out.update(zip(indices, decoder.run(batch["prompts"], indices, key=_mix32(3)), strict=True))
    return out, decoder.stats


def as_rows(tok, tokens):
    """Decoded tokens per prompt index in the form `reference` gives: cut at EOS."""
    rows = {}
    for i, ids in tokens.items():
        finished = tok.eos_token_id in ids
        ids = ids[: ids.index(tok.eos_token_id)] if finished else ids
        rows[i] = {"index": i, "synthetic": tok.decode(ids, skip_special_tokens=True), "tokens": len(ids)}
        rows[i]["finished"] = finished
    return rows


@pytest.mark.parametrize("do_sample", [True, False])
def test_a_checked_graph_replays_the_eager_loop_and_a_wrong_one_is_dropped(do_sample, caplog):
    loaded = eos_model()
    prompts = encode(loaded.tokenizer, PROMPTS)
    eager, stats = decode(loaded, prompts, graph=False, do_sample=do_sample)
    assert not stats["cuda_graph"] and stats["graph_captures"] == 0
    if not do_sample:  # the eager loop itself: greedy as `generate` on each prompt alone
        assert as_rows(loaded.tokenizer, eager) == reference(loaded, prompts, max_new_tokens=10)
    # The replays compute each step without the cache: equal tokens only if the eager loop's
    # cache, positions and mask are right, and the state is restored after the graph check.
    replayed, stats = decode(loaded, prompts, graph=True, do_sample=do_sample)
    assert replayed == eager
    # Batches of widths 20, 4 and 4 (that one of 3 rows): three shapes, one capture each.
    assert stats["cuda_graph"] and stats["graph_captures"] == 3 and stats["cache_lengths"] == [30, 14, 14]
    for corrupt, differs in [("tokens", "4 of 4 tokens differ"), ("logits", "0 of 4 tokens differ")]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spinlab.generation"):
            fallen_back, stats = decode(loaded, prompts, graph=True, corrupt=corrupt, do_sample=do_sample)
        assert fallen_back == eager
        assert not stats["cuda_graph"] and stats["graph_captures"] == 0
        assert "replay 1 of the captured decode step differs" in caplog.text and differs in caplog.text
        assert "decoding eagerly" in caplog.text


@pytest.mark.parametrize("max_new_tokens", [2, 3])
def test_a_graph_is_checked_even_when_fewer_steps_are_left_than_the_check_takes(max_new_tokens):
    loaded = eos_model()
    prompts = encode(loaded.tokenizer, PROMPTS)
    eager, _ = decode(loaded, prompts, graph=False, max_new_tokens=max_new_tokens)
    replayed, stats = decode(loaded, prompts, graph=True, max_new_tokens=max_new_tokens)
    assert replayed == eager and stats["cuda_graph"]
    assert all(len(row) == max_new_tokens for row in replayed.values())


def test_a_generation_config_with_other_logits_processors_falls_back_to_generate(caplog):
    loaded = eos_model()
    loaded.model.generation_config.repetition_penalty = 1.5
    prompts = encode(loaded.tokenizer, PROMPTS)
    hf = by_index(collect(HFGenerator(max_new_tokens=12, batch_size=4, do_sample=False), loaded, prompts)[0])
    with caplog.at_level(logging.WARNING, logger="spinlab.generation"):
        rows, stats = collect(
            StaticCacheGenerator(max_new_tokens=12, batch_size=4, do_sample=False), loaded, prompts
        )
    assert by_index(rows) == hf and stats["loop"] == "generate"
    assert "repetition_penalty=1.5" in caplog.text and "generate instead" in caplog.text
    loaded.model.generation_config.repetition_penalty = 1.0
    assert (
        by_index(
            collect(StaticCacheGenerator(max_new_tokens=12, batch_size=4, do_sample=False), loaded, prompts)[
                0
            ]
        )
        != hf
    )


def test_models_the_loop_does_not_cover_are_named():
    model = tiny_model(seed=0).model
    config = model.generation_config
    assert _unsupported(model, config, 96) is None
    model.config.sliding_window = 16
    assert "sliding-window attention over 16 tokens, shorter than the cache (96" in _unsupported(
        model, config, 96
    )
    assert _unsupported(model, config, 16) is None  # a window as long as the cache: full attention
    model.config.sliding_window = None
    model.config.layer_types = ["full_attention", "linear_attention"]
    assert "['linear_attention'] layers" in _unsupported(model, config, 16)
    model.config.layer_types = None
    config.no_repeat_ngram_size = 3
    assert _unsupported(model, config, 96) == "the model's generation config sets no_repeat_ngram_size=3"


def test_a_lora_policy_is_decoded_by_the_loop_through_its_peft_wrapper():
    pytest.importorskip("peft")
    loaded = tiny_model(seed=0, lora={"r": 4})
    with torch.no_grad():  # adapters that change the outputs
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prompts = encode(loaded.tokenizer, PROMPTS)
    rows, stats = collect(
        StaticCacheGenerator(max_new_tokens=8, batch_size=4, do_sample=False), loaded, prompts
    )
    hf = collect(HFGenerator(max_new_tokens=8, batch_size=4, do_sample=False), loaded, prompts)[0]
    assert stats["loop"] == "spinlab" and by_index(rows) == by_index(hf)
    with loaded.model.disable_adapter():
        base = collect(HFGenerator(max_new_tokens=8, batch_size=4, do_sample=False), loaded, prompts)[0]
    assert by_index(base) != by_index(hf)


def test_a_rows_bytes_are_its_kv_cache_prefill_and_sampling_buffers():
    model = tiny_model(seed=0).model  # 2 layers, 2 KV heads of 16, hidden 64, MLP 128, fp32
    vocab = model.config.vocab_size
    kv = 2 * 2 * 2 * 16 * 4 * 100
    assert _row_bytes(model, 36, 100) == kv + 36 * (4 * 64 + 3 * 128) * 4 + 16 * vocab


def test_auto_batch_size_takes_its_share_of_free_memory(monkeypatch):
    model = tiny_model(seed=0).model
    gen = StaticCacheGenerator(max_new_tokens=36, batch_size="auto", memory_share=0.5, pad_to_multiple_of=64)
    per_row = _row_bytes(model, 64, 100)
    prompts = [[1] * 50] * 1000
    assert gen.auto_batch_size(model, prompts) == static_backend.AUTO_BATCH_OFF_GPU  # CPU: a fixed size
    monkeypatch.setattr(static_backend, "_free_memory", lambda device: 203 * per_row)
    assert gen.auto_batch_size(model, prompts) == 96  # 101 rows fit, rounded down to a multiple of 8
    assert gen.auto_batch_size(model, prompts[:7]) == 7  # never more than the prompts
    assert gen.auto_batch_size(model, prompts[:300], world=4) == 75  # the prompts per rank
    monkeypatch.setattr(static_backend, "_free_memory", lambda device: per_row)
    with pytest.raises(RuntimeError, match=r"batch_size=auto: one row needs [\d.]+ MiB \(cache length 100\)"):
        gen.auto_batch_size(model, prompts)


def test_auto_batch_size_generates_every_prompt_and_reports_its_size():
    loaded = eos_model()
    prompts = encode(loaded.tokenizer, PROMPTS)
    gen = StaticCacheGenerator(max_new_tokens=6, batch_size="auto", do_sample=False, pad_to_multiple_of=8)
    rows, stats = collect(gen, loaded, prompts)
    assert by_index(rows) == reference(loaded, prompts, max_new_tokens=6)
    assert stats["batch_size"] == 11 and gen.batch_size == "auto"


def test_batch_size_auto_is_for_the_static_loop_only():
    with pytest.raises(ValueError, match="batch_size=auto: generation=hf takes a number"):
        HFGenerator(batch_size="auto")
    with pytest.raises(ValueError, match="needs generation.loop=spinlab"):
        StaticCacheGenerator(batch_size="auto", loop="generate")
    with pytest.raises(ValueError, match="loop must be"):
        StaticCacheGenerator(loop="graph")
    with pytest.raises(ValueError, match="eos_check_every"):
        StaticCacheGenerator(eos_check_every=0)
    with pytest.raises(ValueError, match="an integer >= 1 or auto"):
        StaticCacheGenerator(batch_size="many")
    gen = instantiate(compose_cfg(["generation=static", "generation.batch_size=auto"]).generation)
    assert gen.batch_size == "auto" and gen.loop == "spinlab" and gen.eos_check_every == 16


# -- a whole run killed mid-generation, then run again ---------------------------------------------
def run(path, generator=None):
    cfg = compose_cfg(
        ["debug=fast", "generation=static", "generation.batch_size=4", "rounds=1", "~eval"], path
    )
    with open_dict(cfg):
        if generator is not None:
            cfg.callbacks.self_play.generator = generator
    spinlab.run.run(cfg)
    return cfg


def test_a_killed_static_round_resumes_to_the_uninterrupted_runs_responses(tmp_path):
    cfg = run(tmp_path / "whole")
    whole = (tmp_path / "whole" / "rounds" / "round_000" / "synthetic.jsonl").read_text()
    crashing = {
        **cfg.generation,
        "_target_": "tests.helpers.CrashingGenerator",
        "backend": "spinlab.generation.static.StaticCacheGenerator",
        "crash_round": 0,
        "after": 2,
    }
    with pytest.raises(Crash):
        run(tmp_path / "killed", generator=crashing)
    round_dir = tmp_path / "killed" / "rounds" / "round_000"
    written = [json.loads(line) for p in round_dir.glob("synthetic.partial*.jsonl") for line in p.open()]
    assert len(written) == 8
    run(tmp_path / "killed")
    assert (round_dir / "synthetic.jsonl").read_text() == whole
    assert json.loads((round_dir / "stats.json").read_text())["generation"]["loop"] == "spinlab"


# -- on a GPU: the captured step --------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cuda_graph_decodes_as_the_eager_step_and_greedy_as_generate(dtype):
    loaded = eos_model()
    loaded.model.to(device="cuda", dtype=dtype)
    prompts = encode(loaded.tokenizer, PROMPTS)
    kw = {"max_new_tokens": 12, "batch_size": 4, "pad_to_multiple_of": 8, "eos_check_every": 4}
    for do_sample in (True, False):
        graph_rows, stats = collect(StaticCacheGenerator(do_sample=do_sample, seed=3, **kw), loaded, prompts)
        assert stats["cuda_graph"] and stats["graph_captures"] == 3, stats
        eager_rows, stats = collect(
            StaticCacheGenerator(do_sample=do_sample, seed=3, cuda_graph=False, **kw), loaded, prompts
        )
        assert not stats["cuda_graph"]
        assert by_index(graph_rows) == by_index(eager_rows)
    if dtype == torch.float32:
        hf = collect(HFGenerator(max_new_tokens=12, batch_size=4, do_sample=False), loaded, prompts)[0]
        assert by_index(graph_rows) == by_index(hf)
