"""mmbench-merge: a benchmark harness for merging multimodal LLMs.

Importing the package is cheap on purpose: torch, transformers, lmms-eval, vLLM and wandb are imported
inside the functions that need them.
"""

__version__ = "0.1.0"


class MergeError(RuntimeError):
    """A bad input or a failed check. Its message is one line naming the file/tensor/key and what is wrong."""
