"""LoRA as a memory option: only the adapters train, the cached opponent needs no copy."""

import pytest
import torch
from safetensors.torch import load_file

from spinlab.models import tiny_model
from tests.test_e2e import run

pytest.importorskip("peft")


def test_lora_trains_only_adapter_weights(tmp_path):
    summary, _ = run(tmp_path, "run", "model.lora={r:4,alpha:8}")
    assert summary[1]["pairs"] > 0
    saved = load_file(str(tmp_path / "run" / "hf" / "round_001" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    # B starts at zero in LoRA: non-zero now means the adapters trained.
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)


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
