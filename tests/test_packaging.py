"""The package as installed: every first-party import resolves, so mypy types it.

`kernels/` and `integrations/` install as `afd_dispatch.kernels` and
`afd_dispatch.integrations` (pyproject's package-dir), so only an install has the whole
`afd_dispatch` tree, and `scripts/typecheck.sh` runs mypy on one. There a first-party
import that does not resolve is an error, not a silent `Any`, as long as the mypy config
excuses only third-party modules; and every package directory must be in pyproject's
package list, or a non-editable install (the Docker images) lacks it.
"""

from __future__ import annotations

import ast
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIR = {"afd_dispatch": "afd_dispatch", **SETUPTOOLS["package-dir"]}


def source_dir(package: str) -> Path:
    """Where `package` comes from, by pyproject's package-dir (longest prefix first)."""
    for prefix in sorted(PACKAGE_DIR, key=len, reverse=True):
        if package == prefix or package.startswith(prefix + "."):
            rest = package[len(prefix) :].lstrip(".").replace(".", "/")
            return ROOT / PACKAGE_DIR[prefix] / rest
    raise AssertionError(f"{package} is outside the distribution")


def package_dirs() -> dict[str, Path]:
    """Every directory with an __init__.py, by the package name it installs as."""
    found = {}
    for prefix, directory in PACKAGE_DIR.items():
        for init in (ROOT / directory).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / directory)
            found[".".join((prefix, *rel.parts))] = init.parent
    return found


def test_every_package_directory_is_installed() -> None:
    packages = set(SETUPTOOLS["packages"])
    missing = sorted(set(package_dirs()) - packages)
    assert not missing, f"in no install (pyproject [tool.setuptools] packages): {missing}"
    for package in packages:
        assert (source_dir(package) / "__init__.py").is_file(), package


def first_party_imports() -> set[tuple[str, str]]:
    """(module imported, file importing it) for every afd_dispatch import in the package."""
    found = set()
    for directory in package_dirs().values():
        for path in directory.glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    # `from package import module` imports a module or a name: try both
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                rel = str(path.relative_to(ROOT))
                found |= {(n, rel) for n in names if n.split(".")[0] == "afd_dispatch"}
    assert len(found) > 100, len(found)  # the walk saw the package
    return found


def resolves(module: str) -> bool:
    path = source_dir(module)
    return (
        (path / "__init__.py").is_file()
        or path.with_suffix(".py").is_file()
        or path.with_suffix(".pyi").is_file()  # a C extension's types
    )


def is_a_name(module: str) -> bool:
    """`from package import name` where name is no module: its package resolves."""
    package, _, _ = module.rpartition(".")
    return resolves(package) and not resolves(module)


def test_every_first_party_import_resolves_in_the_install() -> None:
    unresolved = sorted(
        (module, where)
        for module, where in first_party_imports()
        if not resolves(module) and not is_a_name(module)
    )
    assert not unresolved, unresolved
    extensions = {m for m, _ in first_party_imports() if m.endswith(("._native", "._fence"))}
    assert extensions == {"afd_dispatch.kernels.reference._native", "afd_dispatch.windows._fence"}
    for module in extensions:  # typed by a stub that the install carries
        stub = source_dir(module).with_suffix(".pyi")
        package = module.rpartition(".")[0]
        assert stub.is_file() and stub.name in SETUPTOOLS["package-data"][package], module


def test_mypy_excuses_only_third_party_modules() -> None:
    mypy = PYPROJECT["tool"]["mypy"]
    assert "ignore_missing_imports" not in mypy  # never for every module
    for override in mypy.get("overrides", []):
        modules = override["module"]
        modules = [modules] if isinstance(modules, str) else modules
        assert not [m for m in modules if m.split(".")[0] == "afd_dispatch"], override
        assert not [m for m in modules if m in ("*", "**")], override
    assert (ROOT / "afd_dispatch" / "py.typed").is_file()
    assert "py.typed" in SETUPTOOLS["package-data"]["afd_dispatch"]


def test_nothing_else_turns_a_first_party_import_into_any() -> None:
    """Besides a missing module: a disabled import error code, `follow_imports` other than
    normal, an ignore comment on the import, or a module-level `__getattr__` (in a module
    or a stub), which makes every name imported from that module Any."""
    mypy = PYPROJECT["tool"]["mypy"]
    sections = [mypy, *mypy.get("overrides", [])]
    disabled = [c for s in sections for c in s.get("disable_error_code", [])]
    assert not [c for c in disabled if c.startswith("import") or c == "attr-defined"]
    assert {s.get("follow_imports", "normal") for s in sections} == {"normal"}
    silenced, dynamic = [], []
    for directory in package_dirs().values():
        for path in [*directory.glob("*.py"), *directory.glob("*.pyi")]:
            text = path.read_text()
            lines = text.splitlines()
            tree = ast.parse(text, str(path))
            rel = str(path.relative_to(ROOT))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import | ast.ImportFrom) and "afd_dispatch" in ast.unparse(
                    node
                ):
                    source = " ".join(lines[node.lineno - 1 : node.end_lineno])
                    if "type: ignore" in source:
                        silenced.append(f"{rel}:{node.lineno}")
            dynamic += [
                f"{rel}:{n.lineno}"
                for n in tree.body
                if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"
            ]
    assert silenced == [] and dynamic == []


MAX_MODULE_LINES = 500  # a module a newcomer reads in one sitting


def test_no_module_of_the_package_is_over_500_lines() -> None:
    sources = [
        path
        for directory in package_dirs().values()
        for pattern in ("*.py", "*.pyi", "*.c")
        for path in directory.glob(pattern)
    ]
    assert len(sources) > 50  # the walk found the package
    long = {
        str(path.relative_to(ROOT)): n
        for path in sources
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
