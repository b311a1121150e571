"""SFT through the framework: the weak starting model and the continued-SFT control of a SPIN study."""

import functools
import json
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from safetensors.torch import load_file

import spinlab.run
from spinlab.config import own_keys
from spinlab.data import SelfPlayDataModule
from spinlab.models import tiny_model
from spinlab.module import PolicyModule
from spinlab.objectives import SFT
from tests.conftest import compose_cfg
from tests.helpers import first_batch, response_logp, sequence_tokens, step_losses

PAIRS = [
    {"prompt": "2 + 3?", "real": "2 + 3 = 5. The answer is 5."},
    {"prompt": "Half of 10?", "real": "10 / 2 = 5."},
]


def make_sft():
    loaded = tiny_model(seed=0)
    module = PolicyModule(
        policy=loaded.model, objective=SFT(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-2)
    )
    dm = SelfPlayDataModule(source=None, tokenizer=loaded.tokenizer, max_length=96, max_prompt_length=48)
    dm.set_pairs(PAIRS)
    return module, dm, loaded.tokenizer


def test_pairs_without_synthetic_collate_to_real_sequences_only():
    _, dm, tok = make_sft()
    batch = next(iter(dm.scoring_dataloader()))
    assert batch["input_ids"].shape[0] == 2  # [B, T], not [2B, T]
    response = tok(PAIRS[0]["real"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labels == response  # the real response and its EOS, prompt masked


def test_sft_loss_is_the_token_mean_nll_computed_by_hand():
    module, dm, tok = make_sft()
    batch = next(iter(dm.scoring_dataloader()))
    out = {k: v.detach() for k, v in module.loss_and_metrics(batch).items()}
    # By hand: full logits, log-softmax, pick each response token.
    with torch.no_grad():
        logits = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = torch.log_softmax(logits.float(), -1)
    total, count, per_seq = 0.0, 0, []
    for row in range(2):
        seq = 0.0
        for t in range(1, batch["labels"].shape[1]):
            label = int(batch["labels"][row, t])
            if label != -100:
                seq += float(logprobs[row, t - 1, label])
                count += 1
        per_seq.append(seq)
        total += seq
    assert count == sum(len(tok(p["real"], add_special_tokens=False)["input_ids"]) + 1 for p in PAIRS)
    assert float(out["loss"]) == pytest.approx(-total / count, rel=1e-5)
    torch.testing.assert_close(out["logp_real"], torch.tensor(per_seq), rtol=1e-5, atol=1e-4)
    assert float(out["loss"]) == pytest.approx(math.log(len(tok)), rel=0.1)  # a random model


def test_sft_steps_raise_the_real_responses_likelihood():
    module, dm, _ = make_sft()
    batch = next(iter(dm.scoring_dataloader()))
    opt = module.configure_optimizers()["optimizer"]
    before = float(module.loss_and_metrics(batch)["loss"].detach())
    for _ in range(10):
        opt.zero_grad()
        module.loss_and_metrics(batch)["loss"].backward()
        opt.step()
    assert float(module.loss_and_metrics(batch)["loss"].detach()) < before - 0.5


def test_one_module_config_builds_spin_and_sft():
    policy = tiny_model().model
    spin = instantiate(compose_cfg(["model=tiny"]).module, policy=policy)
    sft = instantiate(compose_cfg(["model=tiny", "objective=sft"]).module, policy=policy)
    assert type(spin) is type(sft) is PolicyModule
    assert spin.objective.kinds == ("real", "synthetic")
    assert isinstance(sft.objective, SFT) and sft.objective.metric_names == ("loss", "logp_real")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft") / "run"
    cfg = compose_cfg(["debug=fast", "objective=sft", "optimizer=adamw", "optimizer.lr=3e-3"], root)
    return root, spinlab.run.run(cfg), cfg


def test_sft_rounds_train_on_real_responses_and_generate_nothing(sft_run):
    root, summary, cfg = sft_run
    assert sorted(summary) == [0, 1]
    for r in (0, 1):
        rd = root / "rounds" / f"round_{r:03d}"
        assert not (rd / "synthetic.jsonl").exists() and not (rd / "opponent_logps.pt").exists()
        assert (root / "hf" / f"round_{r:03d}" / "model.safetensors").exists()
        s = summary[r]
        assert s["pairs"] == cfg.data.num_prompts and s["skipped_batches"] == 0
        assert "margin" not in s and s["logp_real"] < 0
        assert "eval/heldout_logp_real" in s and "eval/task_accuracy" in s
    # Each round trains once on every prompt with its real response: prompt + response + EOS.
    loaded = tiny_model(seed=cfg.seed)
    tok = loaded.tokenizer
    dm = instantiate(own_keys(cfg, "data"), tokenizer=tok, max_positions=loaded.max_positions)
    rows = dm.load_split("train")
    assert len(rows) == cfg.data.num_prompts
    tokens = sum(sequence_tokens(tok, row["prompt"], row["response"]) for row in rows)
    assert summary[0]["train_tokens"] == summary[1]["train_tokens"] == tokens
    # A round's loss is the mean of its steps' losses (equal batches, one scalar loss per step).
    losses = step_losses(root)
    for r in (0, 1):
        assert summary[r]["loss"] == pytest.approx(sum(losses[r]) / len(losses[r]), rel=1e-6)
    # Round 0's first step is the initial model on the epoch's first batch: the token-mean NLL
    # of the batch's real responses (and EOS), from the logits in the test.
    batch = [rows[i] for i in first_batch(cfg, epoch=0)]
    nll = -sum(response_logp(loaded.model, tok, row["prompt"], row["response"]) for row in batch)
    count = sum(len(tok(row["response"], add_special_tokens=False)["input_ids"]) + 1 for row in batch)
    assert losses[0][0] == pytest.approx(nll / count, rel=1e-5)
    assert summary[1]["loss"] < summary[0]["loss"]  # it learns
    first = load_file(str(root / "hf" / "round_000" / "model.safetensors"))
    second = load_file(str(root / "hf" / "round_001" / "model.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    written = json.loads((root / "summary.json").read_text())
    assert [s["round"] for s in written] == [0, 1]


def test_sft_and_spin_rounds_see_the_same_tokens_of_real_data(sft_run, tmp_path):
    """Same prompts and epochs: SPIN's training tokens are SFT's plus the synthetic sequences."""
    _, sft_summary, _ = sft_run
    cfg = compose_cfg(["debug=fast", "rounds=1"], tmp_path / "spin")
    spin_summary = spinlab.run.run(cfg)
    synthetic = [
        json.loads(x) for x in (tmp_path / "spin/rounds/round_000/synthetic.jsonl").read_text().splitlines()
    ]
    assert len(synthetic) == cfg.data.num_prompts
    tok = tiny_model(seed=cfg.seed).tokenizer
    extra = sum(sequence_tokens(tok, row["prompt"], row["synthetic"]) for row in synthetic)
    assert spin_summary[0]["train_tokens"] == sft_summary[0]["train_tokens"] + extra


def test_resumed_sft_run_changes_nothing(sft_run):
    root, summary, cfg = sft_run
    with open_dict(cfg):
        cfg.run_dir = str(root)
    assert spinlab.run.run(cfg) == summary
