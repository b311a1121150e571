"""generation=vllm on vLLM's CPU build: the same rows as generation=hf, seeds per request, resume.

The engine runs under the interpreter in SPINLAB_VLLM_PYTHON (`make test` sets it to
.venv-vllm/bin/python). Without it, or on a CPU the build cannot run on, these tests skip and
say why. vLLM's CPU attention takes head sizes of 32 and up: the tiny model here has 2 heads of 32.
Every test that starts an engine is `slow` (the first start in a test process imports torch and
vLLM, 10-20 s on 2 shared cores; the later ones are forks of a process that has: `vllm_python`);
CI runs them.
"""

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import spinlab.run
from spinlab.collective import generate_rows, policy_weights
from spinlab.generation import HFGenerator
from spinlab.generation.vllm import VLLMGenerator
from spinlab.models import tiny_model
from spinlab.rundir import RunDir
from tests import forked
from tests.conftest import ROOT, compose_cfg
from tests.test_faults import env
from tests.test_generation_backends import (
    PROMPTS,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    by_index,
    chi_square_p,
    collect,
    encode,
    eos_model,
    reference,
    two_token_distribution,
)

SHAPE = {"num_heads": 2, "num_kv_heads": 1}
TINY_VLLM = ["model.num_heads=2", "model.num_kv_heads=1"]
_cannot_run: list[str] = []  # why vLLM cannot run on this CPU, once a test has found out
# What an engine's process imports: once, by the zygote its engines are forked from.
VLLM_IMPORTS = ("vllm:LLM", "vllm:SamplingParams", "vllm.platforms:current_platform")
_zygotes: dict[str, forked.Zygote] = {}


def vllm_python() -> str:
    """The `python` that runs vLLM: the shim of a zygote of SPINLAB_VLLM_PYTHON that has imported
    vLLM (tests/forked.py), so that an engine's process, a fork of it, does not import torch and
    vLLM again (about 9 of the 11 CPU-seconds an engine takes to start here). The engine's process
    is otherwise as generation=vllm starts it: its own process, with its stdin, stdout, stderr,
    environment and directory, killed with its parent or by a SIGKILL to its `python`. The README's
    command runs the interpreter itself (`fresh_vllm_python`), as a user's run does."""
    path = fresh_vllm_python()
    if path not in _zygotes:
        _zygotes[path] = forked.Zygote(preload=VLLM_IMPORTS, python=path)
        atexit.register(_zygotes[path].close)
    return str(_zygotes[path].python)


def fresh_vllm_python() -> str:
    """SPINLAB_VLLM_PYTHON itself; skips, saying why, where it is missing or vLLM cannot run."""
    value = os.environ.get("SPINLAB_VLLM_PYTHON")
    if not value:
        pytest.skip("SPINLAB_VLLM_PYTHON is not set (`make test` sets it to .venv-vllm/bin/python)")
    path = Path(value) if Path(value).is_absolute() else ROOT / value
    if not path.exists():
        pytest.skip(f"SPINLAB_VLLM_PYTHON={value} does not exist: `make .venv-vllm/.installed` builds it")
    if _cannot_run:
        pytest.skip(_cannot_run[0])
    return str(path)


