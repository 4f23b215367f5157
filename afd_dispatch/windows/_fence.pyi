"""Types of the C extension built from _fence.c (see wait.py, store_fence)."""

def fence() -> None:
    """A full (sequentially consistent) memory barrier."""
