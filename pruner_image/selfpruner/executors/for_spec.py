"""The in-process executor a PruneJob spec describes: its pruning settings, model and texts,
checked against the model's config and tokenizer (`check_inputs`) before its weights load.
Shared by a local run and the cluster's GPU workers, which must not need the search loop. The
engine (torch, transformers) is imported only when an executor is made: the cluster's controller
imports the search loop, and this module with it, without ever running a model itself."""

from __future__ import annotations

import os

from ..spec import Section


def engine_settings(spec: Section):
    """The engine's PruneSettings for the spec's pruning and calibration sections."""
    from .. import engine

    p, c = spec.spec.pruning, spec.spec.calibration
    return engine.PruneSettings(metric=p.metric, bias_compensation=p.bias_compensation, refit=p.refit,
                                head_mode=p.head_mode,
                                mlp_multiple=p.mlp_multiple, calibration_text=c.text,
                                calibration_windows=c.windows, calibration_seq_len=c.seq_len)


def workload(spec: Section):
    """What the memory plan sizes the working sets by."""
    from ..memory_plan import Workload

    s = spec.spec
    return Workload(dtype=s.model.dtype, batch_size=s.fitness.batch_size, seq_len=s.fitness.seq_len,
                    calibration_seq_len=s.calibration.seq_len, head_mode=s.pruning.head_mode,
                    refit=s.pruning.refit)


def held_out_texts(fitness) -> list[tuple[str, str, str]]:
    """(label, source, field) of every held-out text: `heldout` for heldOutText, `heldout-2` ... for
    heldOutTexts. The labels name the texts in evaluation tasks and the fitness cache, so they must
    not change with a text's source (a file moved) and must stay short and plain."""
    out = [("heldout", fitness.held_out_text, "spec.fitness.heldOutText")]
    out += [(f"heldout-{i + 2}", source, f"spec.fitness.heldOutTexts[{i}]")
            for i, source in enumerate(fitness.get("heldOutTexts") or [])]
    return out


def load_texts(fitness, load) -> dict[str, str]:
    """{label: text} of the fitness text and every held-out text, each read with `load(source)`."""
    return {"fitness": load(fitness.text), **{label: load(source) for label, source, _ in held_out_texts(fitness)}}


def local_llm_need(spec: Section) -> tuple[str, int] | None:
    """(device, bytes) of the local LLM an llm-evolution search runs in this process
    (`runner.make_llm` puts it on SELFPRUNER_LLM_DEVICE or the default device), so that the memory
    plan of a model on the same GPU leaves it room; None for an endpoint or an LLM on the CPU."""
    s = spec.spec
    if s.search.strategy != "llm-evolution" or s.llm.provider != "local":
        return None
    from .. import memory_plan, model_source

    device = os.environ.get("SELFPRUNER_LLM_DEVICE") or model_source.default_device()
    if not device.startswith("cuda"):
        return None
    blocks = model_source.load_config(s.model.source).num_hidden_layers
    need = memory_plan.local_llm(model_source.load_config(s.llm.model), s.llm.batch_size, blocks)
    return model_source.indexed(device), need


def make_executor(spec: Section, progress: bool = True, model: str | None = None, texts: dict | None = None,
                  local_llm: bool = False):
    """The in-process executor; `model` and `texts` override where the model and the
    texts are read from (a worker pod passes the node-cache copy of an s3:// model).
    `local_llm`: this process also runs the search's LLM (`selfpruner run`, not a worker pod)."""
    from .. import corpus

    f = spec.spec.fitness
    if texts is None:
        texts = load_texts(f, corpus.load_text)
    devices = [d for d in os.environ.get("SELFPRUNER_DEVICES", "").split(",") if d] or None
    model = model or spec.spec.model.source
    check_inputs(spec, model, texts, devices or [])
    from .local import LocalExecutor  # the engine: seconds to import, so after the checks

    return LocalExecutor(model, engine_settings(spec), texts, dtype=spec.spec.model.dtype,
                         seq_len=f.seq_len, batch_size=f.batch_size, devices=devices,
                         progress=progress, gpus_per_replica=spec.spec.evaluator.gpus_per_replica,
                         metric=f.metric, top_k=f.top_k, local_llm=local_llm_need(spec) if local_llm else None)


def check_inputs(spec: Section, model: str, texts: dict[str, str], devices: list[str]) -> None:
    """What the spec asks of this machine, the model and the texts, checked with the model's config
    and tokenizer before its weights load or calibration runs; one line naming the field otherwise."""
    from .. import model_source, preflight, structure
    from ..architecture import check_supported, geometry_of

    for d in devices:
        model_source.check_device(d, "SELFPRUNER_DEVICES")
    s = spec.spec
    config = model_source.load_config(model)
    check_supported(config)
    g = geometry_of(config)
    structure.check_mlp_multiple(g, structure.Rates.uniform(s.target.ratio, g.num_layers),
                                 head_mode=s.pruning.head_mode, multiple=s.pruning.mlp_multiple,
                                 name="spec.pruning.mlpMultiple")
    tokenizer = model_source.load_tokenizer(model)
    preflight.calibration_text(tokenizer, engine_settings(spec), text="spec.calibration.text",
                               windows="spec.calibration.windows", seq_len="spec.calibration.seqLen")
    f = s.fitness
    preflight.evaluation_text(tokenizer, f.text, texts["fitness"], seq_len=f.seq_len, tokens=f.tokens, whole=True,
                              what="spec.fitness.text", lower="spec.fitness.tokens",
                              asked=f"spec.fitness.tokens {f.tokens}, seqLen {f.seq_len}")
    for label, source, field in held_out_texts(f):
        preflight.evaluation_text(tokenizer, source, texts[label], seq_len=f.seq_len,
                                  tokens=f.held_out_tokens, what=field, lower="spec.fitness.heldOutTokens",
                                  asked=f"spec.fitness.heldOutTokens {f.held_out_tokens}, seqLen {f.seq_len}")
