"""Bad input ends in the documented error or a counted skip, never a crash elsewhere."""

import json
import re
import shutil

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spinlab.config import own_keys
from spinlab.data import SelfPlayDataModule
from spinlab.models import char_tokenizer
from spinlab.sources import DataError, LocalFileSource, validate_rows
from tests.conftest import CONF, compose_cfg

TOKENIZER = char_tokenizer()

good_text = st.text(alphabet="abcdefghij 0123456789+*=?", min_size=1, max_size=20).filter(str.strip)
bad_value = st.one_of(
    st.none(), st.integers(), st.just(""), st.just("   "), st.lists(st.integers(), max_size=2)
)
row = st.one_of(
    st.fixed_dictionaries({"prompt": good_text, "response": good_text}),
    st.fixed_dictionaries({"prompt": bad_value, "response": good_text}),
    st.fixed_dictionaries({"prompt": good_text, "response": bad_value}),
    st.fixed_dictionaries({"prompt": good_text}),
    st.fixed_dictionaries({"response": good_text}),
    st.lists(st.integers(), max_size=2),  # not an object
    st.just("{not json"),  # an invalid line
)


def write(path, rows):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("".join(line + "\n" for line in lines))


def is_good(r) -> bool:
    return isinstance(r, dict) and all(
        isinstance(r.get(k), str) and r[k].strip() for k in ("prompt", "response")
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row, min_size=1, max_size=12))
def test_malformed_rows_error_by_row_or_are_skipped_and_counted(tmp_path, rows):
    path = tmp_path / "data.jsonl"
    write(path, rows)
    seen, expected_kept, first_bad = set(), [], None
    for i, r in enumerate(rows, 1):
        if is_good(r) and r["prompt"] not in seen:
            seen.add(r["prompt"])
            expected_kept.append(r["prompt"])
        elif first_bad is None:
            first_bad = i
    source = LocalFileSource(train=str(path))
    if first_bad is None:
        kept, skipped = validate_rows(source.load("train"))
        assert [r["prompt"] for r in kept] == expected_kept and skipped == 0
    else:
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: row {first_bad}: "):
            validate_rows(source.load("train"))
    kept, skipped = validate_rows(source.load("train"), bad_rows="skip")
    assert [r["prompt"] for r in kept] == expected_kept
    assert skipped == len(rows) - len(expected_kept)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row, min_size=1, max_size=8))
def test_the_data_module_never_fails_inside_collate(tmp_path, rows):
    path = tmp_path / "data.jsonl"
    write(path, rows)
    dm = SelfPlayDataModule(
        LocalFileSource(train=str(path)), TOKENIZER, max_length=96, max_prompt_length=64, bad_rows="skip"
    )
    kept = dm.load_split("train")
    dm.set_pairs(
        [{"prompt": r["prompt"], "real": r["response"], "synthetic": r["response"][::-1]} for r in kept]
    )
    for batch in dm.scoring_dataloader() if kept else []:
        assert batch["input_ids"].shape[0] == 2 * len(batch["index"])


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "resp\n')
    with pytest.raises(DataError, match=r"d\.jsonl: row 2: line 3 is not valid JSON"):
        validate_rows(LocalFileSource(train=str(path)).load("train"))


def test_unreadable_parquet_is_named(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"d\.parquet: cannot be read as parquet"):
        LocalFileSource(train=str(path)).load("train")


def test_tokenizer_without_chat_template_gets_a_clear_error_or_the_fallback():
    tok = char_tokenizer()
    tok.chat_template = None
    dm = SelfPlayDataModule(None, tok)
    with pytest.raises(DataError, match="no chat template.*data.chat_template=chatml"):
        dm.encode_prompt("hi")
    dm = SelfPlayDataModule(None, tok, chat_template="chatml")
    assert tok.decode(dm.encode_prompt("hi")) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_without_pad_token_pads_with_eos():
    tok = char_tokenizer()
    tok.pad_token = None
    dm = SelfPlayDataModule(None, tok, max_length=64, max_prompt_length=32)
    dm.set_pairs([{"prompt": "a", "real": "bbb", "synthetic": "c"}])
    batch = dm.collate(dm.encoded)
    assert batch["input_ids"][1, -1].item() == tok.eos_token_id
    assert batch["attention_mask"][1, -1].item() == 0


# -- config mistakes fail at start -----------------------------------------------------------


