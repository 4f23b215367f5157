"""`--afd-config` fuzzed with hypothesis: every input starts, or is refused naming the key.

The inputs: random JSON (null, booleans, integers up to 400 digits, floats with nan and
infinities, strings with any code point, lists and objects nested at random) as whole
documents and as values of the real keys; keys near the real ones (typos, case, lookalike
letters, afd-plugin's spellings); duplicate keys; text that is not JSON, not an object, not
UTF-8, or too long; files with random bytes.

1. In-process (fast): through `AFDConfig.from_json`, which parses `--afd-config`, and
   `cli.checked_config`, the whole check `vllm serve` runs (with a stand-in for vLLM's
   engine arguments and a tiny checkpoint). The outcome is an `AFDConfig`, or an
   `AFDInputError` / exit status 2 whose message names the key (or `--afd-config` for the
   text as a whole); never another exception.
2. The real command line (slow: ~12 s a run, mostly vLLM's import): a few refused inputs
   drawn the same way, each through `python -m afd_dispatch.integrations.vllm.cli serve`
   in a subprocess: exit status 2, the one error line the in-process check gives, no
   traceback, no process left, no Ray session, no window file (an audit hook in the
   subprocess reports every /dev/shm/afd-* file opened and every Ray daemon spawned).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from test_vllm_config import STARTED, Bad, refuse

from afd_dispatch.config import (
    MAX_CONFIG_BYTES,
    QUANT_MODE_CODES,
    SHARED_EXPERTS_ON,
    TRANSPORTS,
    WINDOW_GROUPS,
    AFDConfig,
)
from afd_dispatch.config_deprecated import MOVED_KEYS, OLD_TRANSPORTS, RENAMED_KEYS
from afd_dispatch.errors import AFDInputError
from afd_dispatch.fixtures.tiny_hf import build_tiny_model
from afd_dispatch.integrations.vllm import cli
from afd_dispatch.kernels import BACKENDS

# today's keys and the deprecated ones `config_deprecated` still reads
DEPRECATED = sorted({*RENAMED_KEYS, *MOVED_KEYS, "role"})
KEYS = sorted([*(f.name for f in dataclasses.fields(AFDConfig) if f.init), *DEPRECATED])
BASE = {"num_attention_ranks": 1, "num_ffn_ranks": 2}  # accepted by `vllm serve` here
FAST = settings(max_examples=400, deadline=None, database=None)
LONGEST_MESSAGE = 1500  # the list of keys (~500), plus at most 200 of the key and of the value

# == strategies ===============================================================================
# any code point: lone surrogates too (json.loads accepts "\ud800"; a command line that is
# not UTF-8 reaches Python as surrogates)
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([0, 1, -1, 2**31, 2**63, -(2**63), 10**30]),
    st.floats(),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 5e-324, 1e308]),
    ANY_TEXT,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=20,
)


def _seconds_cases() -> list[Any]:
    return [1e-9, 0.5, 3600, 3600.0, 3600.000001, 0, -1, 10**400]


# values worth trying per key besides random JSON: each accepted value and each boundary
INTERESTING: dict[str, list[Any]] = {
    "num_attention_ranks": [0, 1, 2, 768, 769],
    "num_ffn_ranks": [0, 1, 2, 3, 768, 769],
    "role": ["attention", "ffn", "Attention"],
    "micro_batch_num": [0, 1, 2, 8, 9],
    "max_tokens_per_micro_batch": [0, 1, 512, 513],
    "shared_expert_ranks": [[], [0], [1], [2], [0, 1], [1, 1], [True]],
    "expert_replicas": [
        *(0, 1, 2, 3, {}, {"0": 2}, {"7": 2}, {"8": 1}, {"1": 1, "01": 1}),
        *({"\u00b2": 1}, {"\u0663": 1}, {"\uff11": 1}),  # digits, but not ASCII ones
    ],
    "quant_mode": [*QUANT_MODE_CODES, "fp8"],
    "sync_flag": [0, 1, 2],
    "backend": [*BACKENDS, "cuda"],
    "transport": [*OLD_TRANSPORTS, "rdma"],
    "reference": [
        *({"transport": t} for t in [*TRANSPORTS, "rdma", "hccl"]),
        *({}, {"transports": "shm"}, {"self": 1}, "shm", [["transport", "shm"]]),
    ],
    "group": ["afd", "g" * 64, "g" * 65, "a.b-c_d", "", "a b", "\udcff"],
    "ffn_start_rank_id": [0, 1, 2],
    "hccl_buffsize_mb": [1, 2, 200, 65536, 65537],
    "window_groups": [*WINDOW_GROUPS, "per_mb"],
    "ray_address": [None, "auto", "local", "h:1", "h:65535", "h:65536", "ray://h", "ray://h:0"],
    "ffn_max_restarts": [0, 100, 101],
    "batch_invariant": [True, False, 0, "true"],
    "trace": [True, False, 1],
    "shared_experts_on": [*SHARED_EXPERTS_ON, "both"],
}


def value_of(key: str) -> st.SearchStrategy[Any]:
    known = INTERESTING.get(key) or (_seconds_cases() if key.endswith("_s") else [None])
    return st.one_of(st.sampled_from(known), JSON)


LOOKALIKES = {  # Latin -> Cyrillic letters that look the same
    "a": "\u0430", "e": "\u0435", "o": "\u043e", "p": "\u0440", "c": "\u0441", "i": "\u0456"
}  # fmt: skip
PLUGIN_KEYS = ["num_attention_ranks", "num_ffn_ranks", "afd_role", "connector", "async_dp"]


@st.composite
def near_key(draw: st.DrawFn) -> str:
    """A real key, changed a little (it may come out as another real key)."""
    key = draw(st.sampled_from(KEYS))
    i = draw(st.integers(0, len(key) - 1))
    char = draw(st.one_of(st.sampled_from("_-. sS0"), st.characters(exclude_categories=())))
    edits = {
        "upper": key.upper(),
        "title": key.title(),
        "first upper": key[0].upper() + key[1:],
        "drop": key[:i] + key[i + 1 :],
        "double": key[:i] + key[i] + key[i:],
        "swap": key[:i] + key[i + 1 : i + 2] + key[i : i + 1] + key[i + 2 :],
        "replace": key[:i] + char + key[i + 1 :],
        "insert": key[:i] + char + key[i:],
        "pad": draw(st.sampled_from([" ", "\t", "\n", "\u00a0", "\u200b"])) + key,
        "trail": key + draw(st.sampled_from([" ", "s", "_", "\u200b"])),
        "dashes": key.replace("_", "-"),
        "spaces": key.replace("_", " "),
        "lookalike": "".join(LOOKALIKES.get(c, c) for c in key),
        "plugin": draw(st.sampled_from(PLUGIN_KEYS)),
    }
    return edits[draw(st.sampled_from(sorted(edits)))]


def documents() -> st.SearchStrategy[Any]:
    """Whole documents: objects of real, near and random keys (the two required ones
    usually there), or any JSON value at all."""
    keys = st.one_of(st.sampled_from(KEYS), near_key(), ANY_TEXT)
    objects = st.builds(
        lambda base, extra: {**base, **extra},
        st.sampled_from([{}, BASE, {"num_ffn_ranks": 2}]),
        st.dictionaries(
            keys,
            st.one_of(
                JSON, st.sampled_from([v for values in INTERESTING.values() for v in values])
            ),
            max_size=6,
        ),
    )
    return st.one_of(objects, JSON)


# == what every outcome must be ===============================================================
def parsed(text: str) -> AFDConfig | AFDInputError:
    """`AFDConfig.from_json(text)`, or the AFDInputError it raised (checked); any other
    exception fails the test."""
    try:
        return AFDConfig.from_json(text)
    except AFDInputError as err:
        message = str(err)
        assert err.argument and message.startswith(f"{err.argument}: expected {err.allowed}")
        assert len(message) <= LONGEST_MESSAGE, message[:300]
        return err


def names_a_key_or_the_flag(err: AFDInputError) -> bool:
    """The flag, a key not declared, or a key (a section's keys by their path,
    "reference.transport"; a key's element by its index, "expert_replicas['3']")."""
    argument = err.argument
    key = argument.removeprefix("key ").strip("'").split("[")[0].split(".")[0]
    return argument == "--afd-config" or argument.startswith("--afd-config key ") or key in KEYS


# == 1a. AFDConfig.from_json ==================================================================
@FAST
@given(doc=documents())
def test_any_document_is_a_config_or_refused_naming_a_key(doc: Any) -> None:
    outcome = parsed(json.dumps(doc))
    if isinstance(outcome, AFDInputError):
        assert names_a_key_or_the_flag(outcome), str(outcome)
        if not isinstance(doc, dict):
            assert outcome.argument == "--afd-config"


@FAST
@given(data=st.data(), key=st.sampled_from(KEYS))
def test_a_value_of_a_real_key_is_accepted_or_refused_naming_that_key(
    data: st.DataObject, key: str
) -> None:
    value = data.draw(value_of(key), label="value")
    outcome = parsed(json.dumps({**BASE, key: value}))
    if isinstance(outcome, AFDInputError):
        # the key itself, or (a combination) named in the other key's message
        assert key in str(outcome), str(outcome)
    else:  # what the CLI does with an accepted config: to_dict, then from_dict again
        assert AFDConfig.from_json(outcome.to_json()) == outcome


@FAST
@given(key=near_key(), value=JSON)
def test_a_key_near_a_real_one_is_refused_naming_it(key: str, value: Any) -> None:
    outcome = parsed(json.dumps({**BASE, key: value}))
    if key in KEYS:  # the edit made another real key: as above
        assert isinstance(outcome, AFDConfig) or key in str(outcome)
        return
    assert isinstance(outcome, AFDInputError)
    assert outcome.argument == f"--afd-config key {key!r}", outcome.argument
    assert outcome.value == key


@FAST
@given(key=st.one_of(st.sampled_from(KEYS), near_key()), first=JSON, second=JSON)
def test_a_key_given_twice_is_refused_naming_it(key: str, first: Any, second: Any) -> None:
    pairs = [*BASE.items(), (key, first), (key, second)]
    body = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs)
    outcome = parsed("{" + body + "}")
    assert isinstance(outcome, AFDInputError)
    assert (outcome.argument, outcome.value) == ("--afd-config", key)


