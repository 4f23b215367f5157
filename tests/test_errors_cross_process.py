"""Every exception the project defines reaches another process readable.

Ranks run as spawned processes and FFN workers as Ray actors, so an error raised there is
pickled on its way to the caller. An error that does not unpickle arrives as Ray's
`UnserializableException` or breaks a process pool, and the user loses the one message
that says what was wrong. The filed case: `AFDInputError("a", "b", "c")` did not unpickle.

1. Discovery walks the project's modules (`afd_dispatch`, and `kernels/`, `integrations/`
   installed under it) for exception classes; each must have constructor args in `ARGS`,
   so a class added later cannot slip past these tests.
2. A pickle round trip, every protocol, keeps type, message, args and attributes; an
   unpicklable attribute (AFDInputError.value may be anything) travels as its repr.
3. The same across a spawned child process and across a Ray actor boundary, where
   `ray.get` must raise an instance of the original class carrying its message.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import pickle
import pkgutil
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from types import ModuleType
from typing import Any

import pytest

from afd_dispatch.errors import (
    AFDBadMicroBatchError,
    AFDHandshakeError,
    AFDInputError,
    AFDPeerError,
    AFDRefusedError,
    AFDTimeoutError,
)
from afd_dispatch.integrations.vllm.cli import ConfigRefused
from afd_dispatch.integrations.vllm.launch import PortRaceLost
from afd_dispatch.windows.wait import ScheduleStopped

# `afd_dispatch.kernels` and `.integrations` live in top-level directories (pyproject's
# package-dir), outside `afd_dispatch.__path__`, so each is walked from its own root.
ROOTS = ("afd_dispatch", "afd_dispatch.kernels", "afd_dispatch.integrations")

# Constructor args per exception class, shaped like the project's own raises.
ARGS: dict[type[BaseException], tuple[Any, ...]] = {
    AFDInputError: ("micro_batch_num", "an integer in [1, 8]", 9),
    AFDBadMicroBatchError: (
        "FFN rank 2 of group 'g': window layer ids (micro-batch 0)",
        "one layer id from every session",
        [0, 1],
    ),
    AFDTimeoutError: (
        "attention rank 0 waited for session 3, micro-batch 1; flags of FFN ranks [2] "
        "missing (deadline 5 s passed)",
    ),
    AFDHandshakeError: ("attention rank 0 and FFN rank 2 disagree: hidden_size 64 vs 128",),
    AFDPeerError: ("AFD: the deployment cannot serve: FFN rank 2 failed (restart budget spent)",),
    AFDRefusedError: ("AFD: micro-batch slot 1 was refused, its results are zeros (FFN rank 2)",),
    ScheduleStopped: ("the schedule context was stopped while waiting",),
    ConfigRefused: ("error: --afd-config: micro_batch_num: expected an integer in [1, 8], got 9",),
    PortRaceLost: ("vllm serve exited with 1 before it was ready:\n... EADDRINUSE ...",),
}

CHILD_TIMEOUT_S = 120.0  # a spawned child imports torch on a loaded 2-core host
RAY_TIMEOUT_S = 120.0  # likewise a Ray worker starting the actor


def _ids(classes: Iterable[type[BaseException]]) -> list[str]:
    return [cls.__qualname__ for cls in classes]


# -- discovery ----------------------------------------------------------------------------
def project_modules() -> Iterator[ModuleType]:
    """Every importable module of the project; those needing torch_npu are skipped."""
    for root in ROOTS:
        package = importlib.import_module(root)
        yield package
        for info in pkgutil.walk_packages(package.__path__, f"{root}."):
            try:
                yield importlib.import_module(info.name)
            except ModuleNotFoundError as exc:
                if (exc.name or "").split(".")[0] != "torch_npu":
                    raise


def exceptions_defined_in(module: ModuleType) -> set[type[BaseException]]:
    """Exception classes whose home is `module`, nested classes included."""
    found: set[type[BaseException]] = set()
    seen: set[type] = set()
    todo = [vars(module)]
    while todo:
        for obj in todo.pop().values():
            if not isinstance(obj, type) or obj in seen or obj.__module__ != module.__name__:
                continue
            seen.add(obj)
            if issubclass(obj, BaseException):
                found.add(obj)
            todo.append(dict(vars(obj)))
    return found


def project_exceptions() -> set[type[BaseException]]:
    found: set[type[BaseException]] = set()
    for module in project_modules():
        found |= exceptions_defined_in(module)
    return found


def assert_same(got: BaseException, want: BaseException) -> None:
    assert type(got) is type(want)
    assert str(got) == str(want)
    assert got.args == want.args
    assert vars(got) == vars(want)


# -- 1. discovery -------------------------------------------------------------------------
def test_every_project_exception_has_constructor_args() -> None:
    found = project_exceptions()
    assert set(ARGS) <= found, "ARGS names a class discovery did not find"
    missing = sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in found - set(ARGS))
    assert not missing, f"add constructor args to ARGS for {missing}"


# -- 2. pickle ----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", list(ARGS), ids=_ids(ARGS))
def test_a_pickle_round_trip_keeps_type_message_and_attributes(
    cls: type[BaseException],
) -> None:
    original = cls(*ARGS[cls])
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert_same(pickle.loads(pickle.dumps(original, protocol=protocol)), original)


def test_the_filed_input_round_trips() -> None:
    original = AFDInputError("a", "b", "c")
    restored = pickle.loads(pickle.dumps(original))
    assert type(restored) is AFDInputError
    assert str(restored) == str(original) == "a: expected b, got 'c'"
    assert (restored.argument, restored.allowed, restored.value) == ("a", "b", "c")
    assert vars(restored) == vars(original)


def test_an_unpicklable_value_travels_as_its_repr() -> None:
    lock = threading.Lock()
    original = AFDInputError("lock", "a picklable value", lock)
    restored = pickle.loads(pickle.dumps(original))
    assert type(restored) is AFDInputError
    assert str(restored) == str(original)
    assert (restored.argument, restored.allowed) == ("lock", "a picklable value")
    assert restored.value == repr(lock)
    assert original.value is lock  # pickling leaves the original alone


# -- 3a. a spawned child process ----------------------------------------------------------
def raise_one(cls: type[BaseException], args: tuple[Any, ...]) -> None:
    raise cls(*args)


def raise_with_unpicklable_value() -> None:
    raise AFDInputError("lock", "a picklable value", threading.Lock())


@pytest.fixture(scope="module")
def child() -> Iterator[ProcessPoolExecutor]:
    """One spawned child for the module (spawning one costs an interpreter and torch)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        yield pool


