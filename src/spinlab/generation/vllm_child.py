"""The child process of `generation=vllm`: one vLLM engine for one or more generation phases.

Run as a script by the interpreter in `generation.python` (vLLM's own environment), so it imports
nothing of spinlab. It reads jobs on stdin, one JSON line each: the weights directory, the engine's
arguments, the sampling settings and the prompts with their seeds. The first job's weights and
engine arguments build the engine; every later job must name the same (the parent starts another
process for other weights). For each job it writes JSON lines on stdout: `{"ready": true}` once the
engine is up, `{"rows": [[index, token_ids], ...]}` each time `block` responses have finished, then
`{"done": true}`. It exits when stdin closes. Everything vLLM prints goes to stderr.
"""

import gc
import json
import os
import signal
import sys

# Python puts this script's folder first on the path, and spinlab's own vllm.py lives there: it
# would stand in for the vllm package.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]


def die_with_parent(parent: int) -> None:
    """A SIGKILL from the kernel when the parent dies: an orphaned engine would hold its memory."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def main() -> None:
    job = json.loads(sys.stdin.readline())
    die_with_parent(job["parent"])
    rows_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    # What the imports made lives as long as the process: frozen, it is skipped by the full
    # collections vLLM runs while building the engine (half of building it, on CPU).
    gc.freeze()

    engine_args = dict(job["engine"])
    if current_platform.is_cpu():
        # A prefill split over steps discards a sampled token and rewinds the request's generator,
        # which CPU generators cannot do ("CPU Generator does not use offset"): whole prefills only.
        engine_args.setdefault("enable_chunked_prefill", False)
        engine_args.setdefault("max_num_batched_tokens", max(engine_args["max_model_len"], 4096))
    try:
        llm = LLM(model=job["model"], **engine_args)
    except Exception as err:
        print(f"SPINLAB_LOAD_FAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    built = (job["model"], job["engine"])
    while job is not None:
        if (job["model"], job["engine"]) != built:
            sys.exit(f"a job for other weights or engine settings than this engine's: {job['model']}")
        rows_out.write(json.dumps({"ready": True}) + "\n")
        run(llm.llm_engine, job, SamplingParams, rows_out)
        rows_out.write(json.dumps({"done": True}) + "\n")
        rows_out.flush()
        line = sys.stdin.readline()
        job = json.loads(line) if line.strip() else None


def run(engine, job: dict, make_params, rows_out) -> None:
    """Every prompt of the job, the finished responses written `block` at a time (`make_params`:
    vLLM's SamplingParams)."""
    sampling = job["sampling"]
    eos = job["eos"]
    for index, ids, seed in job["prompts"]:
        params = make_params(
            n=1,
            max_tokens=job["max_new_tokens"],
            stop_token_ids=[eos],
            seed=seed,
            detokenize=False,
            **sampling,
        )
        engine.add_request(str(index), {"prompt_token_ids": ids}, params)
    pending = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if not out.finished:
                continue
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            if completion.finish_reason == "stop" and (not tokens or tokens[-1] != eos):
                tokens.append(eos)
            pending.append([int(out.request_id), tokens])
        if pending and (len(pending) >= job["block"] or not engine.has_unfinished_requests()):
            rows_out.write(json.dumps({"rows": pending}) + "\n")
            pending = []


if __name__ == "__main__":
    main()
