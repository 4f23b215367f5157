"""Shared-memory windows do not outlive their owner, however it dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time

OWNER = """
import os, signal, torch
from afd_dispatch import RankTopology, WindowLayout, create_window_group
group = create_window_group(
    "janitor", RankTopology(1, 2), WindowLayout(1, 1, 2, 1, 0, 32, torch.float32), transport="shm"
)
print(group.spec.token, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _files(token: str) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"afd-{token}-")]


def test_files_are_removed_after_the_owner_is_killed() -> None:
    done = subprocess.run(
        [sys.executable, "-c", OWNER], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == -9, done.stderr  # it really died by SIGKILL, no cleanup of its own
    token = done.stdout.strip()
    assert len(token) == 32
    deadline = time.monotonic() + 10
    while _files(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _files(token) == []
