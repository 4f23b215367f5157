"""The main job on the embedded default: a tiny MoE model decoding through AFD.

`afd-dispatch demo` builds a random-weight MoE decoder (saved as a safetensors
checkpoint in a temporary directory), starts one Ray actor per FFN rank on a local Ray (or
on the cluster named by `ray_address`), decodes a few steps on each attention rank with
two micro-batches in flight, checks every hidden state against the same model run
colocated, and writes a Chrome/Perfetto trace of where the time went.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

import torch

from afd_dispatch.config import AFDConfig
from afd_dispatch.fixtures.tiny_moe import ColocatedMoE, TinyMoEConfig, TinyMoEModel, decode
from afd_dispatch.integrations.ray import FFNWorkerPool
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.trace import Tracer, prometheus_lines, write_chrome_trace

DEFAULT_CONFIG = {
    "num_attention_ranks": 2,
    "num_ffn_ranks": 3,
    "micro_batch_num": 2,
    "max_tokens_per_micro_batch": 8,
    "expert_replicas": {"0": 2},
    "shared_expert_ranks": [2],
    "backend": "reference",
    "batch_invariant": True,
    "trace": True,
    "wait_timeout_s": 30,
}


def run(config: AFDConfig, steps: int, trace_path: str) -> bool:
    model = TinyMoEModel(TinyMoEConfig())
    deployment = Deployment(config, model.spec, torch.float32)
    torch.manual_seed(0)
    num_attention_ranks = config.num_attention_ranks
    tokens = config.micro_batch_num * min(4, config.max_tokens_per_micro_batch)
    prompts = [
        torch.randint(0, model.config.vocab_size, (tokens, 3)) for _ in range(num_attention_ranks)
    ]
    tracers = [Tracer(f"attention {s}", enabled=config.trace) for s in range(num_attention_ranks)]
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def attention_rank(s: int) -> None:
        try:
            endpoint = AttentionEndpoint(deployment, s, tracer=tracers[s])
            results[s] = decode(
                model, endpoint, prompts[s], steps, config.micro_batch_num, tracers[s]
            )
        except BaseException as exc:
            errors.append(exc)

    with tempfile.TemporaryDirectory(prefix="afd-demo-") as path:
        model.save_pretrained(path)
        groups = deployment.create_windows()
        try:
            start = time.monotonic()
            with FFNWorkerPool(deployment, path, groups) as pool:
                print(f"{len(pool.actors)} FFN actors up in {time.monotonic() - start:.1f} s")
                threads = [
                    threading.Thread(target=attention_rank, args=(s,))
                    for s in range(num_attention_ranks)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                ffn_spans, ffn_counters = pool.traces()
        finally:
            for g in groups:
                g.close()
    if errors:
        raise errors[0]
    colocated = ColocatedMoE(model.expert_banks(True), model.spec.num_shared_experts, torch.float32)
    ok = True
    for s in range(num_attention_ranks):
        expected = decode(model, colocated, prompts[s], steps, config.micro_batch_num)
        same = all(torch.equal(a, b) for a, b in zip(expected, results[s], strict=True))
        ok &= same
        print(f"attention rank {s}: {len(results[s])} steps, equal to colocated: {same}")
    spans = [sp for t in tracers for sp in t.snapshot()[0]] + ffn_spans
    write_chrome_trace(trace_path, spans)
    counters = {t.process: t.snapshot()[1] for t in tracers} | ffn_counters
    print(prometheus_lines(counters), end="")
    print(f"trace: {trace_path} (open in https://ui.perfetto.dev or chrome://tracing)")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afd-dispatch demo", description=__doc__)
    parser.add_argument(
        "--afd-config", default=None, help="JSON object or file (default: built in)"
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--trace", default="afd-trace.json")
    args = parser.parse_args(argv)
    config = (
        AFDConfig.from_json(args.afd_config)
        if args.afd_config
        else AFDConfig.from_dict(DEFAULT_CONFIG)
    )
    ok = run(config, args.steps, args.trace)
    print("AFD decode matches the colocated model" if ok else "MISMATCH")
    return 0 if ok else 1
