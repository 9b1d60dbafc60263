"""Modeling code bundled with exported checkpoints whose blocks differ in size.

The same file is copied next to such a checkpoint's weights (loaded with
``trust_remote_code=True``) and used in memory while candidates are evaluated, so the
model the search measured and the model a user loads are built by one piece of code.
"""
