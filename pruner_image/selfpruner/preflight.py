"""Checks of a command's input that need the model's config or tokenizer but not its weights.

`selfpruner prune`, `eval` and every executor of a PruneJob run them before the model loads and
calibrates (minutes for a large model), so bad input costs seconds. Each says, in one line, which
flag or spec field to change; the names differ (`--calibration-windows`, `spec.calibration.windows`),
the rules do not.
"""

from __future__ import annotations

from . import corpus, evaluate
from .errors import UserError


def calibration_text(tokenizer, settings, *, text: str, windows: str, seq_len: str) -> None:
    """The calibration text holds `windows` windows of `seq_len` tokens (where the metric reads it
    at all). `text`, `windows`, `seq_len`: the names of the three settings, for the message."""
    if not settings.needs_calibration:
        return
    need = settings.calibration_windows * settings.calibration_seq_len
    n = corpus.count_tokens(tokenizer, corpus.load_text(settings.calibration_text), need)
    if n >= need:
        return
    fits = n // settings.calibration_seq_len
    fix = (f"lower {windows} to at most {fits}" if fits else f"lower {seq_len} to at most {n}")
    raise UserError(f"{text} {settings.calibration_text} has {n} tokens, fewer than {windows} × {seq_len} = "
                    f"{settings.calibration_windows} × {settings.calibration_seq_len} = {need}; {fix}, "
                    "or give a longer text")


def evaluation_text(tokenizer, source: str, text: str, *, seq_len: int, tokens: int | None, what: str,
                    asked: str, lower: str, whole: bool = False, ids=None) -> None:
    """An evaluation text holds one window (`evaluate.window_length`), or with `whole` all the
    `tokens` one evaluation reads (a fitness: with fewer, every fidelity would read the same text).
    For the message: `what` names the text, `asked` the settings as the user gave them, `lower` the
    setting whose lowering to the text's length fixes it. `ids`: the text already tokenized."""
    window = evaluate.window_length(seq_len, tokens)
    need = tokens if whole and tokens is not None else window
    n = len(ids) if ids is not None else corpus.count_tokens(tokenizer, text, need)
    if n >= need:
        return
    short = (f"fewer than the {tokens} one evaluation reads" if n >= window
             else f"fewer than one evaluation window of {window}")
    fix = f"give a longer text or lower {lower} to at most {n}" if n >= 2 else "give a longer text"
    raise UserError(f"{what} {source} has {n} tokens, {short} ({asked}); {fix}")
