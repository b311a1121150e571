"""GPU paths: bf16 mixed precision and the FSDP trainer on one device, each against the same two
rounds in fp32 on the CPU. Skipped without CUDA, but for the check of that comparison itself."""

import pytest
import torch
from safetensors.torch import load_file

import spinlab.run
from spinlab.models import tiny_model
from tests.conftest import compose_cfg

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# generation=static, as the GPU trainers pick it: its draws come from (seed, round, prompt, step),
# so the CPU run samples the same responses where the logits agree.
def two_rounds(path, *overrides):
    summary = spinlab.run.run(compose_cfg(["debug=fast", "generation=static", *overrides], path))
    return summary, {r: load_file(str(path / "hf" / f"round_{r:03d}" / "model.safetensors")) for r in (0, 1)}


# How far a bf16 run may stray from the fp32 one, per summary number: (relative, absolute).
# Measured on CPU against fp32: bf16-mixed autocast (trainer=gpu's precision) within 0.2 % on
# log-probs, 3 % on losses and margins, cosine 0.996 and 0.4 % on the norm of each round's weight
# change; FSDP2's bf16 compute (trainer=fsdp_cpu trainer.devices=1 trainer.precision=bf16-mixed,
# 3 of 16 round-0 responses sampled differently) within 0.2 % on log p(real), 3.7 % on
# log p(synthetic), 8 % on the loss, cosine 0.93 and 1.6 % on the norm. Against them: λ doubled
# moves the margin by 79 %, a learning rate 20 % higher the norm by 20 %.
SUMMARY_TOLERANCE = {
    "loss": (0.15, 0.01),
    "margin": (0.15, 0.05),
    "reward_real": (0.15, 0.05),
    "reward_synthetic": (0.15, 0.05),
    "logp_real": (0.01, 0.0),
    "logp_synthetic": (0.1, 0.0),
}
MIN_COSINE, NORM_TOLERANCE = 0.85, 0.05


def bf16_strays(reference, run, initial) -> list[str]:
    """Where `run` (summary, weights per round) differs from the fp32 `reference` by more than bf16
    rounding explains; empty when nowhere."""
    (want_summary, want_weights), (summary, weights) = reference, run
    strays = []
    for r, want in want_summary.items():
        got = summary.get(r)
        if got is None:
            strays.append(f"round {r}: no summary")
            continue
        if got["skipped_batches"]:
            strays.append(f"round {r}: {got['skipped_batches']} skipped batches")
        for key, (rel, abs_) in SUMMARY_TOLERANCE.items():
            if abs(got[key] - want[key]) > rel * abs(want[key]) + abs_:
                strays.append(f"round {r}: {key} {got[key]:.5g} against {want[key]:.5g}")
        shapes = {k: v.shape for k, v in weights[r].items()}
        if shapes != {k: v.shape for k, v in want_weights[r].items()}:
            strays.append(f"round {r}: saved tensors differ: {sorted(shapes)}")
            continue
        moved = torch.cat([(weights[r][k].cpu().float() - initial[k]).flatten() for k in sorted(shapes)])
        want_moved = torch.cat([(want_weights[r][k].float() - initial[k]).flatten() for k in sorted(shapes)])
        cosine = torch.nn.functional.cosine_similarity(moved, want_moved, dim=0).item()
        ratio = (moved.norm() / want_moved.norm()).item()
        if not cosine >= MIN_COSINE or not abs(ratio - 1) <= NORM_TOLERANCE:
            strays.append(f"round {r}: weight change at cosine {cosine:.4f}, norm ratio {ratio:.4f}")
    return strays


def initial_weights():
    return {k: v.float() for k, v in tiny_model(seed=0).model.state_dict().items()}


