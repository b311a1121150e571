"""Packed batches (no padding between sequences) give the same log-probs, loss and gradients."""

import copy
import functools

import pytest
import torch

from spinlab import losses
from spinlab.data import SelfPlayDataModule
from spinlab.logprobs import IGNORE_INDEX
from spinlab.models import tiny_model
from spinlab.module import PolicyModule
from spinlab.objectives import SFT, SPIN

PAIRS = [
    {"prompt": "2 + 3?", "real": "2 + 3 = 5. The answer is 5.", "synthetic": "It is 7"},
    {"prompt": "What is 4 * 6, step by step?", "real": "4 * 6 = 24. The answer is 24.", "synthetic": "20"},
    {"prompt": "Half of 10?", "real": "10 / 2 = 5.", "synthetic": "5, since 10 / 2 = 5. The answer is 5."},
    {"prompt": "1 + 1?", "real": "2", "synthetic": "1 + 1 = 2. The answer is 2."},
]


def datamodules(pack_length=None, pairs=PAIRS):
    tok = tiny_model().tokenizer
    kwargs = {"source": None, "tokenizer": tok, "max_length": 96, "max_prompt_length": 48}
    padded = SelfPlayDataModule(**kwargs)
    packed = SelfPlayDataModule(**kwargs, packing=True, pack_length=pack_length)
    for dm in (padded, packed):
        dm.set_pairs(pairs)
    return padded, packed


def first_batch(dm, batch_size=4):
    dm.batch_size = batch_size
    return next(iter(dm.scoring_dataloader()))


def test_packed_rows_hold_every_token_once_without_padding_between():
    padded, packed = datamodules(pack_length=120)
    a, b = first_batch(padded), first_batch(packed)
    lengths = a["attention_mask"].sum(1).tolist()
    assert (b["sequence_ids"] >= 0).sum() == sum(lengths)  # every token, once
    assert b["input_ids"].shape[1] <= 120 and b["input_ids"].numel() < a["input_ids"].numel()
    for seq, length in enumerate(lengths):
        where = (b["sequence_ids"] == seq).nonzero()
        row = int(where[0, 0])
        assert (where[:, 0] == row).all()  # a sequence never spans rows
        cols = where[:, 1]
        assert torch.equal(cols, torch.arange(int(cols[0]), int(cols[0]) + length))  # contiguous
        assert torch.equal(b["position_ids"][row, cols], torch.arange(length))  # positions restart
        assert torch.equal(b["input_ids"][row, cols], a["input_ids"][seq, :length])
        assert torch.equal(b["labels"][row, cols], a["labels"][seq, :length])


def make(objective, **kwargs):
    policy = tiny_model(seed=3).model
    with torch.no_grad():  # away from the opponent, so that margins are not all zero
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    opt = functools.partial(torch.optim.SGD, lr=0.1)
    if objective is SPIN:
        return PolicyModule(
            policy=policy, objective=SPIN(losses.logistic), optimizer=opt, lam=0.5, opponent="model", **kwargs
        )
    return PolicyModule(policy=policy, objective=SFT(), optimizer=opt, **kwargs)


@pytest.mark.parametrize("objective", [SPIN, SFT])
@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("pack_length", [None, 120])  # everything in one row; several rows
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(objective, chunk, pack_length):
    pairs = PAIRS if objective is SPIN else [{k: v for k, v in p.items() if k != "synthetic"} for p in PAIRS]
    padded_dm, packed_dm = datamodules(pack_length, pairs)
    module = make(objective, logprob_chunk_size=chunk)
    with torch.no_grad():  # the opponent is the unperturbed model: a real comparison, not 0 == 0
        if objective is SPIN:
            module.opponent.load_state_dict(tiny_model(seed=3).model.state_dict())
    twin = copy.deepcopy(module)
    out_padded = module.loss_and_metrics(first_batch(padded_dm))
    out_packed = twin.loss_and_metrics(first_batch(packed_dm))
    for key in out_padded:
        torch.testing.assert_close(out_packed[key], out_padded[key], rtol=1e-5, atol=1e-4)
    if objective is SPIN:
        assert out_padded["margin"].abs().min() > 1e-3
    out_padded["loss"].backward()
    out_packed["loss"].backward()
    for p, q in zip(module.policy.parameters(), twin.policy.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)


def test_packing_config_checks_pack_length():
    tok = tiny_model().tokenizer
    with pytest.raises(ValueError, match="pack_length"):
        SelfPlayDataModule(
            source=None, tokenizer=tok, max_length=96, max_prompt_length=48, packing=True, pack_length=50
        )
    dm = SelfPlayDataModule(source=None, tokenizer=tok, max_length=96, max_prompt_length=48, packing=True)
    assert dm.pack_length == 192


def test_packed_labels_mask_prompts_and_row_ends():
    _, packed = datamodules(pack_length=120)
    b = first_batch(packed)
    scored = b["labels"] != IGNORE_INDEX
    assert (b["sequence_ids"][scored] >= 0).all()  # padding is never scored
    assert not scored[:, 0].any()  # a row starts with a prompt token