@FAST
@given(
    depth=st.integers(2, 3000),  # [1] alone is a valid shared_expert_ranks
    key=st.sampled_from([k for k in KEYS if k not in BASE]),
    opener=st.sampled_from(["[", '{"x": ']),
)
def test_deep_nesting_is_refused_naming_the_key_or_the_flag(
    depth: int, key: str, opener: str
) -> None:
    """Up to the parser's recursion limit the key is named; past it, `--afd-config`."""
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    outcome = parsed(json.dumps(BASE)[:-1] + f', "{key}": {nested}}}')
    assert isinstance(outcome, AFDInputError)
    assert outcome.argument.split("[")[0] in (key, "--afd-config"), str(outcome)


@pytest.mark.parametrize("depth", [900, 960, 980, 990, 995])
def test_nesting_near_the_parser_limit_names_the_key(depth: int) -> None:
    """Where json.loads still succeeds, showing the value must not recurse past the limit
    (repr of a list ~990 deep raised RecursionError inside the error's constructor)."""
    doc = '{"num_attention_ranks": 1, "num_ffn_ranks": 2, "group": '
    outcome = parsed(doc + "[" * depth + "]" * depth + "}")
    assert isinstance(outcome, AFDInputError)
    assert outcome.argument in ("group", "--afd-config")


