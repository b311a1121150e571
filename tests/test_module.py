import copy
import functools

import pytest
import torch

from spinlab import losses
from spinlab.collective import score_pairs
from spinlab.data import SelfPlayDataModule
from spinlab.models import tiny_model
from spinlab.module import PolicyModule, warmup_linear_decay
from spinlab.objectives import SPIN
from spinlab.rounds import Round
from tests.helpers import response_logp

PAIRS = [
    {"prompt": "2 + 3?", "real": "2 + 3 = 5. The answer is 5.", "synthetic": "It is 7"},
    {"prompt": "4 * 6?", "real": "4 * 6 = 24. The answer is 24.", "synthetic": "4 * 6 = 20, I think."},
    {"prompt": "Half of 10?", "real": "10 / 2 = 5. The answer is 5.", "synthetic": "5"},
]


def make(opponent: str, seed: int = 0):
    loaded = tiny_model(seed=seed)
    module = PolicyModule(
        policy=loaded.model,
        objective=SPIN(losses.logistic),
        optimizer=functools.partial(torch.optim.RMSprop, lr=1e-3),
        lam=0.5,
        opponent=opponent,
    )
    dm = SelfPlayDataModule(source=None, tokenizer=loaded.tokenizer, max_length=96, max_prompt_length=48)
    dm.set_pairs(PAIRS)
    return module, dm


def batch_of(dm):
    return next(iter(dm.scoring_dataloader()))


def test_cached_and_model_opponents_give_the_same_loss_and_gradients():
    cached, dm = make("cached")
    model_mode, _ = make("model")
    # Move both policies away from the opponent, identically, so the log-ratios are non-zero.
    with torch.no_grad():
        for p, q in zip(cached.policy.parameters(), model_mode.policy.parameters(), strict=True):
            noise = torch.randn_like(p) * 0.05
            p.add_(noise)
            q.add_(noise)
    opponent_logps = score_pairs(None, make("cached")[0], dm, dm.encoded, "opponent")
    dm.set_opponent_logps(opponent_logps)
    batch = batch_of(dm)

    out_cached = cached.loss_and_metrics(batch)
    out_model = model_mode.loss_and_metrics({k: v for k, v in batch.items() if k != "opponent_logps"})
    torch.testing.assert_close(out_cached["loss"], out_model["loss"])
    assert out_cached["margin"].abs().min() > 1e-3  # a real comparison, not 0 == 0
    out_cached["loss"].backward()
    out_model["loss"].backward()
    for p, q in zip(cached.policy.parameters(), model_mode.policy.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_loss_matches_hand_computation_from_logps():
    module, dm = make("cached")
    opponent = torch.tensor([[-131.0, -37.0], [-139.0, -90.0], [-130.0, -9.0]], dtype=torch.float64)
    dm.set_opponent_logps(opponent.float())
    out = module.loss_and_metrics(batch_of(dm))
    # The policy's log-probs from its logits, one unpadded sequence at a time, written in the test.
    tok = dm.tokenizer
    policy = torch.tensor(
        [
            [response_logp(module.policy, tok, p["prompt"], p[kind]) for kind in ("real", "synthetic")]
            for p in PAIRS
        ],
        dtype=torch.float64,
    )
    assert policy.max() < -5  # random weights: nats per response, not a trivial 0
    margin = 0.5 * (policy[:, 0] - opponent[:, 0]) - 0.5 * (policy[:, 1] - opponent[:, 1])
    assert (margin > 0).any() and (margin < 0).any()  # both signs: accuracy is not constant
    torch.testing.assert_close(out["logp_real"].double(), policy[:, 0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out["margin"].double(), margin, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(
        out["loss"].double(), torch.log1p(torch.exp(-margin)).mean(), rtol=1e-5, atol=1e-4
    )
    assert out["accuracy"].tolist() == (margin > 0).float().tolist()


def test_opponent_is_visibly_frozen():
    module, _ = make("model")
    module.train()
    assert module.policy.training
    assert not module.opponent.training
    assert not any(p.requires_grad for p in module.opponent.parameters())
    assert all(p.requires_grad for p in module.policy.parameters())
    opt = module.configure_optimizers()["optimizer"]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in module.policy.parameters()
    }


def test_a_training_step_moves_the_policy_not_the_opponent():
    module, dm = make("model")
    batch = batch_of(dm)
    opt = module.configure_optimizers()["optimizer"]
    policy_before = copy.deepcopy(module.policy.state_dict())
    opponent_before = copy.deepcopy(module.opponent.state_dict())
    for _ in range(3):
        opt.zero_grad()
        module.loss_and_metrics(batch)["loss"].backward()
        opt.step()
    moved = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, policy_before[k])]
    assert len(moved) == len(policy_before)
    for k, v in module.opponent.state_dict().items():
        assert torch.equal(v, opponent_before[k]), k
    # The policy now prefers the real responses over the synthetic ones relative to the opponent.
    assert module.loss_and_metrics(batch)["margin"].mean() > 0


