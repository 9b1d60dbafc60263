"""Put on PYTHONPATH, this makes a test's child processes meet a failing GPU, which this CPU-only
machine cannot: torch's own OutOfMemoryError is raised where the model's weights would be
allocated (`model_source.load`), on the first SELFPRUNER_TEST_OOM_LOADS loads of all the child
processes together (a count kept in the file SELFPRUNER_TEST_OOM_COUNT). Nothing else changes."""

import os

if os.environ.get("SELFPRUNER_TEST_OOM_LOADS"):
    from pathlib import Path

    from selfpruner import model_source

    _real_load = model_source.load

    def _load(*args, **kwargs):
        count = Path(os.environ["SELFPRUNER_TEST_OOM_COUNT"])
        failed = int(count.read_text()) if count.exists() else 0
        if failed < int(os.environ["SELFPRUNER_TEST_OOM_LOADS"]):
            count.write_text(str(failed + 1))
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.89 GiB. GPU 0 has a total "
                                         "capacity of 79.18 GiB of which 2.31 GiB is free.")
        return _real_load(*args, **kwargs)

    model_source.load = _load
