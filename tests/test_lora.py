"""LoRA as a memory option: only the adapters train, the cached opponent needs no copy."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from spinlab import push
from spinlab.models import tiny_model
from tests.test_cards import Hub
from tests.test_e2e import run

pytest.importorskip("peft")


def test_lora_trains_only_adapter_weights(tmp_path, monkeypatch, capsys):
    summary, _ = run(tmp_path, "run", "model.lora={r:4,alpha:8}")
    assert summary[1]["pairs"] > 0
    saved = load_file(str(tmp_path / "run" / "hf" / "round_001" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    # B starts at zero in LoRA: non-zero now means the adapters trained.
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)

    # The card says it is an adapter (spinlab's, not the placeholder peft saves with it).
    card = ModelCard.load(tmp_path / "run" / "hf" / "round_001" / "README.md")
    assert card.data.library_name == "peft" and {"lora", "spin"} <= set(card.data.tags)
    assert card.data.spinlab["adapter"] is True and card.data.spinlab["settings"]["lora"] == {
        "r": 4,
        "alpha": 8,
    }
    assert (
        "This is a LoRA adapter, not a full model" in card.text
        and "[More Information Needed]" not in card.text
    )
    assert "PeftModel.from_pretrained(base," in card.text  # the tiny base is built in code

    # Pushed, it names its base model by hub id, in the card and in adapter_config.json; the
    # tiny model has none, so the push asks for it.
    hub = Hub(monkeypatch)
    assert push.main([str(tmp_path / "run"), "--repo", "me/lora-spin", "--no-data"]) == 2
    assert "is a LoRA adapter on a random tiny Llama built in code" in capsys.readouterr().err
    assert (
        push.main([str(tmp_path / "run"), "--repo", "me/lora-spin", "--no-data", "--base-model", "me/tiny"])
        == 0
    )
    upload = hub.uploads[-1]
    assert upload["repo_id"] == "me/lora-spin-iter1" and "adapter_model.safetensors" in upload["files"]
    assert json.loads(upload["content"]["adapter_config.json"])["base_model_name_or_path"] == "me/tiny"
    pushed = ModelCard(upload["content"]["README.md"].decode())
    assert pushed.data.base_model == "me/tiny" and pushed.data.base_model_relation == "adapter"
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/lora-spin-iter1")' in pushed.text


def test_lora_policy_freezes_the_base_model():
    loaded = tiny_model(seed=0, lora={"r": 4, "alpha": 8})
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base = tiny_model(seed=0).model.state_dict()
    merged = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in loaded.model.state_dict().items()
    }
    for name, tensor in base.items():
        assert torch.equal(merged[name], tensor), name


def test_unknown_lora_key_is_named():
    with pytest.raises(ValueError, match="model.lora: unknown keys \\['rank'\\]"):
        tiny_model(lora={"rank": 4})
