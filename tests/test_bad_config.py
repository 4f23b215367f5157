"""Bad deployment input: `AFDConfig.from_json`, the window layout and `expert_rank_table`.

The config is untrusted JSON (a command-line flag or a file): every defect must raise
`AFDInputError` naming the key and showing the value, never a bare `KeyError`,
`ValueError` or `RecursionError` from deep inside the parser.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from op_inputs import raises_input_error

from afd_dispatch import (
    AFDConfig,
    AFDInputError,
    RankTopology,
    WindowLayout,
    build_expert_rank_table,
    validate_expert_rank_table,
)
from afd_dispatch.config import MAX_CONFIG_BYTES

BASE: dict[str, Any] = {"num_attention_ranks": 2, "num_ffn_ranks": 2}


def rejected(call: Any, argument: str, shown: str) -> AFDInputError:
    """As `raises_input_error`, and the message starts with the argument and what it expects."""
    err = raises_input_error(call, argument, shown)
    assert str(err).startswith(f"{err.argument}: expected ")
    return err


def config_text(**overrides: Any) -> str:
    return json.dumps({**BASE, **overrides})


# == AFDConfig.from_json: one key at a time =================================================
KEY_CASES: list[tuple[str, Any, str]] = [
    # (key, bad value, shown in the error's value)
    ("num_attention_ranks", 0, "0"),
    ("num_attention_ranks", 769, "769"),
    ("num_attention_ranks", True, "True"),
    ("num_attention_ranks", "2", "'2'"),
    ("num_attention_ranks", 2.0, "2.0"),
    ("num_attention_ranks", None, "None"),
    ("num_ffn_ranks", -1, "-1"),
    ("num_ffn_ranks", [2], "[2]"),
    ("num_ffn_ranks", False, "False"),
    ("role", "router", "router"),
    ("role", 1, "1"),
    ("micro_batch_num", 0, "0"),
    ("micro_batch_num", 9, "9"),
    ("micro_batch_num", "two", "two"),
    ("max_tokens_per_micro_batch", 0, "0"),
    ("max_tokens_per_micro_batch", 513, "513"),
    ("max_tokens_per_micro_batch", True, "True"),
    ("quant_mode", "fp8", "fp8"),
    ("quant_mode", 2, "2"),
    ("sync_flag", 2, "2"),
    ("sync_flag", True, "True"),
    ("sync_flag", False, "False"),  # equal to 0, but not the integer 0
    ("sync_flag", 0.0, "0.0"),
    ("backend", "cuda", "cuda"),
    ("transport", "rdma", "rdma"),
    ("group", "", "''"),
    ("group", "no spaces", "no spaces"),
    ("group", "../etc", "../etc"),
    ("group", "g" * 65, "g" * 65),
    ("group", 7, "7"),
    ("ffn_start_rank_id", -1, "-1"),
    ("ffn_start_rank_id", 3, "3"),  # > A = 2
    ("ffn_start_rank_id", "0", "'0'"),
    ("hccl_buffsize_mb", 0, "0"),
    ("hccl_buffsize_mb", 65537, "65537"),
    ("wait_timeout_s", 0, "0"),
    ("wait_timeout_s", -1.5, "-1.5"),
    ("wait_timeout_s", 0.099, "0.099"),  # expires before a loaded host ran the other side
    ("startup_timeout_s", 1e-09, "1e-09"),
    ("wait_timeout_s", 3601, "3601"),
    ("wait_timeout_s", True, "True"),
    ("wait_timeout_s", "30", "'30'"),
    ("startup_timeout_s", float("nan"), "nan"),
    ("startup_timeout_s", float("inf"), "inf"),
    ("ffn_stall_timeout_s", 2.5, "2.5"),  # under the supervisor's stall notice: [3, 3600]
    ("ffn_stall_timeout_s", 3601, "3601"),
    # shared_expert_ranks: FFN ranks are [0, 2) here
    ("shared_expert_ranks", [2], "[2]"),
    ("shared_expert_ranks", [-1], "[-1]"),
    ("shared_expert_ranks", [0, 1], "[0, 1]"),  # every FFN rank: none left for routed experts
    ("shared_expert_ranks", [0, 0], "[0, 0]"),
    ("shared_expert_ranks", [True], "[True]"),
    ("shared_expert_ranks", [0.0], "[0.0]"),
    ("shared_expert_ranks", 0, "0"),
    ("shared_expert_ranks", "0", "'0'"),
    ("shared_expert_ranks", {"0": 1}, "{'0': 1}"),
    # expert_replicas: an int in [1, F - shared ranks] or {"expert id": count}
    ("expert_replicas", 0, "0"),
    ("expert_replicas", 3, "3"),
    ("expert_replicas", True, "True"),
    ("expert_replicas", 1.5, "1.5"),
    ("expert_replicas", "2", "'2'"),
    ("expert_replicas", [1, 2], "[1, 2]"),
    ("expert_replicas", {"x": 2}, "'x'"),
    ("expert_replicas", {"-1": 2}, "'-1'"),
    ("expert_replicas", {"1.0": 2}, "'1.0'"),
    ("expert_replicas", {"1234567": 2}, "'1234567'"),
    ("expert_replicas", {"1": 2, "01": 2}, "'01'"),  # one expert given twice
    ("expert_replicas['0']", {"0": 0}, "0"),
    ("expert_replicas['0']", {"0": 3}, "3"),
    ("expert_replicas['0']", {"0": True}, "True"),
    ("expert_replicas['0']", {"0": "2"}, "'2'"),
    ("expert_replicas['3']", {"1": 2, "3": 2.0}, "2.0"),
]


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [pytest.param(k, v, s, id=f"{k}={v!r}"[:60]) for k, v, s in KEY_CASES],
)
def test_from_json_rejects_bad_value(key: str, value: Any, shown: str) -> None:
    field = key.split("[")[0]
    text = config_text(**{field: value})
    rejected(lambda: AFDConfig.from_json(text), key, shown)


def test_base_config_and_boundaries_are_accepted() -> None:
    """The cases above differ from an accepted config in one key only."""
    cfg = AFDConfig.from_json(config_text())
    assert cfg.world_size == 4
    edge = AFDConfig.from_json(
        config_text(
            num_attention_ranks=768,
            num_ffn_ranks=768,
            micro_batch_num=8,
            max_tokens_per_micro_batch=512,
            ffn_start_rank_id=768,
            shared_expert_ranks=[768 + 767],
            expert_replicas={"0": 767, "999999": 1},
            hccl_buffsize_mb=65536,
            wait_timeout_s=3600,
            startup_timeout_s=0.1,
        )
    )
    assert edge.expert_replicas == {0: 767, 999999: 1}
    assert edge.shared_expert_ranks == (1535,)


def test_shared_ranks_follow_ffn_start_rank_id() -> None:
    text = config_text(ffn_start_rank_id=2, shared_expert_ranks=[0])  # FFN ranks are [2, 4)
    rejected(lambda: AFDConfig.from_json(text), "shared_expert_ranks", "[0]")
    assert AFDConfig.from_json(config_text(ffn_start_rank_id=2, shared_expert_ranks=[3]))


# == AFDConfig.from_json: the document as a whole ===========================================
@pytest.mark.parametrize(
    ("text", "argument", "shown"),
    [
        pytest.param('{"num_attention_ranks": 2,', "--afd-config", "line 1", id="truncated"),
        pytest.param('{"num_attention_ranks": 2} x', "--afd-config", "Extra data", id="extra"),
        pytest.param("{'num_attention_ranks': 2}", "--afd-config", "property name", id="quote"),
        pytest.param('{"num_ffn_ranks": 2}', "num_attention_ranks", "None", id="no-A"),
        pytest.param('{"num_attention_ranks": 2}', "num_ffn_ranks", "None", id="no-F"),
        pytest.param("{}", "num_attention_ranks", "None", id="empty"),
        pytest.param(
            config_text(colour="red"), "--afd-config key 'colour'", "colour", id="unknown-key"
        ),
        pytest.param(config_text(_topology=1), "'_topology'", "_topology", id="private-key"),
        pytest.param(
            '{"num_attention_ranks": 2, "num_ffn_ranks": 2, "num_ffn_ranks": 3}',
            "--afd-config",
            "num_ffn_ranks",
            id="duplicate-key",
        ),
        pytest.param(
            '{"num_attention_ranks": 1' + "0" * 5000 + ', "num_ffn_ranks": 1}',
            "--afd-config",
            "digits",
            id="huge-integer",
        ),
        pytest.param(
            '{"group": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "--afd-config",
            "recursion",
            id="deep-nesting",
        ),
        pytest.param(
            config_text(group="g" * MAX_CONFIG_BYTES), "--afd-config", "bytes", id="over-size"
        ),
        pytest.param("[1, 2]", "--afd-config", "[1, 2]", id="array-is-not-a-path"),
    ],
)
def test_from_json_rejects_bad_document(text: str, argument: str, shown: str) -> None:
    rejected(lambda: AFDConfig.from_json(text), argument, shown)


@pytest.mark.parametrize(
    ("content", "shown"),
    [
        pytest.param(b"[1, 2]", "list", id="array"),
        pytest.param(b"null", "NoneType", id="null"),
        pytest.param(b'"{}"', "str", id="string"),
        pytest.param(b"42", "int", id="number"),
        pytest.param(b'{"group": "\xff\xfe"}', "codec", id="not-utf8"),
        pytest.param(b" " * (MAX_CONFIG_BYTES + 1), f"{MAX_CONFIG_BYTES + 1}", id="over-size"),
    ],
)
def test_from_json_rejects_bad_file(tmp_path: Path, content: bytes, shown: str) -> None:
    path = tmp_path / "afd.json"
    path.write_bytes(content)
    rejected(lambda: AFDConfig.from_json(str(path)), "--afd-config", shown)


def test_from_json_rejects_unreadable_paths(tmp_path: Path) -> None:
    rejected(lambda: AFDConfig.from_json(str(tmp_path / "missing.json")), "--afd-config", "No such")
    rejected(lambda: AFDConfig.from_json(str(tmp_path)), "--afd-config", "directory")
    rejected(lambda: AFDConfig.from_json(123), "--afd-config", "123")  # type: ignore[arg-type]


def test_from_dict_rejects_non_objects() -> None:
    for value in (None, [BASE], "{}", 1):
        rejected(lambda v=value: AFDConfig.from_dict(v), "--afd-config", type(value).__name__)


# == WindowLayout ===========================================================================
def test_check_hccl_buffsize() -> None:
    big = WindowLayout(64, 8, 512, 8, 1, 7168, torch.bfloat16)
    need = (big.ffn_info_bytes + big.ffn_data_bytes) // 2**20 + 1
    assert big.hccl_buffsize_mb == need > 200
    err = rejected(big.check_hccl_buffsize, "HCCL_BUFFSIZE", "200")
    assert f">= {need} MB" in err.allowed
    rejected(lambda: big.check_hccl_buffsize(need - 1), "HCCL_BUFFSIZE", f"{need - 1}")
    big.check_hccl_buffsize(need)  # the exact bound is accepted
    WindowLayout(2, 2, 4, 2, 1, 64).check_hccl_buffsize()


@pytest.mark.parametrize(
    ("fields", "argument", "shown"),
    [
        pytest.param({"num_attention_ranks": 0}, "num_attention_ranks (A)", "0", id="A=0"),
        pytest.param({"micro_batches": 0}, "micro_batches (M)", "0", id="M=0"),
        pytest.param({"tokens": 0}, "tokens (BS)", "0", id="BS=0"),
        pytest.param({"tokens": 513}, "tokens (BS)", "513", id="BS=513"),
        pytest.param({"topk": 0}, "topk (K)", "0", id="K=0"),
        pytest.param({"topk": 17}, "topk (K)", "17", id="K=17"),
        pytest.param({"shared": -1}, "shared (S)", "-1", id="S<0"),
        pytest.param({"shared": 5}, "shared (S)", "5", id="S=5"),
        pytest.param({"hidden": 0}, "hidden (H)", "0", id="H=0"),
        pytest.param({"hidden": 48, "quant": True}, "hidden (H)", "48", id="quant-H%32"),
        pytest.param({"dtype": torch.int8}, "dtype", "torch.int8", id="dtype"),
    ],
)
def test_window_layout_rejects(fields: dict[str, Any], argument: str, shown: str) -> None:
    args: dict[str, Any] = {
        "num_attention_ranks": 2,
        "micro_batches": 2,
        "tokens": 4,
        "topk": 2,
        "shared": 1,
        "hidden": 64,
    }
    WindowLayout(**args)
    rejected(lambda: WindowLayout(**{**args, **fields}), argument, shown)


def test_window_views_reject_a_short_window() -> None:
    lay = WindowLayout(2, 2, 4, 2, 1, 64)
    short = torch.zeros(lay.ffn_window_bytes - 1, dtype=torch.uint8)
    rejected(lambda: lay.ffn_views(short), "FFN window bytes", f"{lay.ffn_window_bytes - 1}")
    short = torch.zeros(lay.attn_window_bytes - 1, dtype=torch.uint8)
    rejected(
        lambda: lay.attn_views(short), "attention window bytes", f"{lay.attn_window_bytes - 1}"
    )


# == validate_expert_rank_table ==============================================================
TOPOLOGY = RankTopology(2, 3, ffn_start_rank_id=1)  # FFN ranks 1, 2, 3; attention 0 and 4
ROUTED = 4


def good_table() -> torch.Tensor:
    table = build_expert_rank_table(TOPOLOGY, ROUTED, num_shared=2, replicas=2)
    assert validate_expert_rank_table(table, TOPOLOGY, ROUTED) == 2
    return table


def _set(g: int, col: int, value: int) -> Any:
    def edit(t: torch.Tensor) -> torch.Tensor:
        t[0, g, col] = value
        return t

    return edit


@pytest.mark.parametrize(
    ("edit", "argument", "shown"),
    [
        pytest.param(lambda t: t.tolist(), "expert_rank_table", "list", id="list"),
        pytest.param(lambda t: t.float(), "expert_rank_table.dtype", "float32", id="float"),
        pytest.param(lambda t: t[0, 0], "expert_rank_table.dim()", "1", id="1d"),
        pytest.param(lambda t: t.repeat(3, 1, 1), "shape[0] (L)", "3", id="L=3"),
        pytest.param(lambda t: t[:, :3], "expert_rank_table.shape[1]", "3", id="rows<routed"),
        pytest.param(
            lambda t: torch.cat([t, t[:, -1:].repeat(1, 3, 1)], 1),
            "expert_rank_table.shape[1]",
            f"{ROUTED + 5}",
            id="S=5",
        ),
        pytest.param(lambda t: t[..., :2], "expert_rank_table.shape[2]", "2", id="width-2"),
        pytest.param(lambda t: t[..., :0], "expert_rank_table.shape[2]", "0", id="width-0"),
        pytest.param(_set(0, 0, 0), "[0, 0, 0] (count)", "0", id="count-0"),
        pytest.param(_set(5, 0, 3), "[0, 5, 0] (count)", "3", id="count>R"),
        pytest.param(_set(1, 1, 0), "[0, 1, 1] (rank)", "0", id="rank-attention-below"),
        pytest.param(_set(1, 3, 4), "[0, 1, 3] (rank)", "4", id="rank-attention-above"),
        pytest.param(_set(2, 1, 5), "[0, 2, 1] (rank)", "5", id="rank-beyond-world"),
        pytest.param(_set(3, 2, 10**6), "[0, 3, 2] (local id)", "1000000", id="local-1e6"),
        pytest.param(_set(3, 4, -1), "[0, 3, 4] (local id)", "-1", id="local-neg"),
    ],
)
def test_validate_expert_rank_table_rejects(edit: Any, argument: str, shown: str) -> None:
    table = edit(good_table().clone())
    rejected(lambda: validate_expert_rank_table(table, TOPOLOGY, ROUTED), argument, shown)


def test_validate_expert_rank_table_rejects_duplicate_local_ids() -> None:
    table = good_table()
    # expert 3's first replica placed where expert 0's first replica already is
    table[0, 3, 1:3] = table[0, 0, 1:3]
    rank, local = (int(v) for v in table[0, 0, 1:3])
    err = rejected(
        lambda: validate_expert_rank_table(table, TOPOLOGY, ROUTED),
        "expert_rank_table",
        f"rank {rank} local {local} names experts 0 and 3",
    )
    assert err.allowed == "local ids unique per rank"


def test_validate_expert_rank_table_accepts_what_it_should() -> None:
    table = good_table()
    table[0, 4:, 3:] = -99  # tail entries past the count are ignored
    table[0, 4, 0] = 1
    table[0, 5, 0] = 1
    table[0, 0, 2] = 999_999  # the largest local id that is not "empty"
    assert validate_expert_rank_table(table, TOPOLOGY, ROUTED) == 2
    # the same local id on two different ranks is two different experts
    same = torch.tensor([[[1, 1, 0], [1, 2, 0]]], dtype=torch.int32)
    assert validate_expert_rank_table(same, TOPOLOGY, 2) == 0


def test_validate_expert_rank_table_names_the_argument_it_is_given() -> None:
    table = good_table().long()
    rejected(
        lambda: validate_expert_rank_table(table, TOPOLOGY, ROUTED, argument="--table"),
        "--table.dtype",
        "int64",
    )


# == deprecated keys ========================================================================
def test_old_key_names_are_read_with_a_warning_and_refused_beside_the_new() -> None:
    with pytest.warns(FutureWarning) as warned:
        old = AFDConfig.from_json('{"num_attention_workers": 2, "num_ffn_workers": 3}')
    assert old == AFDConfig(num_attention_ranks=2, num_ffn_ranks=3)
    said = sorted(str(w.message) for w in warned)
    assert said == [
        "--afd-config key 'num_attention_workers' is deprecated: it is 'num_attention_ranks' now",
        "--afd-config key 'num_ffn_workers' is deprecated: it is 'num_ffn_ranks' now",
    ]
    both = {**BASE, "num_ffn_workers": 2}
    err = rejected(lambda: AFDConfig.from_dict(both), "num_ffn_workers", "2")
    assert "'num_ffn_ranks'" in err.allowed


def test_role_is_dropped_with_a_warning_and_only_attention_is_taken() -> None:
    with pytest.warns(FutureWarning, match="'role' is deprecated and ignored"):
        config = AFDConfig.from_dict({**BASE, "role": "attention"})
    assert config == AFDConfig.from_dict(BASE) and "role" not in config.to_dict()
    rejected(lambda: AFDConfig.from_dict({**BASE, "role": "ffn"}), "role", "ffn")


def test_transport_moved_to_the_reference_section_with_a_warning() -> None:
    with pytest.warns(
        FutureWarning, match="'transport' is deprecated: it is 'reference.transport'"
    ):
        moved = AFDConfig.from_dict({**BASE, "transport": "inproc"})
    assert moved == AFDConfig.from_dict({**BASE, "reference": {"transport": "inproc"}})
    assert moved.reference.transport == "inproc" and "transport" not in moved.to_dict()
    both = {**BASE, "transport": "shm", "reference": {"transport": "shm"}}
    rejected(lambda: AFDConfig.from_dict(both), "transport", "shm")
    # "hccl" named the NPU link's windows, its only ones: dropped there, refused here
    with pytest.warns(FutureWarning):
        rejected(lambda: AFDConfig.from_dict({**BASE, "transport": "hccl"}), "transport", "hccl")


@pytest.mark.parametrize(
    ("section", "argument", "shown"),
    [
        ({"transport": "rdma"}, "reference.transport", "rdma"),
        ({"transport": "hccl"}, "reference.transport", "hccl"),
        ({"transport": 1}, "reference.transport", "1"),
        ({"transports": "shm"}, "reference", "transports"),
        ({"self": "shm"}, "reference", "self"),  # a keyword of the constructor itself
        ("shm", "reference", "shm"),
        ([["transport", "shm"]], "reference", "transport"),
    ],
)
def test_the_reference_section_names_its_keys_by_their_path(
    section: Any, argument: str, shown: str
) -> None:
    err = rejected(lambda: AFDConfig.from_dict({**BASE, "reference": section}), argument, shown)
    assert err.argument == argument
    default = AFDConfig.from_dict({**BASE, "reference": {}})
    assert default.reference.transport == "auto"
    assert AFDConfig.from_json(default.to_json()) == default


def test_a_bad_shared_rank_is_named_before_the_replicas_it_limits() -> None:
    """The replica bound depends on the shared ranks: their own error comes first."""
    bad = {**BASE, "shared_expert_ranks": [5], "expert_replicas": 2}
    rejected(lambda: AFDConfig.from_dict(bad), "shared_expert_ranks", "[5]")
    twice = {**BASE, "num_ffn_ranks": 3, "shared_expert_ranks": [0, 0], "expert_replicas": 3}
    rejected(lambda: AFDConfig.from_dict(twice), "shared_expert_ranks", "[0, 0]")


def test_positional_and_repeated_arguments_are_named() -> None:
    rejected(lambda: AFDConfig(0, 2), "num_attention_ranks", "0")  # type: ignore[misc]
    rejected(lambda: AFDConfig(1, 2, num_ffn_ranks=3), "num_ffn_ranks", "3")  # type: ignore[misc]