# == 1b. the text itself ======================================================================
@FAST
@given(text=st.text(st.characters(exclude_categories=()), max_size=60))
def test_any_text_is_refused_naming_the_flag_unless_it_is_a_config(text: str) -> None:
    outcome = parsed("{" + text)
    if isinstance(outcome, AFDInputError):
        assert names_a_key_or_the_flag(outcome), str(outcome)


@FAST
@given(raw=st.binary(max_size=60))
def test_a_command_line_that_is_not_utf8_is_refused(raw: bytes) -> None:
    """argv as Python decodes it: bytes that are not UTF-8 become lone surrogates."""
    text = b'{"num_attention_ranks": 1, "num_ffn_ranks": 2, "group": "' + raw + b'"}'
    outcome = parsed(os.fsdecode(text))
    if isinstance(outcome, AFDInputError):
        assert names_a_key_or_the_flag(outcome), str(outcome)


@FAST
@given(text=st.text(st.characters(exclude_categories=()), max_size=40))
def test_text_that_is_not_an_object_is_refused_naming_the_flag(text: str) -> None:
    """Text not starting with "{" is a path; no such file, a NUL, a directory: refused."""
    assume(not text.strip().startswith("{"))
    outcome = parsed(text)
    assert isinstance(outcome, AFDInputError)
    assert outcome.argument == "--afd-config"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("afd-config-files")


@FAST
@given(content=st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode())))
def test_a_file_of_random_bytes_is_refused_naming_the_flag(content: bytes, files: Path) -> None:
    path = files / "afd.json"
    path.write_bytes(content)
    outcome = parsed(str(path))
    if isinstance(outcome, AFDInputError):
        assert names_a_key_or_the_flag(outcome), str(outcome)
        try:
            value = json.loads(content)
        except ValueError:  # not UTF-8, not JSON: the text as a whole
            assert outcome.argument == "--afd-config"
        else:
            if not isinstance(value, dict):
                assert outcome.argument == "--afd-config"


