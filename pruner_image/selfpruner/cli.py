"""selfpruner: run or validate a PruneJob's search, prune a model, evaluate one; and the in-cluster entry points.

Bad input ends with one line on stderr saying what to fix, and exit code 2; a device that failed
or that other processes fill ends with one line and exit code 3 (the same command, run later,
resumes). The in-cluster commands (controller, worker, finalize) end the same way, in one line,
with the exit codes their Jobs act on (`cluster.pod_env` has the table): 42 for bad input, 1 for a transient failure.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import DeviceFailed, UserError, is_device_error

EXIT_DEVICE = 3  # the device failed or other processes hold it: the same command, run later, resumes

DEMO_EVAL_TEXT = "demo:heldout"


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo",
                   help="a Hugging Face folder, a .gguf file, hf://org/name, or 'demo' (SmolLM2-135M-Instruct; default)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _add_eval(p: argparse.ArgumentParser, prefix: str = "", several: bool = False) -> None:
    if several:  # a text per domain, and their geometric mean
        p.add_argument(f"--{prefix}text", action="append", default=None,
                       help="UTF-8 text file, or a demo: text such as demo:heldout (the default) or "
                            "demo:python-reference; repeat for texts of several domains")
    else:
        p.add_argument(f"--{prefix}text", default=DEMO_EVAL_TEXT,
                       help="UTF-8 text file, or demo:heldout / demo:fitness (default: demo:heldout)")
    p.add_argument(f"--{prefix}seq-len", type=int, default=2048, help="window length in tokens")
    p.add_argument(f"--{prefix}tokens", type=int, default=None, help="token budget (the fidelity); default: all")
    p.add_argument(f"--{prefix}batch-size", type=int, default=1)


def crd_enum(section: str, field: str) -> list[str]:
    from . import spec as spec_mod

    return list(spec_mod.schema()["properties"]["spec"]["properties"][section]["properties"][field]["enum"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfpruner", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model with given per-block rates and export it")
    _add_model(prune)
    rates = prune.add_mutually_exclusive_group(required=True)
    rates.add_argument("--rates", help="JSON file: a list with one rate per block, or {attention: [...], mlp: [...]}")
    rates.add_argument("--ratio", type=float, help="uniform rate for every block")
    prune.add_argument("--output", required=True, help="folder for the pruned checkpoint")
    prune.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    # defaults are the CRD's (a PruneJob's spec.pruning and spec.calibration): one source for both
    from .spec import defaulted_spec

    defaults = defaulted_spec({})
    pruning, calibration = defaults["pruning"], defaults["calibration"]
    prune.add_argument("--metric", default=pruning["metric"], choices=crd_enum("pruning", "metric"))
    comp = prune.add_mutually_exclusive_group()
    comp.add_argument("--bias-compensation", dest="bias_compensation", action="store_true",
                      default=pruning["biasCompensation"],
                      help="add the pruned channels' mean contribution to the output bias (default: on, as in a PruneJob)")
    comp.add_argument("--no-bias-compensation", dest="bias_compensation", action="store_false")
    prune.add_argument("--refit", action=argparse.BooleanOptionalAction, default=pruning["refit"],
                       help="refit o_proj and down_proj by least squares on the kept channels (default: off)")
    prune.add_argument("--head-mode", default=pruning["headMode"], choices=crd_enum("pruning", "headMode"),
                       help="remove the same query heads in every KV group, or whole KV groups")
    prune.add_argument("--mlp-multiple", type=int, default=pruning["mlpMultiple"],
                       help="keep MLP channels in multiples of this (default 8: unaligned widths run slower on GPUs)")
    prune.add_argument("--calibration-text", default=calibration["text"])
    prune.add_argument("--calibration-windows", type=int, default=calibration["windows"])
    prune.add_argument("--calibration-seq-len", type=int, default=calibration["seqLen"])
    prune.add_argument("--eval", action="store_true", help="also print dense and pruned perplexity")
    _add_eval(prune, prefix="eval-")
    prune.add_argument("--json", action="store_true", help="print the summary as JSON")

    run = sub.add_parser("run", help="run (or resume) the search a PruneJob YAML describes, on this machine")
    run.add_argument("prunejob", help="PruneJob YAML file")
    run.add_argument("--output", default=None, help="results folder (default: spec.output.path or runs/NAME)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    val = sub.add_parser("validate", help="check a PruneJob YAML against the CRD schema and the rules")
    val.add_argument("prunejob", help="PruneJob YAML file")

    sub.add_parser("controller", help="(in a cluster) run the search of the PruneJob in $SELFPRUNER_PRUNEJOB")
    sub.add_parser("worker", help="(in a cluster) evaluate this pod's shard of candidates")
    sub.add_parser("finalize", help="(in a cluster) export the best candidate into storage")

    ev = sub.add_parser("eval", help="perplexity of a model on a text, or its zero-shot accuracy (--tasks)")
    _add_model(ev)
    _add_eval(ev, several=True)
    ev.add_argument("--tasks", default=None,
                    help="zero-shot tasks through lm-eval, offline: 'paper' (the seven) or a comma list of "
                         "boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa")
    ev.add_argument("--limit", type=int, default=None, help="with --tasks: the first N documents of each task")
    ev.add_argument("--backend", default="hf", choices=("hf", "vllm"),
                    help="with --tasks: transformers in this process (default) or vLLM (the serve extra)")
    ev.add_argument("--output", default=None,
                    help="also write the result as JSON here (with --tasks: the scores and the table)")
    ev.add_argument("--json", action="store_true", help='print {"perplexity": ..., "tokens": ...} (or the scores)')
    ev.set_defaults(batch_size=None)  # 1 for perplexity, 8 for zero-shot tasks
    return parser


def cmd_validate(args) -> int:
    from . import spec

    job = spec.load(args.prunejob)
    s = job.spec.search
    print(f"{args.prunejob}: valid PruneJob {job.metadata['name']!r} (strategy {s.strategy}, "
          f"budget {spec.budget(job):g} evaluations, ratio {job.spec.target.ratio})")
    return 0


def cmd_run(args) -> int:
    from . import spec
    from .search import report, runner

    job = spec.load(args.prunejob)
    out = args.output or runner.output_dir(job)
    try:
        result = runner.run(job, progress=not args.quiet, out_dir=out)
    except KeyboardInterrupt:
        print(f"selfpruner: interrupted; progress is saved in {out}; run the same command again to resume",
              file=sys.stderr)
        return 130
    print(report.summary_table(result))
    print(f"results: {out}/result.json, history.jsonl, fitness.png, rates.png")
    return 0


def cmd_cluster(args) -> int:
    """The pods' entry points answer for themselves (`cluster.pod_env`): no UserError reaches main()."""
    from .cluster import controller, worker

    return {"controller": controller.main, "worker": worker.worker, "finalize": worker.finalize}[args.command]()


