"""The `afd-dispatch` command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "serve-demo": "afd_dispatch.integrations.vllm.demo",
        "demo": "afd_dispatch.demo",
        "tiny-model": "afd_dispatch.fixtures.tiny_hf",
        "bench": "afd_dispatch.bench.cli",
        "plan": "afd_dispatch.planner.cli",
    }
    if not argv or argv[0] not in commands:
        print(f"usage: afd-dispatch {{{','.join(commands)}}} [options]", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(commands[argv[0]])
    return int(module.main(argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
