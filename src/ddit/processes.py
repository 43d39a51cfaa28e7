"""The processes of ``accelerate launch``, set up once, with room for uneven work.

Ranks wait for each other where work is shared unevenly (one process records a long video
prompt or calibrates a budget row while the others wait), and NCCL's default watchdog
gives up after 10 minutes; the timeout here is long enough for a real model's prompt.
"""

from __future__ import annotations

from datetime import timedelta

from accelerate import Accelerator, InitProcessGroupKwargs

#: How long a process waits at a barrier for the others.
TIMEOUT = timedelta(hours=2)


def processes() -> Accelerator:
    """An ``Accelerator`` for this process (one process without ``accelerate launch``)."""
    return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=TIMEOUT)])