# flags that set what a PruneJob's field sets: they take the CRD's bounds (one source for both)
CRD_FIELDS = {
    "calibration_windows": ("calibration", "windows"), "calibration_seq_len": ("calibration", "seqLen"),
    "mlp_multiple": ("pruning", "mlpMultiple"), "seq_len": ("fitness", "seqLen"), "tokens": ("fitness", "tokens"),
    "batch_size": ("fitness", "batchSize"), "eval_seq_len": ("fitness", "seqLen"), "eval_tokens": ("fitness", "tokens"),
    "eval_batch_size": ("fitness", "batchSize"), "limit": ("search", "zeroShotLimit"),
}


def _check_minima(args, names: tuple[str, ...]) -> None:
    """Each of these flags at least its PruneJob field's minimum (a window of 1 token is no window)."""
    from . import spec as spec_mod

    props = spec_mod.schema()["properties"]["spec"]["properties"]
    for name in names:
        value = getattr(args, name)
        section, field = CRD_FIELDS[name]
        minimum = props[section]["properties"][field].get("minimum", 1)
        if value is not None and value < minimum:
            raise UserError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


def _device(args) -> str:
    """The device the flags (or SELFPRUNER_DEVICE) name, if this machine has it: checked before loading."""
    from . import model_source

    return model_source.check_device(args.device) if args.device else model_source.default_device()


def _read_text(source: str) -> str:
    from . import corpus

    return corpus.load_text(source)


