import json
from types import SimpleNamespace

import pytest
import torch

from spinlab.data import SelfPlayDataModule
from spinlab.logprobs import IGNORE_INDEX
from spinlab.models import tiny_model
from spinlab.sources import DataError, LocalFileSource, validate_rows


@pytest.fixture
def tokenizer():
    return tiny_model().tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_collate_masks_prompt_and_appends_eos(tokenizer):
    dm = SelfPlayDataModule(source=None, tokenizer=tokenizer, max_length=64, max_prompt_length=32)
    dm.set_pairs([{"prompt": "hi", "real": "abc", "synthetic": "xy"}])
    batch = dm.collate(dm.encoded)
    prompt = dm.encode_prompt("hi")
    assert tokenizer.decode(prompt) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    eos = tokenizer.eos_token_id
    assert batch["input_ids"].shape == (2, len(prompt) + 4)
    real, synthetic = batch["labels"].tolist()
    assert real == [IGNORE_INDEX] * len(prompt) + tokenizer("abc", add_special_tokens=False)["input_ids"] + [
        eos
    ]
    assert synthetic[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert synthetic[len(prompt) :] == tokenizer("xy", add_special_tokens=False)["input_ids"] + [
        eos,
        IGNORE_INDEX,
    ]
    assert batch["attention_mask"].sum(1).tolist() == [len(prompt) + 4, len(prompt) + 3]
    # The real and the synthetic sequence share the prompt tokens.
    assert torch.equal(batch["input_ids"][0, : len(prompt)], batch["input_ids"][1, : len(prompt)])


def test_responses_are_truncated_to_max_length(tokenizer):
    dm = SelfPlayDataModule(source=None, tokenizer=tokenizer, max_length=40, max_prompt_length=32)
    dm.set_pairs([{"prompt": "hi", "real": "a" * 100, "synthetic": "b"}])
    assert dm.collate(dm.encoded)["input_ids"].shape[1] == 40


def test_local_jsonl_source_and_validation_messages(tmp_path):
    good = write_jsonl(
        tmp_path / "good.jsonl", [{"q": "1+1?", "a": "2"}, {"q": "2+2?", "a": "4", "extra": 1}]
    )
    rows = LocalFileSource(train=good, prompt_field="q", response_field="a").load("train")
    kept, skipped = validate_rows(rows)
    assert [(r["prompt"], r["response"]) for r in kept] == [("1+1?", "2"), ("2+2?", "4")]
    assert kept[1]["extra"] == 1 and skipped == 0

    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "fine"}, {"prompt": "x", "response": ""}]
    )
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: field 'response' is empty"):
        validate_rows(LocalFileSource(train=bad).load("train"))
    kept, skipped = validate_rows(LocalFileSource(train=bad).load("train"), bad_rows="skip")
    assert len(kept) == 1 and skipped == 1


def test_a_jsonl_file_with_a_byte_order_mark_is_read(tmp_path):
    # Windows tools and Excel's "CSV UTF-8" export start the file with EF BB BF.
    path = tmp_path / "excel.jsonl"
    rows = [{"prompt": "1+1?", "response": "2"}, {"prompt": "2+2?", "response": "4"}]
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    kept, skipped = validate_rows(LocalFileSource(train=str(path)).load("train"))
    assert [(r["prompt"], r["response"]) for r in kept] == [("1+1?", "2"), ("2+2?", "4")] and skipped == 0


def test_more_prompts_asked_for_than_the_file_holds_is_said(tmp_path, tokenizer, caplog):
    path = write_jsonl(
        tmp_path / "small.jsonl", [{"prompt": f"{i}+1?", "response": str(i + 1)} for i in range(3)]
    )
    dm = SelfPlayDataModule(LocalFileSource(train=path), tokenizer, num_prompts=10)
    with caplog.at_level("WARNING", logger="spinlab.data"):
        assert len(dm.load_split("train")) == 3
    assert f"data.num_prompts=10, but {path} has only 3 usable rows: each round uses those 3" in caplog.text


