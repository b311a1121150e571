import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spinlab.tasks.arithmetic import (
    PROMPT_SPACE,
    SPLITS,
    ArithmeticTask,
    _sample_rows,
    extract_answer,
    is_correct,
)

STEP_RE = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
PRICE_RE = re.compile(r"^(\w+) buys (\d+) (\w+) at (\d+) dollars each\. How many dollars")


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask(n_train=500, n_validation=100, n_test=100, seed=0)


def all_rows(task):
    return [row for split in SPLITS for row in task.load(split)]


def test_rows_have_the_documented_shape(task):
    for row in all_rows(task):
        assert set(row) == {"prompt", "response", "answer"}
        assert all(isinstance(v, str) and v for v in row.values())
        assert len(row["prompt"]) < 160
        assert len(row["response"]) < 120
        assert row["response"].endswith(f"The answer is {row['answer']}.")


def test_same_seed_gives_identical_rows(task):
    again = ArithmeticTask(n_train=500, n_validation=100, n_test=100, seed=0)
    for split in SPLITS:
        assert again.load(split) == task.load(split)


def test_different_seed_gives_different_rows(task):
    other = ArithmeticTask(n_train=500, n_validation=100, n_test=100, seed=1)
    for split in SPLITS:
        assert other.load(split) != task.load(split)


def test_split_sizes_and_disjointness(task):
    prompts = {split: [row["prompt"] for row in task.load(split)] for split in SPLITS}
    assert {split: len(p) for split, p in prompts.items()} == {
        "train": 500,
        "validation": 100,
        "test": 100,
    }
    for split, p in prompts.items():
        assert len(set(p)) == len(p), f"duplicate prompt in {split}"
    assert not set(prompts["train"]) & set(prompts["validation"])
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["validation"]) & set(prompts["test"])


def test_default_sizes():
    task = ArithmeticTask()
    assert [len(task.load(s)) for s in ("train", "validation", "test")] == [2000, 200, 200]


def test_validation_and_test_do_not_depend_on_n_train(task):
    for n_train in (0, 7, 3000):
        other = ArithmeticTask(n_train=n_train, n_validation=100, n_test=100, seed=0)
        assert len(other.load("train")) == n_train
        assert other.load("validation") == task.load("validation")
        assert other.load("test") == task.load("test")


def test_load_returns_copies(task):
    task.load("train")[0]["answer"] = "garbage"
    assert task.load("train")[0]["answer"] != "garbage"


def test_every_arithmetic_step_is_right(task):
    for row in all_rows(task):
        steps = STEP_RE.findall(row["response"])
        assert steps, row["response"]
        for a, op, b, c in steps:
            assert eval(f"{a} {op} {b}") == int(c), row["response"]
        assert steps[-1][3] == row["answer"]
        assert extract_answer(row["response"]) == row["answer"]
        assert is_correct(row["response"], row["answer"])


def test_price_answers_recomputed_from_the_prompt(task):
    checked = 0
    for row in all_rows(task):
        match = PRICE_RE.match(row["prompt"])
        if match:
            _, count, _, price = match.groups()
            assert int(row["answer"]) == int(count) * int(price)
            assert f"{count} * {price} = {row['answer']}" in row["response"]
            checked += 1
    assert checked > 20


def test_all_templates_appear(task):
    text = " ".join(row["prompt"] for row in task.load("train"))
    for marker in (
        "dollars each. How many",  # price
        "There are",  # groups
        "more. How many",  # addition
        "gives away",  # subtraction
        "dollars each and",  # two-step
        "equally among",  # division
    ):
        assert marker in text, marker
    assert any(r["response"].startswith("1 ") for r in task.load("train"))  # unit conversion
    ops = {op for row in task.load("train") for _, op, _, _ in STEP_RE.findall(row["response"])}
    assert ops == {"*", "+", "-", "/"}


def test_reference_response_is_a_function_of_the_prompt():
    # p_data is a delta per prompt: the same prompt always comes with the same response.
    seen = {}
    for seed in range(4):
        for row in ArithmeticTask(n_train=2000, n_validation=0, n_test=0, seed=seed).load("train"):
            assert seen.setdefault(row["prompt"], row["response"]) == row["response"]
    assert len(seen) < 4 * 2000  # the seeds did overlap, so the check above had teeth


def test_unknown_split_raises(task):
    with pytest.raises(ValueError, match=r"'dev'.*train, validation, test"):
        task.load("dev")


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True])
def test_bad_sizes_raise(bad):
    with pytest.raises(ValueError, match="n_train"):
        ArithmeticTask(n_train=bad)


def test_impossible_size_raises_at_once():
    with pytest.raises(ValueError, match="distinct prompts"):
        ArithmeticTask(n_train=PROMPT_SPACE, n_validation=1, n_test=0)


def test_exhausted_prompt_space_raises_instead_of_looping():
    # A template with only three prompts: the fourth one can never be drawn.
    def tiny(rng):
        k = rng.randint(1, 3)
        return f"What is {k} + 0?", f"{k} + 0 = {k}. The answer is {k}.", k

    rows = _sample_rows(random.Random(0), 3, set(), templates=[(tiny, 3)])
    assert sorted(r["answer"] for r in rows) == ["1", "2", "3"]
    with pytest.raises(ValueError, match="exhausted"):
        _sample_rows(random.Random(0), 4, set(), templates=[(tiny, 3)])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7 * 3 = 14. The answer is 14.", "14"),
        ("7 pens at 3 dollars each cost 7 * 3 = 21 dollars. The answer is 21.", "21"),
        ("no number", None),
        ("", None),
        ("The answer is 1,200", "1200"),
        ("The answer is -5.", "-5"),
        ("the answer is: 42", "42"),
        ("The answer is $30.", "30"),
        ("The answer is 3.5.", "3.5"),
        ("The answer is 12. Wait, no. The answer is 13", "13"),
        ("The answer is 12, I think.", "12"),
        ("The answer is 007.", "7"),
        ("The answer is -0.", "0"),
        ("The answer is 0.50", "0.50"),
        ("The answer is \u0663.", None),  # only ASCII digits count
        ("9" * 5000, "9" * 5000),  # past int()'s 4300-digit limit
        ("so it is 8 + 4 = 12 apples", "12"),
        ("10-3=7", "7"),
        ("The answer is unknown, maybe 9", "9"),
        ("The answer is 5 and 6 items total 11", "5"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("7 * 3 = 21. The answer is 21.", "21", True),
        ("7 * 3 = 14. The answer is 14.", "21", False),
        ("The answer is 1,200", "1200", True),
        ("The answer is 21.0", "21", True),
        ("I do not know.", "21", False),
        ("The answer is 21.", "not a number", False),
        ("The answer is -3", "3", False),
    ],
)
def test_is_correct(response, answer, expected):
    assert is_correct(response, answer) is expected


@given(st.text())
def test_extract_answer_never_raises(text):
    result = extract_answer(text)
    assert result is None or re.fullmatch(r"-?\d+(\.\d+)?", result)
    assert isinstance(is_correct(text, "21"), bool)
