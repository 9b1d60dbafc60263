"""One exception type for input a user can fix, and the test that tells a failure of the
accelerator from a failure of what it was running.

The CLI turns a `UserError` into a single line on stderr and exit code 2 (3 for a
`DeviceFailed`, and for any other exception `is_device_error` recognises: run it again later);
anything else is a bug and keeps its traceback.
"""

import re


class UserError(Exception):
    """Bad input: the message says what to fix, in one line."""


class LLMUnavailable(UserError):
    """The LLM endpoint of an llm-evolution search answers nothing usable: nothing listens, the key
    or the model is refused, or whole rounds of calls fail. Without the LLM the search would go on
    as a classical one while reporting itself as llm-evolution, so it stops, naming the endpoint
    (never the key) and its last error; the checkpoint lets the same run resume once it is fixed."""


class DeviceFailed(UserError):
    """The accelerator failed (out of memory, a CUDA error) while loading the model or evaluating
    candidates: the candidates were not at fault, so nothing is recorded for them and the search
    stops before its next checkpoint; the same command resumes it once the device is free."""

    @staticmethod
    def describe(error: BaseException | str, limit: int = 240) -> str:
        """The error on one line, cut at `limit` characters (CUDA's out-of-memory message lists
        every process on the GPU)."""
        text = " ".join(str(error if isinstance(error, str) else f"{type(error).__name__}: {error}").split())
        return text if len(text) <= limit else text[:limit] + "…"


# the texts CUDA, the caching allocator, NCCL and the driver put in their errors; an EvalOutcome's
# error is "<exception type>: <message>", so the type names are matched too. cuDNN's attention graph
# fails to execute ("mha_graph.execute(...).is_good()") when its workspace cannot be had on a full
# GPU, and the same call succeeds on a free one; its NOT_SUPPORTED and BAD_PARAM are the input's
# fault and are left out.
_DEVICE_TEXT = re.compile(
    r"CUDA out of memory|\bOutOfMemoryError\b|CUDA error|CUDA driver error|device-side assert|NCCL error"
    r"|\bXid\b|\bAcceleratorError\b|\bDistBackendError\b|uncorrectable ECC error"
    r"|mha_graph\.execute\(|CUDNN_STATUS_(?:ALLOC_FAILED|EXECUTION_FAILED|INTERNAL_ERROR)", re.IGNORECASE)
_DEVICE_TYPES = {"OutOfMemoryError", "AcceleratorError", "DistBackendError"}  # torch's, matched by name:
# importing torch here would load it into the controller, which must stay light


def is_device_error(error: BaseException | str | None) -> bool:
    """Whether an exception (or the text an executor recorded for one) is the accelerator's failure
    rather than the candidate's: OOM, a CUDA or NCCL error, a device-side assert, an XID. The
    exception's causes are looked at too (a library may wrap the CUDA error in its own)."""
    if error is None:
        return False
    if isinstance(error, str):
        return bool(_DEVICE_TEXT.search(error))
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if any(t.__name__ in _DEVICE_TYPES for t in type(error).__mro__) or _DEVICE_TEXT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False
