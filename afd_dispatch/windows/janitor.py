"""Removes a shared-memory group's files once the process that owns them is gone.

Run as a script (no package imports, so it starts in milliseconds) by the owning
`SharedMemoryTransport`, with a pipe on stdin. It forks once and lets the parent exit,
so it is no descendant of the owner (servers such as vLLM kill their whole process tree
on shutdown). It then blocks reading the pipe; the read returns when the owner closes it
or dies, however it dies (SIGKILL included), and the files are unlinked. A clean
`close()` has already unlinked them, which is fine.

    python janitor.py SHM_DIR TOKEN RANKS
"""

import contextlib
import os
import sys


def main() -> None:
    directory, token, ranks = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if len(token) != 32 or any(c not in "0123456789abcdef" for c in token):
        sys.exit("janitor: bad token")
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    for rank in range(ranks):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, f"afd-{token}-{rank}"))


if __name__ == "__main__":
    main()
