"""Failure records (the payload of a non-OK ``RESULT`` or ``TASK_DONE``) as exceptions."""

from __future__ import annotations

import pickle
from typing import Optional, Tuple

from achilles.core import wire
from achilles.core.errors import AchillesError, TaskTimeout, WorkerCrashed, describe_exit
from achilles.core.serialization import load_error


def failure_exception(status: int, payload: bytes, work: str, node: str = "",
                      first_item: Optional[int] = None,
                      n_items: int = 1) -> Tuple[BaseException, Optional[int], list]:
    """The exception a failure record stands for: ``(exception, index, partial results)``.

    ``work`` names what ran (``"mod.fn"`` for a map chunk, ``"task f#3"`` for a graph task).
    For a map chunk ``first_item`` and ``n_items`` give its span of the input, so messages
    count items in input terms. ``index`` is the failing item's position inside the chunk
    when known (else None); ``partial`` holds the chunk's results before it. ``node``, when
    given, is named in crash messages.
    """
    if status == wire.ITEM_ERROR:
        index, exc, partial = load_error(payload)
        return exc, index, partial
    if status == wire.TIMED_OUT:
        seconds = pickle.loads(payload)
        return TaskTimeout(f"{_subject(work, first_item, n_items, None)} ran past its "
                           f"{seconds:g} s timeout; its worker process was killed and "
                           "replaced"), None, []
    if status == wire.CRASHED:
        record = pickle.loads(payload)
        exitcode, item = record[0], record[1]
        crashes = record[2] if len(record) > 2 else 1
        on_node = f" on node {node}" if node else ""
        crashed = WorkerCrashed(
            f"{_subject(work, first_item, n_items, item)} killed its worker process {crashes} "
            f"times (last: {describe_exit(exitcode)}{on_node})",
            item=None if item is None or first_item is None else first_item + item)
        return crashed, item, []
    return AchillesError(f"{work} failed with result status {status}, which this controller "
                         "does not know; upgrade Achilles here to match the server"), None, []


def _subject(work: str, first_item: Optional[int], n_items: int, item: Optional[int]) -> str:
    if first_item is None:
        return work
    if item is not None:
        return f"item {first_item + item} of {work}"
    return f"items {first_item}..{first_item + n_items - 1} of {work}"