@pytest.mark.parametrize("cls", list(ARGS), ids=_ids(ARGS))
def test_a_child_process_raises_and_the_parent_reads_it(
    child: ProcessPoolExecutor, cls: type[BaseException]
) -> None:
    with pytest.raises(cls) as raised:
        child.submit(raise_one, cls, ARGS[cls]).result(timeout=CHILD_TIMEOUT_S)
    assert_same(raised.value, cls(*ARGS[cls]))


def test_a_child_process_raises_with_an_unpicklable_value(child: ProcessPoolExecutor) -> None:
    with pytest.raises(AFDInputError) as raised:
        child.submit(raise_with_unpicklable_value).result(timeout=CHILD_TIMEOUT_S)
    err = raised.value
    assert type(err) is AFDInputError
    assert str(err).startswith("lock: expected a picklable value, got <unlocked _thread.lock")
    assert err.value == str(err).split(", got ", 1)[1]


# -- 3b. a Ray actor ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def raiser() -> Iterator[Any]:
    """An actor that raises what it is asked to, on one local Ray for the module.

    Token authentication stays on (Ray's default). The actor class is local, so Ray ships
    it by value: the workers cannot import this test module.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote(num_cpus=1)
        class Raiser:
            def raise_one(self, cls: type[BaseException], args: tuple[Any, ...]) -> None:
                raise cls(*args)

            def raise_with_unpicklable_value(self) -> None:
                raise AFDInputError("lock", "a picklable value", threading.Lock())

        yield Raiser.remote()  # type: ignore[attr-defined]
    finally:
        if started:
            ray.shutdown()


# A SystemExit (ConfigRefused: the CLI's exit status 2) ends whatever process raises it, a
# Ray worker too: it crosses processes only pickled, which the tests above cover.
RAY_RAISED = [cls for cls in ARGS if issubclass(cls, Exception)]


@pytest.mark.ray
@pytest.mark.parametrize("cls", RAY_RAISED, ids=_ids(RAY_RAISED))
def test_a_ray_actor_raises_and_the_driver_reads_it(raiser: Any, cls: type[BaseException]) -> None:
    import ray
    from ray.exceptions import RayTaskError

    want = cls(*ARGS[cls])
    with pytest.raises(cls) as raised:
        ray.get(raiser.raise_one.remote(cls, ARGS[cls]), timeout=RAY_TIMEOUT_S)
    err = raised.value
    # Ray raises a class deriving from both RayTaskError and the cause's class, so callers
    # catch it as the original; the cause itself is the rebuilt exception.
    assert isinstance(err, RayTaskError)
    assert str(want) in str(err)
    assert_same(err.cause, want)
    for name, value in vars(want).items():
        assert getattr(err, name) == value


@pytest.mark.ray
def test_a_ray_actor_raises_with_an_unpicklable_value(raiser: Any) -> None:
    import ray
    from ray.exceptions import RayTaskError

    with pytest.raises(AFDInputError) as raised:
        ray.get(raiser.raise_with_unpicklable_value.remote(), timeout=RAY_TIMEOUT_S)
    err = raised.value
    assert isinstance(err, RayTaskError)
    cause = err.cause
    assert type(cause) is AFDInputError
    assert str(cause).startswith("lock: expected a picklable value, got <unlocked _thread.lock")
    assert cause.value == str(cause).split(", got ", 1)[1]
    assert str(cause) in str(err)
