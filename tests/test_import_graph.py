"""Who may depend on what: the runtime and the integrations see the op backends only
through `afd_dispatch.link`; the model description and the planner do not depend on the
runtime.

Read from the source (ast), not from `sys.modules`, so a lazy import inside a function
counts too. The link package is the one place that may import a backend.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the modules that must depend on the link interface only
CLIENTS = sorted(
    [
        *(ROOT / "afd_dispatch" / "runtime").glob("*.py"),
        *(ROOT / "afd_dispatch" / "model").glob("*.py"),
        *(ROOT / "afd_dispatch" / "fixtures").glob("*.py"),
        *(ROOT / "integrations").rglob("*.py"),
        ROOT / "afd_dispatch" / "demo.py",
    ]
)
# the backends themselves, and the function that hands them out; `afd_dispatch.kernels`'s
# `resolve_backend` (a name, not a module) is fine
BACKEND_PREFIXES = (
    "afd_dispatch.kernels.reference",
    "afd_dispatch.kernels.npu",
    "afd_dispatch.kernels.load_backend",
    "kernels.",
)


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def backend_sniffing(path: Path) -> list[int]:
    """Lines that ask a backend module what it has (`hasattr(ops, ...)` and the like)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "hasattr"
            and node.args
            and isinstance(node.args[0], (ast.Name, ast.Attribute))
            and "ops" in ast.unparse(node.args[0])
        ):
            lines.append(node.lineno)
    return lines


def test_the_clients_were_found() -> None:
    names = {p.name for p in CLIENTS}
    assert {"attention.py", "ffn_worker.py", "pipeline.py", "ffn_actor.py", "moe.py"} <= names


@pytest.mark.parametrize("path", CLIENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_clients_import_no_backend(path: Path) -> None:
    backends = [m for m in imported_modules(path) if m.startswith(BACKEND_PREFIXES)]
    assert backends == [], f"{path.relative_to(ROOT)} imports {backends}: use afd_dispatch.link"
    assert backend_sniffing(path) == []


def test_the_endpoint_and_worker_are_built_on_the_link() -> None:
    for name in ("attention.py", "ffn_worker.py"):
        modules = imported_modules(ROOT / "afd_dispatch" / "runtime" / name)
        assert "afd_dispatch.link" in modules, name


def test_a_violation_is_seen(tmp_path: Path) -> None:
    # the check itself can fail: a module with a lazy backend import and a sniff
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f(ops):\n"
        "    from afd_dispatch.kernels.reference.quant import dequantize_rows\n"
        "    return hasattr(ops, 'context_for')\n"
    )
    assert any(m.startswith(BACKEND_PREFIXES) for m in imported_modules(bad))
    assert backend_sniffing(bad) == [3]


@pytest.mark.parametrize(
    "path",
    sorted(
        [
            *(ROOT / "afd_dispatch" / "planner").glob("*.py"),
            *(ROOT / "afd_dispatch" / "model").glob("*.py"),
        ]
    ),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_the_planner_and_the_model_description_do_not_depend_on_the_runtime(path: Path) -> None:
    runtime = [m for m in imported_modules(path) if m.startswith("afd_dispatch.runtime")]
    assert runtime == [], f"{path.relative_to(ROOT)} imports {runtime}"
