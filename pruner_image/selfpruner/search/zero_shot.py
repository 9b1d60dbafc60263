"""Zero-shot tasks through lm-eval on the exported checkpoint, when the user asks for
them and lm-eval and the task data are reachable; otherwise a recorded reason why not
(a search result is never lost to a missing benchmark dataset)."""

from __future__ import annotations


def run(checkpoint: str, tasks: list[str], *, dtype: str = "float32", device: str | None = None,
        batch_size: int = 8) -> dict:
    if not tasks:
        return {}
    try:
        import lm_eval
    except ImportError:
        return {"skipped": "lm-eval is not installed: pip install lm-eval", "tasks": tasks}
    args = f"pretrained={checkpoint},trust_remote_code=True,dtype={dtype}"
    try:
        out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=tasks, batch_size=batch_size,
                                      device=device)
    except Exception as e:  # unknown task, data not downloadable offline, ...
        first = str(e).splitlines()[0] if str(e) else ""
        return {"skipped": f"lm-eval could not run: {type(e).__name__}: {first}", "tasks": tasks}
    return {"results": {task: out["results"].get(task) for task in tasks}}
