"""The ``soaplab`` command with a fault injected: a test fixture, not part of soaplab.

Run under torchrun with FAULT_RANK and FAULT_STEP set: that rank SIGKILLs itself just before
its FAULT_STEP-th training step of this command (counted over all its runs, from 1), on
torchrun's first attempt only, like a machine that dies. Workers that torchrun restarts
(TORCHELASTIC_RESTART_COUNT > 0) run the plain command. Each worker that exits says on stderr
how many steps it trained, so a test can tell a resumed run from one trained again.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from typing import Any

from soaplab.cli import main
from soaplab.experiments import loop


def inject_fault() -> None:
    attempt, rank = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), os.environ["RANK"]
    dies = attempt == "0" and rank == os.environ["FAULT_RANK"]
    step, calls = loop._train_step, 0

    def counted(*args: Any, **kwargs: Any) -> dict[str, float]:
        nonlocal calls
        calls += 1
        if dies and calls == int(os.environ["FAULT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return step(*args, **kwargs)

    loop._train_step = counted
    atexit.register(lambda: print(f"faulty_cli: attempt {attempt} rank {rank} trained {calls} "
                                  "steps", file=sys.stderr))


if __name__ == "__main__":
    inject_fault()
    raise SystemExit(main())
