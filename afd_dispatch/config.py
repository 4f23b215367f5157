"""`AFDConfig`: what `--afd-config` takes, declared, and checked as untrusted input.

Each key is a field of a pydantic dataclass, as vLLM declares its own configs: its type,
its `Literal` choices and its bounds are in the declaration, pydantic checks them (strict:
no "2" for 2, no true for 1), and a refusal is an `AFDInputError` naming the key, what it
allows (`allowed`, read off the same declaration) and the value. What one key cannot say
alone (a rank range that depends on A and F, replicas per expert) is checked after them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from afd_dispatch.config_deprecated import current_keys
from afd_dispatch.errors import AFDInputError
from afd_dispatch.kernels import Backend, resolve_backend
from afd_dispatch.layout import (
    DEFAULT_HCCL_BUFFSIZE_MB,
    MAX_MICRO_BATCHES,
    MAX_TOKENS_PER_MICRO_BATCH,
)
from afd_dispatch.topology import MAX_RANKS_PER_ROLE, RankTopology
from afd_dispatch.untrusted_json import (
    Cut,
    is_int,
    loads,
    read_text,
    refuse_unless,
    shown,
    too_deep,
)
from afd_dispatch.windows.transport import WindowTransport

MAX_CONFIG_BYTES = 1 << 20
MAX_VALUE_DEPTH = 32  # nesting of one key's value; the deepest real one is 1 (a list, an object)
MIN_TIMEOUT_S = 0.1  # of wait_timeout_s and startup_timeout_s
MAX_TIMEOUT_S = 3600.0
QUANT_MODE_CODES = {"none": 0, "int8": 2}
Transport = Literal["auto", WindowTransport]
WindowGroups = Literal["shared", "per_micro_batch"]
SharedExpertsOn = Literal["ffn", "attention"]
TRANSPORTS: tuple[str, ...] = get_args(Transport)
WINDOW_GROUPS: tuple[str, ...] = get_args(WindowGroups)
SHARED_EXPERTS_ON: tuple[str, ...] = get_args(SharedExpertsOn)
NPU_WINDOWS = 'its windows are HCCL memory; "inproc" and "shm" are the reference link\'s'
GROUP_NAME = r"[A-Za-z0-9_.-]{1,64}"
_RAY_ADDRESS = re.compile(
    r"(auto|local|ray://[A-Za-z0-9_.:\[\]-]{1,255}|[A-Za-z0-9_.\[\]-]{1,253}:[0-9]{1,5})"
)


def _allowed(text: str) -> Any:
    """What a key allows, said in its refusal where the declaration alone says too little."""
    return Field(json_schema_extra={"allowed": text})


Ranks = Annotated[int, Field(ge=1, le=MAX_RANKS_PER_ROLE)]
Seconds = Annotated[float, Field(ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S, allow_inf_nan=False)]
Switch = Annotated[bool, _allowed("true or false")]

_C = TypeVar("_C")


def _refusing(cls: type[_C]) -> type[_C]:
    """Make the constructor raise `AFDInputError` (key, allowed, value) where pydantic
    raised `ValidationError`; an `AFDInputError` raised by a check inside passes as it is."""
    validate: Callable[..., None] = cls.__init__  # type: ignore[misc]

    @functools.wraps(validate)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            validate(self, *args, **kwargs)
        except ValidationError as exc:
            raise _input_error(cls, args, kwargs, exc) from None

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def allowed(name: str) -> str:
    """What key `name` of `AFDConfig` allows, in words, read off its declaration; a key of
    a backend section is named as its path ("reference.transport")."""
    section, _, key = name.rpartition(".")
    owner = SECTIONS[section] if section else AFDConfig
    info = vars(owner)["__pydantic_fields__"][key]  # pydantic's FieldInfo
    extra = info.json_schema_extra
    if isinstance(extra, dict) and "allowed" in extra:
        return str(extra["allowed"])
    kind = info.annotation
    if getattr(kind, "__origin__", None) is Literal:
        return f"one of {list(get_args(kind))}"
    bounds = {type(m).__name__: m for m in info.metadata}
    lo = getattr(bounds.get("Ge"), "ge", None)
    hi = getattr(bounds.get("Le"), "le", None)
    what = "seconds" if kind is float else "an integer"
    if hi is None:
        return f"{what} >= {lo:g}"
    return f"{what} in [{lo:g}, {hi:g}]"


def _input_error(
    cls: type, args: tuple[Any, ...], kwargs: dict[str, Any], exc: ValidationError
) -> AFDInputError:
    """The first refusal of `exc` (pydantic reports keys in declaration order, as the
    checks ran before) as `AFDInputError`, showing the whole value given for the key."""
    first = exc.errors(include_url=False)[0]
    raised = first.get("ctx", {}).get("error")
    if isinstance(raised, AFDInputError):  # a check of __post_init__: already says it all
        return raised
    prefix = getattr(cls, "KEY_PREFIX", "")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    given = dict(zip(names, args, strict=False)) | kwargs
    where = first["loc"][0] if first["loc"] else "--afd-config"
    name = names[where] if isinstance(where, int) and where < len(names) else str(where)
    if first["type"] == "multiple_argument_values":
        return AFDInputError(prefix + name, "given once", shown(given.get(name)))
    if name not in names and prefix:  # a section's key: the section is what is named
        return AFDInputError(prefix[:-1], f"an object with keys among {names}", shown(name))
    if name not in names:
        return AFDInputError(f"key {shown(name)!r}", f"one of {sorted(names)}", shown(name))
    if first["type"] == "missing" or first["type"] == "missing_argument":
        return AFDInputError(prefix + name, "present (a required key)", None)
    value = shown(given.get(name, first.get("input")))
    return AFDInputError(prefix + name, allowed(prefix + name), value)


@_refusing
@dataclass(frozen=True, config=ConfigDict(strict=True, extra="forbid"))
class ReferenceBackendConfig:
    """The keys only the reference backend reads: `"reference": {...}` in `--afd-config`.

    They configure the reference link's windows. Where `backend` resolves to "npu" (A3,
    whose windows are always HCCL memory) each must keep its "auto" value: `check_runnable`
    and the link refuse any other, as a setting that would be ignored. So a config with
    "backend": "auto" that sets one runs on a CPU host and is refused on A3.
    (`hccl_buffsize_mb` stays top-level: both links size their windows by it, the reference
    one to refuse on a CPU what A3's HCCL_BUFFSIZE would.)
    """

    KEY_PREFIX: ClassVar[str] = "reference."

    transport: Transport = "auto"
    """Where the windows live: "inproc" (every rank in this process, tests and the bench),
    "shm" (POSIX shared memory, owner-only, for ranks in other processes: the Ray actors),
    "auto" ("shm")."""


@_refusing
@dataclass(frozen=True, config=ConfigDict(strict=True, extra="forbid"))
class AFDConfig:
    """An AFD deployment, as one JSON object.

    Keys (all optional but the two rank counts; `config_deprecated` reads deprecated ones):

    =========================  ==========================================================
    num_attention_ranks        A, attention ranks, 1..768
    num_ffn_ranks              F, FFN ranks, 1..768 (any ratio, A < F included)
    micro_batch_num            M, micro-batches in flight, 1..8
    max_tokens_per_micro_batch BS, tokens per micro-batch and attention rank, 1..512
    shared_expert_ranks        FFN ranks that host the shared experts (only those);
                               empty with shared_experts_on "attention"
    expert_replicas            replicas of every routed expert (int), or {"id": count}
    quant_mode                 "none" | "int8" (dynamic per-token int8 on A2F)
    sync_flag                  0: header to every FFN rank (the only value the runtime
                               runs; 1, header only to ranks that got slots, is refused:
                               FFN batching waits for a header from every session)
    backend                    "auto" | "reference" | "npu"
    reference                  the reference backend's own keys (`ReferenceBackendConfig`):
                               {"transport": "auto" | "inproc" | "shm"}
    group                      window group / communicator name, [A-Za-z0-9_.-]{1,64}
    ffn_start_rank_id          first FFN rank of the communicator
    hccl_buffsize_mb           HCCL_BUFFSIZE the windows must fit, 1..65536
    wait_timeout_s             deadline of every flag wait, [0.1, 3600]
    startup_timeout_s          deadline for workers to come up, [0.1, 3600]
    window_groups              "shared": one group, M micro-batches in it; "per_micro_batch":
                               one group of M = 1 per micro-batch (what A3's F2A requires,
                               so the only value backend npu takes)
    ray_address                null: start a local Ray (the embedded default); "auto",
                               "host:port" or "ray://host:port" (port 1..65535): join that
                               cluster
    ffn_max_restarts           restarts Ray may make of a dead FFN actor, 0..100
    ffn_stall_timeout_s        an FFN actor that answers no health probe for this long is
                               killed and restarted (a restart), [3, 3600]
    batch_invariant            expert matmuls independent of batch composition (exact tests)
    trace                      record per-layer, per-micro-batch spans
    shared_experts_on          "ffn": shared experts are slots of the AFD table, hosted on
                               FFN ranks; "attention": the attention side runs them itself
                               (what the vLLM plugin does: vLLM computes them in its runner)
    =========================  ==========================================================

    The constructor checks each key and the combinations no use of the config can run.
    `from_dict` / `from_json` (a user's config) also refuse what the link that this host
    resolves `backend` to cannot run (`check_runnable`); code that builds a config itself
    gets those refusals from the link when it starts.
    """

    num_attention_ranks: Ranks
    num_ffn_ranks: Ranks
    micro_batch_num: Annotated[int, Field(ge=1, le=MAX_MICRO_BATCHES)] = 2
    max_tokens_per_micro_batch: Annotated[int, Field(ge=1, le=MAX_TOKENS_PER_MICRO_BATCH)] = 256
    shared_expert_ranks: Annotated[
        tuple[int, ...], Field(strict=False), _allowed("a list of ranks")
    ] = ()
    expert_replicas: Annotated[
        int | dict[int, int], _allowed('an integer or an object {"expert id": count}')
    ] = 1
    quant_mode: Literal["none", "int8"] = "none"
    sync_flag: Annotated[
        int,
        Field(ge=0, le=0),
        _allowed(
            "0 (each FFN rank's batching waits for a header from every attention rank; with "
            "1 a rank that gets no slot of a micro-batch gets no header, waits for it until "
            "wait_timeout_s, and so does every later micro-batch sent to it)"
        ),
    ] = 0
    backend: Backend = "auto"
    reference: Annotated[
        ReferenceBackendConfig,
        _allowed('an object of the reference backend\'s keys: {"transport": ...}'),
    ] = ReferenceBackendConfig()
    group: Annotated[
        str,
        Field(pattern=f"^{GROUP_NAME}$"),
        _allowed(f"a string matching {GROUP_NAME}"),
    ] = "afd"
    ffn_start_rank_id: Annotated[
        int, Field(ge=0), _allowed("an integer in [0, num_attention_ranks]")
    ] = 0
    hccl_buffsize_mb: Annotated[int, Field(ge=1, le=65536)] = DEFAULT_HCCL_BUFFSIZE_MB
    # below 0.1 s a wait expires before a loaded host has run the other side at all,
    # and an idle FFN loop that re-enters its wait at each expiry keeps a core busy
    wait_timeout_s: Seconds = 30.0
    startup_timeout_s: Seconds = 120.0
    window_groups: WindowGroups = "shared"
    ray_address: Annotated[
        str | None,
        _allowed('null, "auto", "local", "host:port" or "ray://host:port" (port 1..65535)'),
    ] = None
    ffn_max_restarts: Annotated[int, Field(ge=0, le=100)] = 3
    # the supervisor probes every 0.5 s and reports a rank stalled after 2 s of silence:
    # a shorter bound would kill actors whose answer was merely not collected yet
    ffn_stall_timeout_s: Annotated[float, Field(ge=3.0, le=MAX_TIMEOUT_S, allow_inf_nan=False)] = (
        10.0
    )
    batch_invariant: Switch = False
    trace: Switch = False
    shared_experts_on: SharedExpertsOn = "ffn"

    def __post_init__(self) -> None:
        refuse_unless(
            self.ffn_start_rank_id <= self.num_attention_ranks,
            "ffn_start_rank_id",
            f"an integer in [0, {self.num_attention_ranks}]",
            self.ffn_start_rank_id,
        )
        refuse_unless(
            self.ray_address is None
            or (_RAY_ADDRESS.fullmatch(self.ray_address) is not None
                and 1 <= _port(self.ray_address) <= 65535),
            "ray_address",
            allowed("ray_address"),
            self.ray_address,
        )  # fmt: skip
        topology = RankTopology(
            self.num_attention_ranks, self.num_ffn_ranks, self.ffn_start_rank_id
        )
        object.__setattr__(self, "_topology", topology)
        self._check_shared_ranks(topology)
        self._check_replicas()

    def _check_shared_ranks(self, topology: RankTopology) -> None:
        ranks = self.shared_expert_ranks
        refuse_unless(
            not ranks or self.shared_experts_on == "ffn",
            "shared_expert_ranks",
            'empty with shared_experts_on "attention" (the attention side runs the shared '
            "experts; no FFN rank hosts one)",
            list(ranks),
        )
        lo, hi = topology.ffn_ranks.start, topology.ffn_ranks.stop
        for r in ranks:
            refuse_unless(
                is_int(r) and lo <= r < hi,
                "shared_expert_ranks",
                f"FFN ranks in [{lo}, {hi})",
                list(ranks),
            )
        refuse_unless(
            len(set(ranks)) == len(ranks),
            "shared_expert_ranks",
            "distinct ranks",
            list(ranks),
        )
        refuse_unless(
            len(ranks) < topology.num_ffn_ranks,
            "shared_expert_ranks",
            f"at most F - 1 = {topology.num_ffn_ranks - 1} ranks (one must host routed experts)",
            list(ranks),
        )

    @field_validator("reference", mode="before")
    @classmethod
    def _reference_keys(cls, value: Any) -> Any:
        """A JSON object is the section's keys, each checked by its own declaration."""
        if not isinstance(value, Mapping):
            return value  # a ReferenceBackendConfig, or refused as the declaration says
        # refused before the call: a key such as "self" would clash with __init__'s own
        names = [f.name for f in dataclasses.fields(ReferenceBackendConfig)]
        for key in value:
            refuse_unless(key in names, "reference", f"an object with keys among {names}", key)
        return ReferenceBackendConfig(**value)

    @field_validator("expert_replicas", mode="before")
    @classmethod
    def _expert_ids(cls, value: Any) -> Any:
        """JSON's object keys are strings: {"3": 2} names expert 3 (each id once)."""
        if not isinstance(value, Mapping):
            return value  # an integer, or refused as the declaration says
        parsed: dict[int, int] = {}
        for key, count in value.items():
            expert = _parse_expert_key(key)
            refuse_unless(expert not in parsed, "expert_replicas", "each expert id once", key)
            refuse_unless(is_int(count), f"expert_replicas[{key!r}]", "an integer", count)
            parsed[expert] = count
        return dict(sorted(parsed.items()))

    def _check_replicas(self) -> None:
        # Replicas of one expert go to distinct ranks among those not reserved for shared experts.
        most = self.num_ffn_ranks - len(self.shared_expert_ranks)
        within = f"an integer in [1, {most}] (FFN ranks without shared experts)"
        replicas = self.expert_replicas
        if isinstance(replicas, int):
            refuse_unless(1 <= replicas <= most, "expert_replicas", within, replicas)
            return
        for expert, count in replicas.items():
            refuse_unless(1 <= count <= most, f"expert_replicas[{str(expert)!r}]", within, count)

    # -- parsing ---------------------------------------------------------------------------
    @classmethod
    def from_json(cls, text_or_path: str) -> AFDConfig:
        """Parse a JSON object given inline (starts with "{") or as a file path."""
        return cls.from_dict(cls.read_json(text_or_path))

    @staticmethod
    def read_json(text_or_path: str) -> Any:
        """The JSON value given inline (starts with "{") or as a file path, unchecked."""
        refuse_unless(
            isinstance(text_or_path, str),
            "--afd-config",
            "a JSON string or a path",
            text_or_path,
        )
        inline = text_or_path.lstrip().startswith("{")
        text = text_or_path
        if not inline:
            allowed = "a JSON object or the path of a readable UTF-8 file"
            text = read_text(text_or_path, "--afd-config", MAX_CONFIG_BYTES, allowed)
        # a command line that is not UTF-8 reaches Python with its bytes as lone surrogates,
        # and JSON may escape any ("\ud800"): counted, not refused by encode() with an error
        size = len(text.encode(errors="surrogatepass"))
        refuse_unless(
            size <= MAX_CONFIG_BYTES,
            "--afd-config",
            f"at most {MAX_CONFIG_BYTES} bytes",
            f"{size} bytes",
        )
        return loads(text, "--afd-config")

    @classmethod
    def from_dict(cls, data: Any) -> AFDConfig:
        """A user's config (a JSON object's values): every key checked, and `check_runnable`."""
        refuse_unless(isinstance(data, dict), "--afd-config", "a JSON object", type(data).__name__)
        data = current_keys(data)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        for key in data:
            refuse_unless(
                key in known,
                f"--afd-config key {shown(key)!r}",
                f"one of {sorted(known)}",
                key,
            )
        for key, value in data.items():
            refuse_unless(
                not too_deep(value, MAX_VALUE_DEPTH),
                key,
                f"a value nested at most {MAX_VALUE_DEPTH} lists or objects deep",
                Cut(f"<{type(value).__name__} nested deeper>"),
            )
        config = cls(**data)
        config.check_runnable()
        return config

    def check_runnable(self) -> None:
        """Refuse what the link of the backend this host resolves `backend` to (as
        `Deployment` resolves it) cannot run; `afd_dispatch.link` refuses the same when a
        rank starts, which on the Ray pool is inside the FFN actors, after Ray started."""
        backend = resolve_backend(self.backend)
        auto = f'"auto" is {backend!r} on this host; ' if self.backend != backend else ""
        self.check_sections(backend)
        refuse_unless(
            backend != "npu" or self.window_groups == "per_micro_batch",
            "window_groups",
            f"\"per_micro_batch\" with backend 'npu' ({auto}A3's npu_ffn_to_attention writes "
            "one micro-batch per attention window, M = 1)",
            self.window_groups,
        )

    def check_sections(self, backend: str) -> None:
        """Refuse a reference-section key set away from "auto" where `backend` (resolved:
        "reference" or "npu") is npu, whose windows are HCCL memory: `check_runnable` on a
        user's config, the link on one built in code."""
        auto = f'"auto" is {backend!r} on this host; ' if self.backend != backend else ""
        refuse_unless(
            backend != "npu" or self.reference.transport == "auto",
            "reference.transport",
            f"\"auto\" with backend 'npu' ({auto}{NPU_WINDOWS})",
            self.reference.transport,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out["reference"] = dataclasses.asdict(self.reference)
        out["shared_expert_ranks"] = list(self.shared_expert_ranks)
        if isinstance(self.expert_replicas, Mapping):
            out["expert_replicas"] = {str(k): v for k, v in self.expert_replicas.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    # -- derived ---------------------------------------------------------------------------
    @property
    def topology(self) -> RankTopology:
        return self._topology  # type: ignore[no-any-return, attr-defined]

    @property
    def world_size(self) -> int:
        return self.num_attention_ranks + self.num_ffn_ranks

    @property
    def quant_mode_code(self) -> int:
        return QUANT_MODE_CODES[self.quant_mode]


def _port(address: str) -> int:
    """The port of a ray_address that names one, else 1 (a name alone: "auto", "ray://h")."""
    _, colon, port = address.rpartition(":")
    return int(port) if colon and port.isascii() and port.isdigit() else 1


def _parse_expert_key(key: Any) -> int:
    if is_int(key):
        return int(key)
    refuse_unless(
        isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 6,
        "expert_replicas",
        "keys that are expert ids (decimal integers >= 0)",
        key,
    )
    return int(key)


SECTIONS = {"reference": ReferenceBackendConfig}
"""The backend sections of `AFDConfig`: key -> the dataclass declaring its keys."""
