"""The main job: `vllm serve` of a tiny MoE model through AFD, answering one request.

`afd-dispatch serve-demo` builds a tiny random-weight Qwen3-MoE checkpoint with an
offline-trained tokenizer (unless one is given), starts `vllm serve MODEL --afd-config`
with two FFN ranks as Ray actors on an embedded local Ray, sends a completion and a chat
request, prints the answers and the AFD counters from `/metrics`, and stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from afd_dispatch.integrations.vllm.launch import vllm_server

DEFAULT_AFD_CONFIG = {
    "num_attention_ranks": 1,
    "num_ffn_ranks": 2,
    "micro_batch_num": 2,
    "max_tokens_per_micro_batch": 64,
    "expert_replicas": {"0": 2},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afd-dispatch serve-demo", description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: build a tiny one)")
    parser.add_argument("--afd-config", default=json.dumps(DEFAULT_AFD_CONFIG))
    parser.add_argument("--prompt", default="the quick brown fox")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="afd-serve-demo-") as work:
        model = args.model
        if model is None:
            from afd_dispatch.fixtures.tiny_hf import build_tiny_model

            model = os.path.join(work, "tiny-qwen3-moe")
            build_tiny_model("qwen3_moe", model)
            print(f"built a tiny Qwen3-MoE checkpoint in {model}")
        log = os.path.join(work, "vllm-serve.log")
        print(f"starting vllm serve {model} --afd-config '{args.afd_config}' ...", flush=True)
        start = time.monotonic()
        with vllm_server(model, log, args.afd_config) as server:
            print(f"server ready in {time.monotonic() - start:.0f} s at {server.url}")
            completion = server.post(
                "/v1/completions", {"prompt": args.prompt, "max_tokens": 16, "temperature": 0}
            )
            print(f"completion of {args.prompt!r}: {completion['choices'][0]['text']!r}")
            chat = server.post(
                "/v1/chat/completions",
                {
                    "messages": [{"role": "user", "content": "hello"}],
                    "max_tokens": 16,
                    "temperature": 0,
                },
            )
            print(f"chat reply: {chat['choices'][0]['message']['content']!r}")
            metrics = [m for m in server.get_text("/metrics").splitlines() if m.startswith("afd_")]
            print("AFD counters on /metrics:")
            print("\n".join(f"  {m}" for m in metrics))
    return 0 if metrics else 1