def cmd_eval(args) -> int:
    from . import corpus, evaluate, model_source, preflight
    from .paths import check_writable

    _check_minima(args, ("seq_len", "tokens", "batch_size", "limit"))
    device = _device(args)
    if args.output:
        check_writable(args.output, "--output", folder=False)
    if args.tasks is not None:
        return _zero_shot(args, device)
    sources = args.text or [DEMO_EVAL_TEXT]
    if len(set(sources)) < len(sources):
        raise UserError("--text names the same text twice; give each text once")
    tokenizer = model_source.load_tokenizer(args.model)
    tokens = f", --tokens {args.tokens}" if args.tokens else ""
    all_ids = []
    for source in sources:  # a bad or short text file should not cost a model load
        text = _read_text(source)
        all_ids.append(corpus.tokenize(tokenizer, text))
        preflight.evaluation_text(tokenizer, source, text, seq_len=args.seq_len, tokens=args.tokens, ids=all_ids[-1],
                                  what="--text", lower="--seq-len", asked=f"--seq-len {args.seq_len}{tokens}")
    loaded = model_source.load(args.model, dtype=args.dtype, device=device)
    results = [evaluate.perplexity(loaded.model, ids, seq_len=args.seq_len, max_tokens=args.tokens,
                                   batch_size=args.batch_size or 1, progress=not args.json) for ids in all_ids]
    if len(sources) == 1:
        out = results[0].to_dict()
        written = {"model": args.model, "text": sources[0], "seq_len": args.seq_len, **out}
    else:
        from .search.finish import geometric_mean

        out = {"texts": [{"text": s, **r.to_dict()} for s, r in zip(sources, results)],
               "geometric_mean": geometric_mean([r.perplexity for r in results])}
        written = {"model": args.model, "seq_len": args.seq_len, **out}
    if args.output:
        _write_json(args.output, written)
    if args.json:
        print(json.dumps(out))
    else:
        for source, r in zip(sources, results):
            print(f"perplexity {r.perplexity:.3f} over {r.tokens} tokens of {source}")
        if len(sources) > 1:
            print(f"geometric mean {out['geometric_mean']:.3f} over {len(sources)} texts")
    return 0


def _write_json(path: str, data: dict) -> None:
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _zero_shot(args, device: str) -> int:
    from . import model_source, zero_shot

    tasks = zero_shot.parse_tasks(args.tasks)  # a wrong task name should not cost a model load
    batch = args.batch_size or 8
    if args.backend == "vllm":
        folder, _ = model_source.resolve(args.model)
        scores = zero_shot.evaluate(None, None, tasks, limit=args.limit, batch_size=batch, device=device,
                                    backend="vllm", checkpoint=folder)
    else:
        loaded = model_source.load(args.model, dtype=args.dtype, device=device)
        scores = zero_shot.evaluate(loaded.model, loaded.tokenizer, tasks, limit=args.limit, batch_size=batch,
                                    device=device)
    result = {"model": args.model, "limit": args.limit, **zero_shot.summary({args.model: scores}, args.limit, batch)}
    if args.output:
        _write_json(args.output, result)
    print(json.dumps(result) if args.json else zero_shot.markdown(result["table"]))
    return 0


