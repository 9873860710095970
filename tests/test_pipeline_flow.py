"""Unit tests of the pipeline flow's own logic (flows/pipeline.py); the flow itself runs in test_pipeline_e2e.py."""

from __future__ import annotations

import pytest

from flows.pipeline import log_line


@pytest.mark.parametrize("raw, logged", [
    (b"plain line\n", "plain line"),
    (b"windows line\r\n", "windows line"),
    # a tqdm bar drawn twice, erased, then the epoch's log line: only the log line is kept
    (b"\rteacher 1/30:   0%|  | 0/7\rteacher 1/30: 100%|##| 7/7\r" + b" " * 40 + b"\r[teacher] epoch 1/30 loss=1\n",
     "[teacher] epoch 1/30 loss=1"),
    (b"\rteacher 1/30: 100%|##| 7/7\r" + b" " * 40 + b"\r\n", ""),  # a bar that erased itself: nothing
    (b"caf\xc3\xa9 \xff\n", "caf\u00e9 \ufffd"),  # bad bytes do not stop the log
])
def test_log_line_keeps_what_a_terminal_would_show_last(raw: bytes, logged: str) -> None:
    assert log_line(raw) == logged
