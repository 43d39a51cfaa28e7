"""The processes of ``accelerate launch``, set up once, with room for uneven work.

Ranks wait for each other where work is shared unevenly (one process records a long video
prompt or calibrates a budget row while the others wait), and NCCL's default watchdog
gives up after 10 minutes; the timeout here is long enough for a real model's prompt.
The process group is destroyed at exit, as torch asks: left to the interpreter's teardown,
its threads can abort a process that finished its work.
"""

from __future__ import annotations

import atexit
import functools
from datetime import timedelta

from accelerate import Accelerator, InitProcessGroupKwargs, PartialState

#: How long a process waits at a barrier for the others.
TIMEOUT = timedelta(hours=2)


def processes() -> Accelerator:
    """An ``Accelerator`` for this process (one process without ``accelerate launch``)."""
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=TIMEOUT)])
    if accelerator.num_processes > 1:
        _destroy_at_exit()
    return accelerator


@functools.cache
def _destroy_at_exit() -> None:
    atexit.register(lambda: PartialState().destroy_process_group())
