import math

import pytest
import torch

from spinlab.logprobs import (
    IGNORE_INDEX,
    chunked_sequence_logps,
    sequence_logps,
    target_positions,
    token_logps,
)


def test_sequence_logp_sums_response_tokens_only():
    # One sequence of 4 tokens over a 3-token vocabulary; the prompt is token 0,
    # the response tokens 1..3 (the last one plays EOS).
    logits = torch.log(
        torch.tensor(
            [
                [0.2, 0.5, 0.3],  # predicts token at position 1
                [0.1, 0.1, 0.8],  # position 2
                [0.6, 0.3, 0.1],  # position 3
                [1 / 3, 1 / 3, 1 / 3],  # after the end: never scored
            ]
        )
    ).unsqueeze(0)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 0]])
    expected = math.log(0.5) + math.log(0.8) + math.log(0.6)
    assert sequence_logps(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_prompt_and_padding_are_masked():
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 4, 5, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 3, 4, 5]]
    )
    per_token = token_logps(logits, labels)
    assert per_token.shape == (2, 5)
    assert (per_token[0, [0, 3, 4]] == 0).all()
    log_probs = logits.log_softmax(-1)
    manual0 = log_probs[0, 1, 4] + log_probs[0, 2, 5]
    manual1 = sum(log_probs[1, t - 1, labels[1, t]] for t in range(1, 6))
    torch.testing.assert_close(sequence_logps(logits, labels), torch.stack([manual0, manual1]))


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_chunked_logps_equal_plain_values_and_gradients(chunk_size):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (4, 7), generator=g)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    plain = sequence_logps(hidden @ weight.t(), labels)
    chunked = chunked_sequence_logps(hidden, weight, labels, chunk_size)
    torch.testing.assert_close(chunked, plain)
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0])
    gh, gw = torch.autograd.grad((plain * upstream).sum(), (hidden, weight))
    ch, cw = torch.autograd.grad((chunked * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(ch, gh)
    torch.testing.assert_close(cw, gw)


def test_chunked_logps_of_a_sequence_without_response_is_zero():
    hidden = torch.randn(2, 4, 8)
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[1, 2] = 3
    out = chunked_sequence_logps(hidden, torch.randn(10, 8), labels)
    assert out[0].item() == 0.0 and out[1].item() != 0.0


def test_given_target_positions_and_sequence_count_give_the_same_sums():
    # Two packed rows: sequences 0 and 2 in row 0, sequence 1 in row 1; -1 is the row's end padding.
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 8, 16, generator=g)
    weight = torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (2, 8), generator=g)
    sequence_ids = torch.tensor([[0, 0, 0, 0, 2, 2, 2, -1], [1, 1, 1, 1, 1, 1, -1, -1]])
    labels[sequence_ids < 0] = IGNORE_INDEX
    labels[:, 0] = labels[0, 4] = IGNORE_INDEX  # each sequence's first token: its prompt
    positions = target_positions(labels)
    for ids, count in ((None, None), (sequence_ids, 3)):
        plain = sequence_logps(hidden @ weight.t(), labels, ids)
        assert plain.shape == (2 if ids is None else 3,) and (plain < -1).all()
        given = sequence_logps(hidden @ weight.t(), labels, ids, positions=positions, num_sequences=count)
        chunked = chunked_sequence_logps(
            hidden, weight, labels, 3, ids, positions=positions, num_sequences=count
        )
        torch.testing.assert_close(given, plain)
        torch.testing.assert_close(chunked, plain)
