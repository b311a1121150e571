"""GPU paths: bf16 mixed precision and the FSDP trainer on one device. Skipped without CUDA."""

import pytest
import torch
from safetensors.torch import load_file

import train
from spinlab.models import tiny_model
from tests.conftest import compose_cfg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def two_rounds(tmp_path, *overrides):
    cfg = compose_cfg(["debug=fast", "trainer.devices=1", *overrides], tmp_path / "run")
    summary = train.run(cfg)
    return tmp_path / "run", summary


@pytest.mark.parametrize("trainer", ["gpu", "fsdp"])
def test_two_rounds_on_one_gpu(tmp_path, trainer):
    root, summary = two_rounds(tmp_path, f"trainer={trainer}")
    assert sorted(summary) == [0, 1]
    for r in (0, 1):
        assert torch.isfinite(torch.tensor(summary[r]["loss"])) and summary[r]["skipped_batches"] == 0
    initial = tiny_model(seed=0).model.state_dict()
    saved = load_file(str(root / "hf" / "round_001" / "model.safetensors"))
    # The whole model, gathered from its shards, and trained.
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in initial.items() if k in saved}
    assert any(not torch.equal(saved[k].cpu().float(), initial[k].float()) for k in saved)


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


@pytest.mark.parametrize("trainer", ["gpu", "fsdp"])
def test_two_rounds_with_compiled_layers(tmp_path, trainer):
    root, summary = two_rounds(tmp_path, f"trainer={trainer}", "module.compile_layers=true")
    for r in (0, 1):
        assert torch.isfinite(torch.tensor(summary[r]["loss"])) and summary[r]["skipped_batches"] == 0
    initial = tiny_model(seed=0).model.state_dict()
    saved = load_file(str(root / "hf" / "round_001" / "model.safetensors"))
    assert any(not torch.equal(saved[k].cpu().float(), initial[k].float()) for k in saved)


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
