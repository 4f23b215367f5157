"""`torch_npu._C`: only `_distributed_c10d` is emulated."""

from torch_npu._C import _distributed_c10d

__all__ = ["_distributed_c10d"]


def __getattr__(name: str) -> object:
    raise AttributeError(f"torch_npu emulator: torch_npu._C.{name} is not emulated")