def test_the_size_limit_is_exact() -> None:
    fits = json.dumps(BASE)
    fits += " " * (MAX_CONFIG_BYTES - len(fits))
    assert isinstance(parsed(fits), AFDConfig)
    over = parsed(fits + " ")
    assert isinstance(over, AFDInputError)
    assert (over.argument, over.value) == ("--afd-config", f"{MAX_CONFIG_BYTES + 1} bytes")
    multibyte = parsed(
        json.dumps({**BASE, "group": "é" * (MAX_CONFIG_BYTES // 2)}, ensure_ascii=False)
    )
    assert isinstance(multibyte, AFDInputError) and multibyte.argument == "--afd-config"


def test_a_huge_value_is_shown_cut_short() -> None:
    outcome = parsed(json.dumps({**BASE, "group": ["g" * 1000] * 900}))
    assert isinstance(outcome, AFDInputError) and outcome.argument == "group"
    assert "characters)" in str(outcome) and len(str(outcome)) < 500


# == 1c. cli.checked_config: what `vllm serve --afd-config` runs ==============================
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Qwen3-MoE checkpoint (8 experts, H 128), as the vLLM tests build theirs."""
    path = tmp_path_factory.mktemp("tiny") / "qwen3_moe"
    build_tiny_model("qwen3_moe", str(path), seed=0, dtype="float32")
    return str(path)


def served(text: str, model: str) -> AFDConfig | str:
    """`cli.checked_config` as `vllm serve MODEL --afd-config TEXT` calls it (data
    parallel 1, no other flag), or its refusal line (status 2 checked)."""
    try:
        return cli.checked_config(text, None, SimpleNamespace(model=model))
    except cli.ConfigRefused as refused:
        assert refused.code == 2
        message = str(refused)
        assert message.startswith("error: --afd-config: ") and "\n" not in message, message
        assert len(message) <= LONGEST_MESSAGE, message[:300]
        return message


@FAST
@given(data=st.data(), key=st.sampled_from(KEYS))
def test_checked_config_accepts_or_refuses_naming_the_key(
    data: st.DataObject, key: str, model_dir: str
) -> None:
    value = data.draw(value_of(key), label="value")
    outcome = served(json.dumps({**BASE, key: value}), model_dir)
    if isinstance(outcome, str):
        assert key in outcome, outcome


@FAST
@given(key=near_key(), value=JSON)
def test_checked_config_refuses_a_near_key_naming_it(key: str, value: Any, model_dir: str) -> None:
    outcome = served(json.dumps({**BASE, key: value}), model_dir)
    if key in KEYS:  # the edit made another real key
        assert isinstance(outcome, AFDConfig) or key in outcome
        return
    assert isinstance(outcome, str) and f"--afd-config key {key!r}" in outcome
    # refused for the key, whatever its value
    assert outcome == served(json.dumps({**BASE, key: None}), model_dir)


@FAST
@given(doc=documents())
def test_checked_config_any_document(doc: Any, model_dir: str) -> None:
    outcome = served(json.dumps(doc), model_dir)
    if isinstance(outcome, str):
        rest = outcome.removeprefix("error: --afd-config: ")
        # about the flag itself ("expected a JSON object ..."), or naming a key
        assert rest.startswith("expected") or any(k in rest for k in KEYS), outcome


def test_checked_config_refuses_an_empty_flag(model_dir: str) -> None:
    """`--afd-config ''` used to start a server without AFD; now it is refused."""
    outcome = served("", model_dir)
    assert isinstance(outcome, str) and "--afd-config: expected a JSON object" in outcome


def test_checked_config_names_hccl_buffsize_mb(model_dir: str) -> None:
    """The layout's check says HCCL_BUFFSIZE; the user wrote hccl_buffsize_mb."""
    text = json.dumps(
        {**BASE, "micro_batch_num": 8, "max_tokens_per_micro_batch": 512, "hccl_buffsize_mb": 1}
    )
    outcome = served(text, model_dir)
    assert isinstance(outcome, str) and outcome.startswith(
        "error: --afd-config: hccl_buffsize_mb: expected >= "
    )


def test_checked_config_refuses_backend_npu_without_torch_npu(model_dir: str) -> None:
    text = json.dumps({**BASE, "backend": "npu", "window_groups": "per_micro_batch"})
    outcome = served(text, model_dir)
    assert (
        isinstance(outcome, str)
        and 'backend: expected "reference" on a host without torch_npu' in outcome
    )


# == 2. the real command line =================================================================
AUDIT_LOG = "AFD_FUZZ_AUDIT_LOG"
# Installed as `sitecustomize` (PYTHONPATH) in the CLI's process and any Python child of it.
AUDIT_HOOK = textwrap.dedent(
    f"""
    import os, sys

    _log = os.environ.get({AUDIT_LOG!r})

    def _note(line):
        fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\\n").encode(errors="replace"))
        finally:
            os.close(fd)

    def _hook(event, args):
        if event == "open" and isinstance(args[0], str) and args[0].startswith("/dev/shm/afd-"):
            _note(f"window {{args[0]}} (pid {{os.getpid()}})")
        elif event == "subprocess.Popen":
            argv = args[1]
            if not isinstance(argv, (str, bytes)):
                argv = " ".join(str(a) for a in argv or [])
            argv = f"{{args[0]}} {{argv}}"
            if "gcs_server" in argv or "raylet" in argv:
                _note(f"ray {{argv[:200]}} (pid {{os.getpid()}})")

    if _log:
        sys.addaudithook(_hook)
    """
)


@pytest.fixture(scope="module")
def audit_hook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("audit")
    (directory / "sitecustomize.py").write_text(AUDIT_HOOK)
    return directory


def audited_env(hook: Path, log: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, AUDIT_LOG: str(log)}


def test_the_audit_hook_sees_windows_and_ray_daemons(audit_hook: Path, tmp_path: Path) -> None:
    """The detector is not vacuous: a shared-memory window group and a spawned "gcs_server"
    are reported."""
    log = tmp_path / "audit.log"
    script = textwrap.dedent(
        """
        import subprocess, torch
        from afd_dispatch import RankTopology, WindowLayout, create_window_group
        group = create_window_group(
            "fuzz-audit", RankTopology(1, 1), WindowLayout(1, 1, 2, 1, 0, 32, torch.float32),
            transport="shm",
        )
        group.close()
        subprocess.run(["true", "gcs_server"], check=True)
        """
    )
    subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, **audited_env(audit_hook, log)},
        check=True, timeout=120,
    )  # fmt: skip
    lines = log.read_text().splitlines()
    assert any(line.startswith("window /dev/shm/afd-") for line in lines), lines
    assert any(line.startswith("ray true true gcs_server") for line in lines), lines


@st.composite
def refused_cli_input(draw: st.DrawFn, model: str) -> tuple[str, str]:
    """(--afd-config text, the line the in-process check refuses it with)."""
    kind = draw(st.sampled_from(["value", "near key", "document", "duplicate", "not json"]))
    if kind == "value":
        key = draw(st.sampled_from(KEYS))
        text = json.dumps({**BASE, key: draw(value_of(key))})
    elif kind == "near key":
        text = json.dumps({**BASE, draw(near_key()): draw(JSON)})
    elif kind == "document":
        text = json.dumps(draw(documents().filter(lambda d: isinstance(d, dict))))
    elif kind == "duplicate":
        key = draw(st.sampled_from(KEYS))
        text = json.dumps(BASE)[:-1] + f', "{key}": 1, "{key}": 2}}'
    else:
        text = "{" + draw(
            st.text(st.characters(codec="ascii", exclude_characters="\x00"), max_size=30)
        )
    outcome = served(text, model)
    assume(isinstance(outcome, str))
    assert isinstance(outcome, str)
    return text, outcome


CLI_EXAMPLES = 4  # ~12 s each (vLLM's import); the whole test stays under ~60 s


@pytest.mark.slow
@pytest.mark.e2e  # the real `vllm serve` command, refusing: CI runs it on every vLLM it tests
@settings(
    max_examples=CLI_EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.filter_too_much],
)  # fmt: skip
@given(data=st.data())
def test_the_real_cli_refuses_with_status_2_before_any_worker(
    data: st.DataObject, model_dir: str, audit_hook: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    text, expected = data.draw(refused_cli_input(model_dir), label="--afd-config")
    log = tmp_path_factory.mktemp("run") / "audit.log"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in audited_env(audit_hook, log).items():
            mp.setenv(name, value)
        run = refuse(model_dir, Bad(text, ()))
    tail = run.output[-3000:]
    assert run.returncode == 2, (run.returncode, tail)
    errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert errors == [expected], tail
    assert "Traceback" not in run.output, tail
    assert STARTED.search(run.output) is None, tail
    assert not run.session_left, run.session_left
    assert "ray" not in run.tmp_left, run.tmp_left  # no Ray session directory
    assert not log.exists(), log.read_text()  # no window file opened, no Ray daemon spawned
