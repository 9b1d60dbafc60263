"""selfpruner: search per-layer structured-pruning rates of LLaMA-family LLMs.

The pruning engine (this package's core) knows nothing of Kubernetes, S3 or LLM
clients, so it runs and is tested anywhere.
"""

__version__ = "0.1.0"
