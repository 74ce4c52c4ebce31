"""A parent process and its spawned child, for tests/test_job_kill.py: the child guards itself with
`trainer.jobspec.die_with_parent` (with prctl, or with the watching thread alone), says so with the signal the
kernel will send it when its parent ends (0: none), and waits.

Usage: python tests/orphan_child.py prctl|watcher  (prints the child's pid, then "guarded <signal>" from the child)
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import sys
import time

from trainer.jobspec import die_with_parent

PR_GET_PDEATHSIG = 2  # <linux/prctl.h>


def parent_death_signal() -> int:
    if not sys.platform.startswith("linux"):
        return 0
    signal = ctypes.c_int(0)
    ctypes.CDLL(None, use_errno=True).prctl(PR_GET_PDEATHSIG, ctypes.byref(signal), 0, 0, 0)
    return signal.value


def child(parent_pid: int, use_prctl: bool) -> None:
    die_with_parent(parent_pid, use_prctl=use_prctl)
    print("guarded", parent_death_signal(), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    process = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(), sys.argv[1] == "prctl"))
    process.start()
    print(process.pid, flush=True)
    time.sleep(600)
