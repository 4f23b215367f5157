"""`torch.npu`, emulated: the device module torch asks for once PrivateUse1 is named "npu".

torch_npu registers its device module as `torch.npu` (`torch._register_device_module`);
torch's own code (e.g. `torch.accelerator.is_available`, which dynamo calls) then asks it
about devices. The emulator emulates communicators and ops over host memory, not a device:
no NPU is present, and anything else asked of this module raises, naming it.
"""

from __future__ import annotations


def is_available() -> bool:
    return False


def device_count() -> int:
    return 0


def __getattr__(name: str) -> object:
    raise AttributeError(f"torch_npu emulator: torch.npu.{name} is not emulated")