@contextlib.contextmanager
def cpu_permitting():
    """Skip, saying why, when the engine dies because vLLM's CPU build cannot run on this CPU."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if "exit code -4" in text or "Illegal instruction" in text or "Failed to infer device type" in text:
            _cannot_run.append(f"vLLM's CPU build cannot run on this CPU ({cpu_name()}): {text[-400:]}")
            pytest.skip(_cannot_run[0])
        raise


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def engine(**kwargs) -> VLLMGenerator:
    return VLLMGenerator(python=vllm_python(), kv_cache_space_gib=1, enforce_eager=True, **kwargs)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    loaded = eos_model(**SHAPE)
    path = tmp_path_factory.mktemp("model")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return loaded, path


# -- fails at start without vLLM (runs everywhere) ---------------------------------------------------
def test_vllm_missing_for_the_interpreter_fails_at_start_with_no_side_effects(tmp_path, monkeypatch):
    cfg = compose_cfg(
        ["debug=fast", "generation=vllm", f"generation.python={sys.executable}"], tmp_path / "run"
    )
    loads = []
    monkeypatch.setattr("spinlab.models.LoadedModel.model", property(lambda self: loads.append(1)))
    started = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        spinlab.run.run(cfg)
    seconds = time.perf_counter() - started
    message = str(err.value)
    assert f"vLLM is not importable by generation.python={sys.executable!r}" in message
    assert "pip install vllm" in message and "generation=hf" in message
    assert seconds < 10 and not loads
    assert not (tmp_path / "run").exists()


def test_an_interpreter_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(RuntimeError, match="generation.python='/nonexistent/python' is not an interpreter"):
        VLLMGenerator(python="/nonexistent/python")


# -- one phase at a time, straight through the generator ---------------------------------------------
@pytest.mark.slow
def test_greedy_vllm_equals_hf_on_every_prompt(saved_model):
    loaded, path = saved_model
    prompts = encode(loaded.tokenizer, PROMPTS)
    expected = by_index(
        collect(HFGenerator(max_new_tokens=12, batch_size=4, do_sample=False), loaded, prompts)[0]
    )
    assert expected == reference(loaded, prompts, max_new_tokens=12)
    # All three endings: EOS at once, EOS after a few tokens, the length limit.
    assert expected[PROMPTS.index("ab z")]["synthetic"] == "" and expected[PROMPTS.index("ab z")]["finished"]
    assert expected[PROMPTS.index("xy")]["synthetic"] == "z"
    assert sum(not r["finished"] for r in expected.values()) >= 3
    gen = engine(max_new_tokens=12, batch_size=4, do_sample=False)
    # In a session (a round's start: its synthetic responses, then its held-out pairs'), a later
    # phase on the same weights runs on the first one's engine, which has room for the session's
    # longest prompt; the engine goes with the session.
    longer = encode(loaded.tokenizer, ["the quick brown fox jumps over the lazy dog " * 2])
    with cpu_permitting(), gen.session(longest_prompt=max(map(len, longer))):
        rows, stats = collect(gen, loaded, prompts, weights=path)
        [pid] = engines_of(Path.cwd(), parent=os.getpid())
        second, stats_second = collect(gen, loaded, longer, weights=path, round_index=1)
        assert engines_of(Path.cwd(), parent=os.getpid()) == [pid]
    assert engines_of(Path.cwd(), parent=os.getpid()) == []
    assert by_index(rows) == expected
    assert stats["backend"] == "vllm" and stats["responses"] == len(PROMPTS)
    assert stats["new_tokens"] == sum(r["tokens"] + r["finished"] for r in expected.values())
    assert 0 < stats["engine_start_seconds"] < stats["seconds"]
    assert (stats["engine_reused"], stats_second["engine_reused"]) == (False, True)
    assert second == collect(HFGenerator(max_new_tokens=12, batch_size=4, do_sample=False), loaded, longer)[0]


def test_an_engine_is_kept_only_for_a_phase_it_can_run():
    """Child.takes: the same weights and engine settings, alive, room for the phase's longest
    prompt and response; anything else starts an engine of its own."""
    from spinlab.generation.vllm import Child

    child = Child.__new__(Child)
    child.model, child.engine = "/w/round_0", {"dtype": "float32", "max_model_len": 100, "max_num_seqs": 8}
    child.proc = SimpleNamespace(poll=lambda: None)
    job = {"model": "/w/round_0", "engine": {"dtype": "float32", "max_model_len": 60, "max_num_seqs": 8}}
    assert child.takes(job, 100)
    assert not child.takes(job, 101)  # no room
    assert not child.takes({**job, "model": "/w/round_1"}, 50)  # other weights
    assert not child.takes({**job, "engine": {**job["engine"], "dtype": "bfloat16"}}, 50)
    child.proc = SimpleNamespace(poll=lambda: -9)
    assert not child.takes(job, 50)  # dead


@pytest.mark.slow
def test_seeded_sampling_gives_the_same_rows_across_runs_batches_and_a_resume(saved_model):
    loaded, path = saved_model
    # "hello" twice: the seed follows the prompt's index, so the two get different samples. The
    # long prompts, 4,800 tokens together, exceed vLLM's default prefill budget per step (4,096).
    long = [f"{i} " + "the quick brown fox jumps. " * 11 for i in range(16)]
    texts = [*PROMPTS, *long, "hello", "hello"]
    prompts = encode(loaded.tokenizer, texts)
    settings = dict(max_new_tokens=10, do_sample=True, seed=5)
    with cpu_permitting():
        first = by_index(
            collect(engine(batch_size=4, **settings), loaded, prompts, weights=path, round_index=1)[0]
        )
    assert first[len(texts) - 1]["synthetic"] != first[len(texts) - 2]["synthetic"]
    assert first != by_index(
        collect(HFGenerator(max_new_tokens=10, batch_size=4, do_sample=False), loaded, prompts)[0]
    )

    # Other blocks, an engine that decodes 2 requests at a time, killed after its first block.
    other = engine(batch_size=3, max_num_seqs=2, **settings)
    written = []

    def kill_the_engine_after_one_block(rows):
        if not written:
            for pid in engines_of(Path.cwd(), parent=os.getpid()):
                os.kill(pid, signal.SIGKILL)
        written.extend(rows)

    with pytest.raises(RuntimeError, match="stopped with exit code -9 before every response") as err:
        other.generate(
            loaded.model,
            loaded.tokenizer,
            prompts,
            kill_the_engine_after_one_block,
            weights=path,
            round_index=1,
        )
    assert "running the same command again resumes" in str(err.value)
    assert 0 < len(written) < len(texts)
    rest, stats = collect(
        other, loaded, prompts, weights=path, round_index=1, done={r["index"] for r in written}
    )
    assert stats["responses"] == len(texts) - len(written)
    assert by_index(written + rest) == first


@pytest.mark.slow
def test_sampling_matches_the_models_probabilities(tmp_path):
    loaded = eos_model(**SHAPE)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(3.0)
    loaded.model.save_pretrained(tmp_path)
    ids = encode(loaded.tokenizer, ["hello"])[0]
    expected = two_token_distribution(loaded, ids, TEMPERATURE, TOP_K, TOP_P)
    wrong = two_token_distribution(loaded, ids, 1.0, TOP_K, TOP_P)
    n = 3000
    gen = engine(max_new_tokens=2, batch_size=500, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, seed=3)
    with cpu_permitting():
        rows, _ = collect(gen, loaded, [ids] * n, weights=tmp_path)
    assert sorted(r["index"] for r in rows) == list(range(n))
    for r in rows:
        assert (r["tokens"], r["finished"]) == (2, False) or (r["tokens"] < 2 and r["finished"])
    counts = Counter((r["synthetic"], r["finished"]) for r in rows)
    assert chi_square_p(counts, expected, n) > 1e-4
    assert chi_square_p(counts, wrong, n) < 1e-6


@pytest.mark.slow
def test_lora_policy_runs_as_a_merged_copy(tmp_path):
    loaded = tiny_model(seed=0, lora={"r": 4, "alpha": 8}, **SHAPE)
    model, tok = loaded.model, loaded.tokenizer
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the answers
    prompts = encode(tok, PROMPTS)
    greedy = HFGenerator(max_new_tokens=8, batch_size=4, do_sample=False)
    expected = by_index(collect(greedy, loaded, prompts)[0])
    with model.disable_adapter():
        assert by_index(collect(greedy, loaded, prompts)[0]) != expected
    module = SimpleNamespace(
        policy=model, sharded=False, gather_for_generation=True, full_state_dict=lambda: None
    )
    run_dir = RunDir(tmp_path / "run")
    with cpu_permitting():
        out = generate_rows(
            None,
            module,
            engine(max_new_tokens=8, batch_size=4, do_sample=False),
            tok,
            prompts,
            round_index=0,
            desc="lora",
            weights=lambda: policy_weights(None, module, tok, run_dir, 0),
        )
    assert out["rows"] == expected
    saved = load_file(run_dir.root / "engine" / "policy_after_000" / "model.safetensors")
    assert saved and not any("lora" in k for k in saved)
    assert type(model).__name__.startswith("Peft")  # the policy itself keeps its adapters


# -- whole runs -------------------------------------------------------------------------------------
def vllm_command(run_dir: Path, *overrides) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "debug=fast",
        *TINY_VLLM,
        "generation=vllm",
        f"generation.python={vllm_python()}",
        "generation.kv_cache_space_gib=1",
        "generation.enforce_eager=true",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]


def engines_of(cwd: Path, parent: int | None = None) -> list[int]:
    """Engine processes running from `cwd` (and started by `parent`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if b"vllm_child.py" not in (proc / "cmdline").read_bytes() or (proc / "cwd").resolve() != cwd:
                continue
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent is None or ppid == parent:
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


@pytest.mark.slow
def test_sigkill_during_a_vllm_phase_then_rerun_gives_one_row_per_prompt(tmp_path):
    run_dir = tmp_path / "run"
    prompts = 16
    command = vllm_command(
        run_dir,
        "rounds=1",
        f"data.num_prompts={prompts}",
        "generation.batch_size=2",
        "generation.max_num_seqs=2",  # 2 requests at a time: the phase lasts long enough to cut
        "eval.heldout_pairs=4",
        "eval.task_prompts=4",
        "eval.max_new_tokens=16",
    )
    proc = forked.Popen(command, env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = run_dir / "rounds" / "round_000" / "synthetic.partial.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if partial.exists() and partial.read_text().count("\n") >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    cut = len(partial.read_text().splitlines())
    assert 2 <= cut < prompts
    time.sleep(1)
    assert engines_of(tmp_path) == []  # the engine died with its parent

    out = forked.run(command, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # One engine for the round's start (the rest of its synthetic responses, then the held-out
    # pairs'), one for the evaluation on the trained policy.
    log = out.stdout + out.stderr
    assert (log.count("generation=vllm: engine process"), log.count("kept for the next phase")) == (3, 1), log
    rows = [json.loads(line) for line in (run_dir / "rounds" / "round_000" / "synthetic.jsonl").open()]
    assert len(rows) == prompts
    stats = json.loads((run_dir / "rounds" / "round_000" / "stats.json").read_text())["generation"]
    assert stats["backend"] == "vllm" and stats["responses"] == prompts - cut  # the rerun made only the rest
    assert (run_dir / "engine" / "policy_after_000" / "config.json").exists()  # model=tiny, saved once

    # The evaluator's greedy answers, on the trained policy: the same as generate on hf/round_000.
    answers = [json.loads(line) for line in (run_dir / "rounds" / "round_000" / "task_answers.jsonl").open()]
    assert len(answers) == 4
    hf_dir = run_dir / "hf" / "round_000"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = [
        tok.apply_chat_template([{"role": "user", "content": a["prompt"]}], add_generation_prompt=True)
        for a in answers
    ]
    ids = [i["input_ids"] if hasattr(i, "keys") else i for i in ids]
    loaded = SimpleNamespace(model=model, tokenizer=tok)
    expected = by_index(
        collect(HFGenerator(max_new_tokens=16, batch_size=4, do_sample=False), loaded, ids)[0]
    )
    assert [a["response"] for a in answers] == [expected[i]["synthetic"] for i in range(4)]


@pytest.mark.slow
def test_fsdp_cpu_two_processes_generate_with_their_own_engines_for_two_rounds(tmp_path):
    run_dir = tmp_path / "run"
    command = vllm_command(
        run_dir, "trainer=fsdp_cpu", "data.batch_size=2", "eval.heldout_pairs=0", "eval.task_prompts=0"
    )
    out = forked.run(command, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for index in (0, 1):
        rows = [
            json.loads(line)
            for line in (run_dir / "rounds" / f"round_{index:03d}" / "synthetic.jsonl").open()
        ]
        assert len(rows) == 16
        stats = json.loads((run_dir / "rounds" / f"round_{index:03d}" / "stats.json").read_text())[
            "generation"
        ]
        assert stats["backend"] == "vllm" and stats["responses"] == 16
    assert (run_dir / "hf" / "round_001" / "model.safetensors").exists()
    assert engines_of(tmp_path) == []


def test_the_vllm_config_composes_and_instantiates():
    cfg = compose_cfg(["generation=vllm", f"generation.python={vllm_python()}", "seed=7"])
    gen = instantiate(cfg.generation)
    assert isinstance(gen, VLLMGenerator) and gen.backend == "vllm" and gen.seed == 7
    assert gen.vllm_origin.endswith("vllm/__init__.py")
    assert gen.engine_kwargs["gpu_memory_utilization"] == 0.5 and gen.engine_kwargs["skip_tokenizer_init"]
    assert gen.dtype is None and gen.max_model_len is None  # the policy's dtype; measured per phase


@pytest.mark.slow
def test_a_model_vllm_cannot_run_is_named_with_generation_hf_as_the_way_out(tmp_path):
    # Heads of 16 (model=tiny's default): vLLM's CPU attention takes 32 and up.
    loaded = eos_model()
    assert loaded.model.config.head_dim < 32
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    prompts = encode(loaded.tokenizer, PROMPTS)
    with cpu_permitting(), pytest.raises(RuntimeError) as err:
        collect(engine(batch_size=4, max_new_tokens=4), loaded, prompts, weights=tmp_path)
    assert "generation=hf" in str(err.value)