def test_mistyped_top_level_key_in_a_yaml_file_fails_at_compose(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "mine.yaml").write_text("# @package _global_\nlamda: 0.5\n")
    with (
        initialize_config_dir(config_dir=str(conf), version_base="1.3"),
        pytest.raises(ConfigCompositionException) as err,
    ):
        compose(config_name="train", overrides=["experiment=mine"])
    assert "lamda" in str(err.value.__cause__ or err.value)


@pytest.mark.parametrize("override", ["lam=abc", "rounds=2.5", "seed=x"])
def test_wrongly_typed_value_fails_at_compose(override):
    with pytest.raises(ConfigCompositionException, match=re.escape(override)):
        compose_cfg([override])


def test_mistyped_group_key_fails_at_instantiate_naming_it():
    cfg = compose_cfg(["debug=fast", "+data.batch_sise=3"])
    with pytest.raises(InstantiationException, match="batch_sise"):
        instantiate(own_keys(cfg, "data"), tokenizer=TOKENIZER)


@pytest.mark.parametrize(
    "override, message",
    [("opponent=ema", "opponent='ema'"), ("module.on_nonfinite=ignore", "on_nonfinite='ignore'")],
)
def test_impossible_module_settings_fail_at_instantiate(override, message):
    from spinlab.models import tiny_model

    cfg = compose_cfg(["debug=fast", override])
    with pytest.raises(InstantiationException, match=re.escape(message)):
        instantiate(cfg.module, policy=tiny_model().model)


# -- everything the user gave is checked before any weights load --------------------------------


@pytest.fixture
def no_weights(monkeypatch):
    """Makes loading any model's weights an error, and counts the attempts."""
    import spinlab.models

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("model weights loaded before the input was checked")

    monkeypatch.setattr(spinlab.models, "LlamaForCausalLM", refuse)
    monkeypatch.setattr(spinlab.models.AutoModelForCausalLM, "from_pretrained", refuse)
    return calls


def test_bad_validation_file_fails_before_the_model_loads(tmp_path, no_weights):
    import spinlab.run

    good = tmp_path / "train.jsonl"
    write(good, [{"prompt": f"q{i}", "response": "a"} for i in range(4)])
    bad = tmp_path / "val.jsonl"
    write(bad, [{"prompt": "v1", "response": "a"}, {"prompt": "v2"}])
    cfg = compose_cfg(
        ["debug=fast", "data=local", f"data.source.train={good}", f"data.source.validation={bad}"],
        tmp_path / "run",
    )
    with pytest.raises(DataError, match=r"val\.jsonl: row 2: field 'response' is missing"):
        spinlab.run.run(cfg)
    assert no_weights == []
    assert not (tmp_path / "run" / "rounds").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("+data.batch_sise=3", r"data: spinlab.data.SelfPlayDataModule takes no key 'batch_sise'"),
        (
            "+data.source.n_trian=5",
            r"data.source: spinlab.tasks.arithmetic.ArithmeticTask takes no key 'n_trian'",
        ),
        (
            "+generation.temprature=0.5",
            r"generation: spinlab.generation.hf.HFGenerator takes no key 'temprature'",
        ),
        (
            "+callbacks.self_play.round=2",
            r"callbacks.self_play: spinlab.callbacks.SelfPlayCallback takes no key",
        ),
    ],
)
def test_mistyped_group_key_fails_at_start_naming_group_class_and_key(
    tmp_path, no_weights, override, message
):
    import spinlab.run

    with pytest.raises(ValueError, match=message):
        spinlab.run.run(compose_cfg(["debug=fast", override], tmp_path / "run"))
    assert no_weights == []


def test_hf_model_reads_its_tokenizer_and_position_limit_without_weights(tmp_path, monkeypatch):
    import spinlab.models
    from spinlab.models import pretrained, tiny_model

    tiny = tiny_model(max_position_embeddings=300)
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    calls = []
    real = spinlab.models.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        spinlab.models.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: calls.append(a) or real(*a, **k),
    )
    loaded = pretrained(str(tmp_path / "m"))
    assert loaded.max_positions == 300 and loaded.tokenizer.eos_token == "<|im_end|>" and calls == []
    assert loaded.model.config.max_position_embeddings == 300 and len(calls) == 1
    loaded.model  # noqa: B018  (loaded once, then kept)
    assert len(calls) == 1
