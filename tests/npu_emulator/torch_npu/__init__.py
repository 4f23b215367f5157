"""An emulator of the torch_npu surface the NPU link uses, for tests only; never installed.

Tests put `tests/npu_emulator` on `sys.path` (and on PYTHONPATH of processes they start)
so `import torch_npu` finds this package. It implements exactly what
`afd_dispatch.link.npu` calls, each as torch_npu 2.14 spells it:

- the PrivateUse1 backend renamed "npu" (torch_npu's `_init/registry/backend.py`), with a
  `torch.npu` device module that reports no device (`torch_npu.npu`);
- `torch_npu._C._distributed_c10d.ProcessGroupHCCL` with `Options`, `get_hccl_comm_name`,
  `_window_register_and_exchange`, `_get_window_mem` (torch_npu `csrc/distributed/Init.cpp`);
- `torch_npu._afd.create_schedule_context_holder` and the holder's methods
  (`torch_npu/_afd/_schedule_context.py`), and the four scheduler ops;
- the four AFD ops `npu_attention_to_ffn`, `npu_ffn_worker_batching`,
  `npu_ffn_to_attention`, `npu_attention_worker_combine`.

Windows are real shared memory, mapped by every process of a communicator; the ops run the
reference kernels over them, found through the communicator name (`group`) and the
context's window addresses as the hardware finds them. Anything else raises, naming it.
"""

from __future__ import annotations

import torch

from torch_npu import npu

if torch._C._get_privateuse1_backend_name() != "npu":
    torch.utils.rename_privateuse1_backend("npu")
if not hasattr(torch, "npu"):
    torch._register_device_module("npu", npu)

from torch_npu import _C, _afd
from torch_npu._ops import (
    npu_attention_to_ffn,
    npu_attention_worker_combine,
    npu_ffn_to_attention,
    npu_ffn_worker_batching,
)

__all__ = [
    "_C",
    "_afd",
    "npu",
    "npu_attention_to_ffn",
    "npu_attention_worker_combine",
    "npu_ffn_to_attention",
    "npu_ffn_worker_batching",
]


def __getattr__(name: str) -> object:
    raise AttributeError(f"torch_npu emulator: torch_npu.{name} is not emulated")
