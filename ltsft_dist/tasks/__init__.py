"""The tasks: one module each (mlm, clm, instruct, classification, nli, qa, ner, pos, xcopa, xnli_ll, belebele),
registered by name in `tasks.base`; `choice` holds the log-likelihood multiple-choice scoring of decoders that
xcopa, xnli_ll and belebele use.

Each reader turns one official file format into plain records; each task's `encode` turns records into
`tasks.base.Encoded` the trainer feeds to a Hugging Face model and the evaluation scores. Every user-fixable
problem raises `LtsftError` naming the file, the line or record id, and the fix. Importing this package
registers every task; a new task is one new module here, imported below.
"""

from ltsft_dist.tasks import (  # noqa: F401  (each registers itself)
    classification, clm, instruct, mlm, ner, nli, pos, qa, xcopa, xnli_ll, belebele)
from ltsft_dist.tasks.base import FORMAT_NAMES, Encoded, Encoding, Task, format_problem, get_task, task_names

__all__ = ["FORMAT_NAMES", "Encoded", "Encoding", "Task", "format_problem", "get_task", "task_names"]
