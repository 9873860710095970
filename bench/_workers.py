"""What the benchmarks' ``--jobs`` worker processes share (imported as a sibling: ``python bench/<name>.py``
puts ``bench/`` first on ``sys.path``)."""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(parent: int) -> None:
    """A worker whose parent is gone (killed: no executor shutdown) stops instead of training on."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