def test_duplicate_and_missing_fields_are_named():
    rows = [
        {"prompt": "a", "response": "b", "_origin": ("f.jsonl", 0)},
        {"prompt": "a", "response": "c", "_origin": ("f.jsonl", 1)},
    ]
    with pytest.raises(DataError, match="f.jsonl: row 1: field 'prompt' duplicates"):
        validate_rows([dict(r) for r in rows])
    with pytest.raises(DataError, match="row 0: field 'response' is missing"):
        validate_rows([{"prompt": "a", "_origin": ("f.jsonl", 0)}])
    with pytest.raises(DataError, match="must be a string, got int"):
        validate_rows([{"prompt": 3, "response": "b", "_origin": ("f.jsonl", 0)}])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        LocalFileSource(train=str(tmp_path / "nope.jsonl")).load("train")


def test_long_prompts_error_or_skip(tokenizer):
    class Rows:
        def load(self, split):
            return [{"prompt": "short", "response": "r"}, {"prompt": "x" * 200, "response": "r"}]

    dm = SelfPlayDataModule(source=Rows(), tokenizer=tokenizer, max_length=128, max_prompt_length=64)
    with pytest.raises(DataError, match="row 2: field .prompt. is .* over data.max_prompt_length=64"):
        dm.load_split("train")
    dm = SelfPlayDataModule(
        source=Rows(), tokenizer=tokenizer, max_length=128, max_prompt_length=64, bad_rows="skip"
    )
    assert [r["prompt"] for r in dm.load_split("train")] == ["short"]
    assert dm.skipped["train"] == 1


def test_shuffle_is_seeded_per_epoch(tokenizer):
    def epoch_order(seed: int, epoch: int) -> list[int]:
        # A new data module each time: nothing carries over from an earlier loader.
        dm = SelfPlayDataModule(source=None, tokenizer=tokenizer, batch_size=1, seed=seed)
        dm.trainer = SimpleNamespace(current_epoch=epoch, global_rank=0, world_size=1)
        dm.set_pairs([{"prompt": str(i), "real": "r", "synthetic": "s"} for i in range(20)])
        return [int(b["index"]) for b in dm.train_dataloader()]

    first = epoch_order(seed=3, epoch=0)
    assert sorted(first) == list(range(20)) and first != list(range(20))
    # A resumed run rebuilds the loader: the same seed and epoch give the same order ...
    assert epoch_order(seed=3, epoch=0) == first
    # ... and each epoch, and each seed, has its own.
    assert epoch_order(seed=3, epoch=1) != first
    assert epoch_order(seed=4, epoch=0) != first


def test_global_batches_are_split_across_processes():
    from spinlab.data import global_batch_shard

    order = [7, 3, 5, 0, 1, 6, 2, 4, 8, 9]
    assert global_batch_shard(order, 4, 0, 1) == order
    # Two processes at batch 2: each global batch of 4 is split 2 + 2; the tail wraps around.
    r0, r1 = global_batch_shard(order, 2, 0, 2), global_batch_shard(order, 2, 1, 2)
    assert r0 == [7, 3, 1, 6, 8, 9] and r1 == [5, 0, 2, 4, 7, 3]
    assert len(r0) == len(r1)


# -- length limits measured from the data (null) or checked against it (a number) ------------


def rows_file(tmp_path, name, rows):
    return write_jsonl(tmp_path / name, rows)


def test_measured_limits_fit_every_split_and_the_generation_room(tmp_path, tokenizer):
    train = rows_file(tmp_path, "t.jsonl", [{"prompt": "p" * 10, "response": "r" * 40}])
    val = rows_file(tmp_path, "v.jsonl", [{"prompt": "q" * 30, "response": "s" * 5}])
    dm = SelfPlayDataModule(LocalFileSource(train=train, validation=val), tokenizer, max_new_tokens=50)
    dm.setup()
    template = len(dm.encode_prompt(""))  # the chat template's own tokens (character-level tokenizer)
    assert dm.max_prompt_length == template + 30  # the validation prompt is the longest
    # room for the longest prompt + 50 generated + EOS, over the longest real row (10 + 40 + EOS)
    assert dm.max_length == template + 30 + 51
    dm = SelfPlayDataModule(LocalFileSource(train=train, validation=val), tokenizer, max_new_tokens=5)
    dm.setup()
    assert dm.max_length == template + 10 + 40 + 1
    assert dm.pack_length == 2 * dm.max_length


