"""The search for per-block pruning rates: space, strategies, LLM clients, the loop.

Free of Kubernetes and S3: evaluations go through an executor interface, so the same
loop runs in-process on one machine or fans out as cluster Jobs.
"""
