"""Tiny real models, built with Hugging Face's own classes (litgpt-style tests)."""

import string

import pytest
import torch

ARCHS = {
    # name: (model_type, config overrides)
    "llama-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": ("llama", dict(num_attention_heads=8, num_key_value_heads=2)),
    "llama-bias": ("llama", dict(num_attention_heads=6, num_key_value_heads=3, attention_bias=True, mlp_bias=True)),
    "mistral-gqa": ("mistral", dict(num_attention_heads=8, num_key_value_heads=2)),
    "qwen2-gqa": ("qwen2", dict(num_attention_heads=6, num_key_value_heads=2)),
}


def tiny_config(arch: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    model_type, extra = ARCHS[arch]
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]
    kw = dict(vocab_size=len(ALPHABET) + 2, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              head_dim=8, max_position_embeddings=256, tie_word_embeddings=(arch == "llama-gqa"),
              bos_token_id=0, eos_token_id=1, pad_token_id=1)
    kw.update(extra)
    kw.update(overrides)
    return cls(**kw)


def tiny_model(arch: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation="sdpa")
    # random biases, so bias handling is exercised (HF initialises them to zero)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"


def char_tokenizer():
    """A character-level tokenizer built offline, so tiny models can go through the CLI."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(ALPHABET)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


@pytest.fixture
def text_ids():
    torch.manual_seed(1)
    return torch.randint(2, len(ALPHABET) + 2, (4096,))


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Llama saved as a Hugging Face folder, with a tokenizer, plus a text file."""
    model = tiny_model("llama-gqa")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    torch.manual_seed(2)
    text.write_text("".join(ALPHABET[i] for i in torch.randint(0, len(ALPHABET), (6000,)).tolist()))
    return folder, text


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    """Each test gets its own artifact cache; tests of the real demo model (marked slow)
    share the user's cache, so the GGUF is converted and the corpus fetched only once."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("SELFPRUNER_CACHE", str(tmp_path / "cache"))
