"""The background writer of ``CheckpointRotation(async_save=True)``, seen from ``handlers``.

The machinery (one writer thread, back-pressure, failures raised on the
calling thread, the wait at interpreter exit) lives in
:mod:`engine_kit.checkpoint.background`, shared with
``CheckpointDirectory.commit_async``; these names are re-exported so that
handler code can keep importing them from here. Its tunables
(``WRITER_NICENESS``, ``EXIT_WAIT_S``) are read from that module: set them there.

>>> from handlers.background_save import BackgroundSaves
>>> BackgroundSaves().pending
False
"""

from engine_kit.checkpoint.background import (
    EXIT_WAIT_S,
    WRITER_NICENESS,
    WRITER_THREAD_NAME,
    BackgroundSaves,
    write_failure,
)

__all__ = ["EXIT_WAIT_S", "WRITER_NICENESS", "WRITER_THREAD_NAME", "BackgroundSaves", "write_failure"]