def test_begin_round_copies_policy_into_opponent_only_when_fresh():
    module, _ = make("model")
    with torch.no_grad():
        next(module.policy.parameters()).add_(1.0)
    module.begin_round(
        Round(1, lam=0.2, lr=1e-3, mix_previous_rounds=0, start_step=0, total_steps=4, pairs=3), fresh=False
    )
    assert not torch.equal(next(module.policy.parameters()), next(module.opponent.parameters()))
    module.begin_round(
        Round(1, lam=0.2, lr=1e-3, mix_previous_rounds=0, start_step=0, total_steps=4, pairs=3), fresh=True
    )
    for p, q in zip(module.policy.parameters(), module.opponent.parameters(), strict=True):
        assert torch.equal(p, q)
    assert module.lam == 0.2


def test_invalid_settings_are_rejected():
    loaded = tiny_model()
    with pytest.raises(ValueError, match="opponent"):
        PolicyModule(
            policy=loaded.model, objective=SPIN(losses.logistic), optimizer=torch.optim.SGD, opponent="ema"
        )


def test_warmup_linear_decay_numbers():
    # 10 steps, 10 % warm-up: step 0 is the single warm-up step, then 9 → 0 linearly.
    assert warmup_linear_decay(0, 10, 0.1) == pytest.approx(1.0)
    assert warmup_linear_decay(1, 10, 0.1) == pytest.approx(1.0)
    assert warmup_linear_decay(5, 10, 0.1) == pytest.approx(5 / 9)
    assert warmup_linear_decay(9, 10, 0.1) == pytest.approx(1 / 9)
    assert [warmup_linear_decay(s, 20, 0.2) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_chunked_and_plain_logprobs_give_the_same_loss_and_gradients():
    chunked, dm = make("model")
    plain, _ = make("model")
    plain.scorer.chunk_size = None
    assert chunked.scorer.chunk_size
    with torch.no_grad():
        for p, q in zip(chunked.policy.parameters(), plain.policy.parameters(), strict=True):
            noise = torch.randn_like(p) * 0.05
            p.add_(noise)
            q.add_(noise)
    batch = batch_of(dm)
    head_calls = []
    chunked.policy.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    with torch.no_grad():
        chunked.scorer(batch)  # the first batch: the one check against the model's own logits
    assert chunked.scorer.chunked_matches is True and len(head_calls) == 1
    a, b = chunked.loss_and_metrics(batch), plain.loss_and_metrics(batch)
    assert len(head_calls) == 1, "after its check, the chunked path never runs the full output layer"
    torch.testing.assert_close(a["logp_real"], b["logp_real"])
    torch.testing.assert_close(a["loss"], b["loss"])
    a["loss"].backward()
    b["loss"].backward()
    for p, q in zip(chunked.policy.parameters(), plain.policy.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


# -- speed levers: output-layer chunks, compiled layers, Liger kernels ----------------------------


def test_chunk_size_auto_is_256_on_cpu_and_bad_sizes_are_refused(monkeypatch):
    import spinlab.module as module_lib

    seen = []
    real = module_lib.chunked_sequence_logps
    monkeypatch.setattr(
        module_lib, "chunked_sequence_logps", lambda *a, **kw: seen.append(a[3]) or real(*a, **kw)
    )
    module, dm = make("cached")
    module.scorer.chunk_size = "auto"
    auto = module.scorer(batch_of(dm))
    module.scorer.chunk_size = 256
    torch.testing.assert_close(module.scorer(batch_of(dm)), auto, rtol=0, atol=0)
    assert seen == [256, 256]
    for bad in (0, -4, "big", 2.5):
        with pytest.raises(ValueError, match="logprob_chunk_size"):
            PolicyModule(
                policy=tiny_model().model,
                objective=SPIN(losses.logistic),
                optimizer=torch.optim.SGD,
                logprob_chunk_size=bad,
            )


@pytest.mark.slow
def test_compiled_layers_give_the_eager_loss_and_gradients_and_leave_generation_eager(monkeypatch):
    from spinlab.module import compile_decoder_layers

    # Dynamo's capture of each layer and AOTAutograd's forward and backward graphs, as inductor gets
    # them on a GPU; inductor's own CPU code (C++ that the compiler builds on first use, about 25 s
    # on a fresh machine) is torch's, not this wrapper's. tests/test_gpu.py runs inductor's.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))

    eager, dm = make("model")
    compiled = copy.deepcopy(eager)
    seeded = torch.Generator().manual_seed(0)  # the same noise whatever ran before in this process
    with torch.no_grad():  # policy away from the opponent, identically on both sides
        for p, q in zip(eager.policy.parameters(), compiled.policy.parameters(), strict=True):
            noise = torch.randn(p.shape, generator=seeded) * 0.05
            p.add_(noise)
            q.add_(noise)
    assert compile_decoder_layers(compiled.policy) == 2  # the tiny model's two decoder layers
    assert compile_decoder_layers(compiled.policy) == 2  # idempotent: no compile of a compile
    batch = batch_of(dm)
    out_eager, out_compiled = eager.loss_and_metrics(batch), compiled.loss_and_metrics(batch)
    assert out_eager["margin"].abs().min() > 1e-3
    torch.testing.assert_close(out_compiled["loss"], out_eager["loss"], rtol=1e-5, atol=1e-6)
    out_eager["loss"].backward()
    out_compiled["loss"].backward()
    for p, q in zip(eager.policy.parameters(), compiled.policy.parameters(), strict=True):
        # fp32 sums in another order: off by a few ulps of the tensor's largest entries, which is
        # more than rtol allows an entry near zero (one in 2048 was 1.6e-6 off under another seed).
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item())

    # Decoding with a KV cache takes the eager forward: the compiler never sees a cache object.
    compiled_calls = []
    layer = compiled.policy.model.layers[0]
    eager_forward = layer.forward.__kwdefaults__["_eager"]
    layer.forward.__kwdefaults__["_eager"] = lambda *a, **kw: (
        compiled_calls.append(1) or eager_forward(*a, **kw)
    )
    prompt = batch["input_ids"][:1, :5]
    out = compiled.policy.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    reference = eager.policy.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert len(compiled_calls) >= 4 and torch.equal(out, reference)


def test_compile_layers_auto_stays_eager_on_cpu(monkeypatch):
    import spinlab.module as module_lib

    calls = []
    monkeypatch.setattr(module_lib, "compile_decoder_layers", lambda model: calls.append(model))
    module, _ = make("cached")
    module.compile_layers = "auto"
    module.configure_model()
    assert calls == []
    module.compile_layers = True
    module.configure_model()
    assert calls == [module.policy]
    with pytest.raises(ValueError, match="compile_layers"):
        PolicyModule(
            policy=tiny_model().model,
            objective=SPIN(losses.logistic),
            optimizer=torch.optim.SGD,
            compile_layers="yes",
        )


def test_liger_kernels_are_applied_to_the_policy_or_refused_with_the_install_command(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not importable, as on a CPU machine
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[liger\]'"):
        PolicyModule(
            policy=tiny_model().model,
            objective=SPIN(losses.logistic),
            optimizer=torch.optim.SGD,
            liger_kernels=True,
        )

    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_llama = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    module = PolicyModule(
        policy=tiny_model().model,
        objective=SPIN(losses.logistic),
        optimizer=torch.optim.SGD,
        liger_kernels=True,
    )
    assert calls == [
        {
            "rope": True,
            "rms_norm": True,
            "swiglu": True,
            "cross_entropy": False,  # the output layer stays ours: chunked response log-probs
            "fused_linear_cross_entropy": False,
            "model": module.policy,
        }
    ]
    other = tiny_model().model
    other.config.model_type = "unheard_of"
    with pytest.raises(ValueError, match="no kernels for model type 'unheard_of'"):
        PolicyModule(
            policy=other, objective=SPIN(losses.logistic), optimizer=torch.optim.SGD, liger_kernels=True
        )
