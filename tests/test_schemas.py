"""The reference ops have torch_npu 2.14.0's schemas, argument for argument.

The expected schemas are a verbatim copy of torch_npu's
`npu_native_functions_by_codegen.yaml` lines (tests/data), independent of the strings the
backend registers with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import afd_dispatch.kernels.reference as ref
from afd_dispatch.kernels import BACKEND_API, load_backend

SCHEMA_FILE = Path(__file__).parent / "data" / "torch_npu_2.14.0_schemas.txt"


def _torch_npu_schemas() -> dict[str, torch._C.FunctionSchema]:
    schemas = {}
    for line in SCHEMA_FILE.read_text().splitlines():
        if line.strip():
            schema = torch._C.parse_schema(line.strip())
            schemas[schema.name] = schema
    return schemas


EXPECTED = _torch_npu_schemas()


def _describe(schema: torch._C.FunctionSchema) -> list[tuple[object, ...]]:
    args = [
        (
            a.name,
            str(a.type),
            a.default_value,
            a.kwarg_only,
            a.alias_info is not None and a.alias_info.is_write,
        )
        for a in schema.arguments
    ]
    rets = [
        (str(r.type), r.alias_info is not None and r.alias_info.is_write) for r in schema.returns
    ]
    return [*args, ("->", *rets)]


def test_the_file_holds_the_whole_family() -> None:
    assert set(EXPECTED) == {
        "npu_attention_to_ffn",
        "npu_ffn_worker_batching",
        "npu_ffn_to_attention",
        "npu_attention_worker_combine",
        "ffn_worker_scheduler_",
        "ffn_worker_scheduler",
        "attention_worker_scheduler_",
        "attention_worker_scheduler",
    }


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registered_schema_equals_torch_npu(name: str) -> None:
    registered = getattr(torch.ops.afd, name).default._schema
    assert registered.name == f"afd::{name}"
    assert _describe(registered) == _describe(EXPECTED[name])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_public_names_are_the_registered_ops(name: str) -> None:
    assert getattr(ref, name) is getattr(torch.ops.afd, name)


def test_keyword_only_arguments_are_refused_positionally() -> None:
    # torch_npu puts `scales` behind `*`: passing it positionally must fail as it would there.
    with pytest.raises((TypeError, RuntimeError)):
        ref.npu_attention_worker_combine(
            torch.zeros(1024, dtype=torch.int8), torch.zeros(1, 1), torch.zeros(1), 8, 0
        )


def test_reference_backend_exports_the_backend_api() -> None:
    backend = load_backend("reference")
    missing = [name for name in BACKEND_API if not callable(getattr(backend, name, None))]
    assert missing == []
