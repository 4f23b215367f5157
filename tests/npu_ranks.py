"""One rank of an AFD deployment in its own process, on the torch_npu emulator.

`run_rank` is a multiprocessing (spawn) target: it puts `tests/npu_emulator` first on
`sys.path`, so `import torch_npu` finds the emulator, builds the deployment from the
config, joins the rendezvous through the NPU link and either decodes (attention) or
serves until told to stop (FFN). Results and errors go back through `results`.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

EMULATOR = str(Path(__file__).resolve().parent / "npu_emulator")


def run_rank(
    role: str,
    index: int,
    cfg_json: str,
    model_cfg: Any,
    model_path: str,
    dtype_name: str,
    rendezvous: Any,
    prompts: Any,
    steps: int,
    results: Any,
    stop: Any,
    timeout_s: float,
) -> None:
    sys.path.insert(0, EMULATOR)
    try:
        import torch

        from afd_dispatch import AFDConfig
        from afd_dispatch.fixtures.tiny_moe import TinyMoEModel, decode
        from afd_dispatch.link import attention_link, ffn_link
        from afd_dispatch.model.spec import MoESpec
        from afd_dispatch.runtime.attention import AttentionEndpoint
        from afd_dispatch.runtime.deployment import Deployment
        from afd_dispatch.runtime.ffn_worker import FFNWorker, load_banks

        torch.set_num_threads(1)
        dtype = getattr(torch, dtype_name)
        dep = Deployment(AFDConfig.from_json(cfg_json), MoESpec.from_pretrained(model_path), dtype)
        if role == "attention":
            model = TinyMoEModel(model_cfg)
            link = attention_link(dep, index, rendezvous=rendezvous)
            endpoint = AttentionEndpoint(dep, index, link=link)
            outputs = decode(model, endpoint, prompts, steps, dep.micro_batches)
            # raw bits as numpy: torch tensors would travel as file descriptors of a
            # process that may have exited before the parent reads them
            raw = [(str(o.dtype), o.contiguous().view(torch.uint8).numpy().copy()) for o in outputs]
            results.put((role, index, raw))
            link.close()
        else:
            banks = load_banks(model_path, dep, index, True)
            link = ffn_link(dep, index, rendezvous=rendezvous)
            worker = FFNWorker(dep, index, banks, link=link)
            import threading

            failures: list[str] = []

            def serve() -> None:
                try:
                    worker.run()
                except BaseException:
                    failures.append(traceback.format_exc())
                    stop.set()

            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            stop.wait(timeout_s)
            worker.stop()
            thread.join(timeout_s)
            if failures:
                results.put((role, index, RuntimeError(failures[0])))
            else:
                results.put((role, index, "stopped" if not thread.is_alive() else "hung"))
    except BaseException:
        results.put((role, index, RuntimeError(traceback.format_exc())))
