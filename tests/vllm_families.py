"""Run by tests/test_families.py under vLLM's interpreter: greedy tokens of several models from one
process. Job on stdin: {"models": {name: directory}, "prompts": [[ids]], "new": n, "eos": id};
one JSON line on stdout: {name: [[tokens] per prompt, EOS and after cut]}."""

import gc
import json
import sys

import vllm.model_executor.models.registry as registry
from vllm import LLM, SamplingParams

# vLLM inspects each architecture in a fresh interpreter so as not to initialise CUDA; there is none
# here, and one import per family would cost more than the whole check.
registry._run_in_subprocess = lambda fn: fn()

# The imports' objects frozen, and kept frozen when an engine shuts down (vLLM unfreezes them
# there): each engine's full collections then skip them, half of an engine's start.
gc.freeze()
gc.unfreeze = lambda: None

job = json.loads(sys.stdin.read())
params = SamplingParams(temperature=0.0, max_tokens=job["new"], stop_token_ids=[job["eos"]], detokenize=False)
out = {}
for name, path in job["models"].items():
    llm = LLM(
        model=path,
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=128,
        enable_chunked_prefill=False,
        max_num_batched_tokens=4096,
        enforce_eager=True,
    )
    results = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], params, use_tqdm=False)
    tokens = [list(r.outputs[0].token_ids) for r in results]
    out[name] = [t[: t.index(job["eos"])] if job["eos"] in t else t for t in tokens]
    del llm
print(json.dumps(out))