def cmd_prune(args) -> int:
    from .paths import check_output_folder

    _check_minima(args, ("calibration_windows", "calibration_seq_len", "eval_seq_len", "eval_tokens",
                         "eval_batch_size", "mlp_multiple"))
    if args.ratio is not None and not 0.0 <= args.ratio < 1.0:
        raise UserError(f"--ratio {args.ratio}: a rate must be in [0, 1)")
    check_output_folder(args.output, force=args.force, what="--output")  # fail before any expensive work
    device = _device(args)
    from . import corpus, engine, model_source, preflight, structure
    from .architecture import check_supported, geometry_of

    settings = engine.PruneSettings(
        metric=args.metric, bias_compensation=args.bias_compensation, refit=args.refit, head_mode=args.head_mode,
        mlp_multiple=args.mlp_multiple, calibration_text=args.calibration_text,
        calibration_windows=args.calibration_windows, calibration_seq_len=args.calibration_seq_len,
    )
    # cheap checks first: the rates file and the texts, then the model's config and tokenizer, and
    # only then its weights and the calibration
    raw_rates = structure.read_json(args.rates) if args.rates else None
    eval_text = _read_text(args.eval_text) if args.eval else None
    _read_text(settings.calibration_text)
    config = model_source.load_config(args.model)
    check_supported(config)
    g = geometry_of(config)
    rates = (structure.Rates.parse(raw_rates, g.num_layers, source=args.rates) if raw_rates is not None
             else structure.Rates.uniform(args.ratio, g.num_layers))
    structure.check_mlp_multiple(g, rates, head_mode=args.head_mode, multiple=args.mlp_multiple,
                                 name="--mlp-multiple")
    tokenizer = model_source.load_tokenizer(args.model)
    preflight.calibration_text(tokenizer, settings, text="--calibration-text", windows="--calibration-windows",
                               seq_len="--calibration-seq-len")
    if args.eval:
        ids = corpus.tokenize(tokenizer, eval_text)
        tokens = f", --eval-tokens {args.eval_tokens}" if args.eval_tokens else ""
        preflight.evaluation_text(tokenizer, args.eval_text, eval_text, seq_len=args.eval_seq_len,
                                  tokens=args.eval_tokens, ids=ids, what="--eval-text", lower="--eval-seq-len",
                                  asked=f"--eval-seq-len {args.eval_seq_len}{tokens}")
    from . import evaluate, export

    loaded = engine.load(args.model, dtype=args.dtype, device=device)
    plan = structure.plan_from_rates(g, rates, head_mode=args.head_mode, mlp_multiple=args.mlp_multiple)
    eng = engine.build(loaded, settings, progress=not args.json)
    summary = {"model": args.model, "target_ratio": _mean_target(rates, g), "achieved_ratio": plan.achieved_ratio}
    if args.eval:
        kw = dict(seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, batch_size=args.eval_batch_size,
                  progress=not args.json)
        summary["dense"] = evaluate.perplexity(eng.loaded.model, ids, **kw).to_dict()
    eng.pm.apply(plan, mode="slice")
    if args.eval:
        summary["pruned"] = evaluate.perplexity(eng.loaded.model, ids, **kw).to_dict()
        summary["eval_text"] = args.eval_text
    info = {"source_model": args.model, "rates": rates.to_json(), **settings.describe()}
    if args.eval:
        info["perplexity"] = {"text": args.eval_text, "dense": summary["dense"], "pruned": summary["pruned"]}
    out = export.export(eng.pm, eng.loaded.tokenizer, args.output, info=info, force=args.force)
    summary["output"] = str(out)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"pruned {args.model}: target ratio {summary['target_ratio']:.4f}, achieved {plan.achieved_ratio:.4f}")
        if args.eval:
            d, p = summary["dense"], summary["pruned"]
            print(f"perplexity on {args.eval_text} ({p['tokens']} tokens): dense {d['perplexity']:.2f}, "
                  f"pruned {p['perplexity']:.2f}")
        print(f"checkpoint written to {out}")
    return 0


def _mean_target(rates, g) -> float:
    if not rates.separate:
        return sum(rates.block) / len(rates.block)
    a, m = g.dense_attention_params, g.dense_mlp_params
    return sum(ra * a + rm * m for ra, rm in zip(rates.attention, rates.mlp)) / (len(rates.attention) * (a + m))


def _quiet_transformers() -> None:
    """Our own progress bars and errors only: transformers' are noise to a CLI user."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" not in sys.modules:
        return  # it reads the two variables when first imported: importing it now would cost a second
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "controller":  # the controller runs no model: importing transformers costs its start
        _quiet_transformers()
    try:
        commands = {"eval": cmd_eval, "prune": cmd_prune, "run": cmd_run, "validate": cmd_validate,
                    "controller": cmd_cluster, "worker": cmd_cluster, "finalize": cmd_cluster}
        return commands[args.command](args)
    except UserError as e:
        for line in str(e).splitlines():
            print(f"selfpruner: error: {line}", file=sys.stderr)
        return EXIT_DEVICE if isinstance(e, DeviceFailed) else 2
    except KeyboardInterrupt:
        print("selfpruner: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - only the device's failures; anything else is a bug, traceback kept
        if not is_device_error(e):
            raise
        # outside the paths that say it themselves (the Evaluator, loading): the LLM's generation, the
        # zero-shot tasks, a prune or an eval. The run's checkpoint holds every generation before it.
        print(f"selfpruner: error: the device failed ({DeviceFailed.describe(e)}); free it (another process "
              "may hold its memory) and run the same command again: a run resumes from its last checkpoint",
              file=sys.stderr)
        return EXIT_DEVICE


if __name__ == "__main__":
    sys.exit(main())