def test_bf16_strays_accepts_bf16_rounding_and_catches_wrong_training(tmp_path):
    """The comparison the GPU tests make, on CPU: bf16-mixed autocast passes; λ doubled, a learning
    rate 20 % off, an update not saved, a partial gather, an untrained model, a loss 50 % off and a
    skipped batch fail."""
    initial = initial_weights()
    reference = two_rounds(tmp_path / "fp32", "trainer=cpu")
    assert bf16_strays(reference, reference, initial) == []
    bf16 = two_rounds(tmp_path / "bf16", "trainer=cpu", "trainer.precision=bf16-mixed")
    assert bf16_strays(reference, bf16, initial) == []
    assert bf16_strays(reference, two_rounds(tmp_path / "lam", "trainer=cpu", "lam=0.2"), initial)
    summary, weights = bf16

    def strays(summary=summary, **rounds):
        per_round = {0: rounds.get("round_0", weights[0]), 1: rounds.get("round_1", weights[1])}
        return " ".join(bf16_strays(reference, (summary, per_round), initial))

    lr_off = {k: initial[k] + 1.2 * (v - initial[k]) for k, v in weights[1].items()}
    assert "round 1: weight change" in strays(round_1=lr_off)
    assert "round 1: weight change" in strays(round_1=weights[0])
    assert "round 1: saved tensors" in strays(round_1=dict(list(weights[1].items())[1:]))
    assert "round 0: weight change" in strays(round_0={k: initial[k] for k in weights[0]})
    wrong_loss = {**summary, 0: {**summary[0], "loss": summary[0]["loss"] * 1.5}}
    assert strays(wrong_loss).startswith("round 0: loss")
    assert strays({**summary, 1: {**summary[1], "skipped_batches": 1}}) == "round 1: 1 skipped batches"


@pytest.fixture(scope="module")
def cpu_reference(tmp_path_factory):
    """The same two rounds in fp32 on the CPU, made in this session."""
    return two_rounds(tmp_path_factory.mktemp("cpu") / "run", "trainer=cpu"), initial_weights()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("trainer", ["gpu", "fsdp"])
def test_two_rounds_on_one_gpu_train_as_on_the_cpu(tmp_path, trainer, cpu_reference):
    reference, initial = cpu_reference
    run = two_rounds(tmp_path / "run", f"trainer={trainer}", "trainer.devices=1")
    assert sorted(run[0]) == [0, 1]
    # The whole model, gathered from its shards, trained as the CPU trains it within bf16 rounding.
    assert bf16_strays(reference, run, initial) == []


@pytest.mark.gpu
@needs_cuda
def test_bf16_chunked_logps_match_fp32():
    from spinlab.logprobs import chunked_sequence_logps, sequence_logps

    torch.manual_seed(0)
    hidden = torch.randn(4, 64, 32, device="cuda")
    weight = torch.randn(1000, 32, device="cuda") * 0.1
    labels = torch.randint(0, 1000, (4, 64), device="cuda")
    labels[:, :20] = -100
    full = sequence_logps(hidden @ weight.t(), labels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        chunked = chunked_sequence_logps(hidden, weight, labels, chunk_size=37)
    torch.testing.assert_close(chunked.float(), full, rtol=2e-2, atol=0.5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("trainer", ["gpu", "fsdp"])
def test_two_rounds_with_compiled_layers_train_as_on_the_cpu(tmp_path, trainer, cpu_reference):
    reference, initial = cpu_reference
    run = two_rounds(
        tmp_path / "run", f"trainer={trainer}", "trainer.devices=1", "module.compile_layers=true"
    )
    assert bf16_strays(reference, run, initial) == []


@pytest.mark.gpu
@needs_cuda
def test_liger_kernels_and_compiled_layers_keep_the_loss():
    """The same batch through the eager policy, Liger's kernels and compiled layers: one loss
    (bf16 autocast, so within bf16 rounding)."""
    import copy
    import functools

    from spinlab import losses
    from spinlab.module import PolicyModule
    from spinlab.objectives import SPIN

    loaded = tiny_model(seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rows, length = 4, 48
    ids = torch.randint(3, loaded.model.config.vocab_size, (2 * rows, length), device="cuda")
    labels = ids.clone()
    labels[:, :16] = -100
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "opponent_logps": torch.randn(rows, 2, device="cuda") - 100.0,
    }
    losses_seen = {}
    settings = {"eager": {}, "compile": {"compile_layers": True}}
    try:
        import liger_kernel  # noqa: F401

        settings["liger"] = {"liger_kernels": True}
    except ImportError:
        pass
    for name, kwargs in settings.items():
        module = PolicyModule(
            policy=copy.deepcopy(loaded.model),
            objective=SPIN(losses.logistic),
            optimizer=functools.partial(torch.optim.SGD, lr=0.0),
            lam=0.5,
            **kwargs,
        ).cuda()
        module.configure_model()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses_seen[name] = module.loss_and_metrics(batch)["loss"].float().item()
    for name, loss in losses_seen.items():
        assert loss == pytest.approx(losses_seen["eager"], rel=2e-2), (name, losses_seen)