def test_explicit_limit_names_file_row_length_and_the_value_to_set(tmp_path, tokenizer):
    rows = [{"prompt": "a", "response": "b" * 20}, {"prompt": "c", "response": "d" * 60}]
    path = rows_file(tmp_path, "sft.jsonl", [*rows, {"prompt": "e", "response": "f" * 90}])
    template = len(SelfPlayDataModule(None, tokenizer).encode_prompt(""))
    dm = SelfPlayDataModule(LocalFileSource(train=path), tokenizer, max_length=template + 50)
    longest = template + 1 + 90 + 1
    with pytest.raises(
        DataError,
        match=rf"sft\.jsonl: row 2: prompt and real response are {template + 62} tokens .* over "
        rf"data.max_length={template + 50}: set data.max_length={longest} .*or null",
    ):
        dm.setup()
    dm = SelfPlayDataModule(LocalFileSource(train=path), tokenizer, max_length=template + 50, bad_rows="skip")
    dm.setup()
    assert [len(r["response"]) for r in dm.load_split("train")] == [20] and dm.skipped["train"] == 2
    with pytest.raises(
        DataError,
        match=rf"row 1: field 'prompt' is {template + 1} tokens .* set data.max_prompt_length={template + 1}",
    ):
        SelfPlayDataModule(LocalFileSource(train=path), tokenizer, max_prompt_length=template).setup()


def test_rows_over_the_models_position_limit_cannot_fit(tmp_path):
    tokenizer = tiny_model(max_position_embeddings=64).tokenizer
    path = rows_file(
        tmp_path, "long.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d" * 80}]
    )
    with pytest.raises(
        DataError, match=r"long\.jsonl: row 2: .* over the model's position limit of 64 tokens"
    ):
        SelfPlayDataModule(LocalFileSource(train=path), tokenizer).setup()
    with pytest.raises(DataError, match="data.max_length=100 is over the model's position limit of 64"):
        SelfPlayDataModule(LocalFileSource(train=path), tokenizer, max_length=100).setup()
    # Generation room is cut to the limit, not refused: the rows themselves fit.
    dm = SelfPlayDataModule(LocalFileSource(train=path), tokenizer, max_new_tokens=500, bad_rows="skip")
    dm.setup()
    assert dm.max_length == 64 and dm.skipped["train"] == 1


# -- unreadable input is named -----------------------------------------------------------------


def test_non_utf8_jsonl_line_is_named_or_skipped(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        b'{"prompt": "ok", "response": "fine"}\n{"prompt": "caf\xe9", "response": "x"}\n'
        b'{"prompt": "two", "response": "y"}\n'
    )
    with pytest.raises(
        DataError, match=r"latin1\.jsonl: row 2: line 2 is not UTF-8 text \(byte 0xe9 at column 16\)"
    ):
        validate_rows(LocalFileSource(train=str(path)).load("train"))
    kept, skipped = validate_rows(LocalFileSource(train=str(path)).load("train"), bad_rows="skip")
    assert [r["prompt"] for r in kept] == ["ok", "two"] and skipped == 1


def test_non_utf8_csv_names_the_file(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,response\ncaf\xe9,x\n")
    with pytest.raises(DataError, match=r"latin1\.csv: cannot be read as csv .*not UTF-8"):
        LocalFileSource(train=str(path)).load("train")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet", ".json"])
def test_empty_file_is_named_as_empty(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=rf"empty{suffix}: the file is empty \(data.source.validation\)"):
        LocalFileSource(train="unused.jsonl", validation=str(path)).load("validation")


def test_blank_jsonl_and_all_rows_skipped_are_named(tmp_path, tokenizer):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DataError, match=r"blank\.jsonl: the file holds only blank lines"):
        LocalFileSource(train=str(blank)).load("train")
    bad = rows_file(tmp_path, "bad.jsonl", [{"prompt": "a"}, {"response": "b"}])
    dm = SelfPlayDataModule(LocalFileSource(train=bad), tokenizer, bad_rows="skip")
    with pytest.raises(
        DataError, match=r"bad\.jsonl: the training split has no usable rows \(2 bad rows skipped"
    ):
        dm.setup()


def test_directory_is_not_reported_as_missing(tmp_path):
    (tmp_path / "data.jsonl").mkdir()
    with pytest.raises(DataError, match=r"data\.jsonl: is a directory, not a file; set data.source.train"):
        LocalFileSource(train=str(tmp_path / "data.jsonl")).load("train")
