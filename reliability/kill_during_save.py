"""Run main.py and SIGKILL it halfway through writing its N-th checkpoint: a deterministic crash inside
save_checkpoint, after the temporary file is partly written and before the rename.

    python -m reliability.kill_during_save N <main.py arguments>
"""
from __future__ import annotations

import io
import os
import signal
import sys
from typing import Any

import torch

from reliability.common import run_main


def die_in_save(n: int) -> None:
    """Make the n-th torch.save of this process write half its bytes, flush them to disk and SIGKILL itself."""
    real_save, calls = torch.save, [0]

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] < n:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[:len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save


if __name__ == "__main__":
    die_in_save(int(sys.argv[1]))
    run_main(sys.argv[2:])
