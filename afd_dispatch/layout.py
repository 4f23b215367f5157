"""The byte layout of every AFD window: the one place that knows where a byte goes.

Both backends, the transports, the debug API and the tests ask this module for shapes and
offsets; nothing else computes them.

FFN window (written by `npu_attention_to_ffn`, read by `npu_ffn_worker_batching`)::

    byte 0                      info  int32 [A, M, 2 + BS*E]
                                      row (s, m) = [flag, layer_id, local id of (t, e) ...]
    byte align512(info bytes)   data  [A, M, BS, E] slots of attn_to_ffn_token_size bytes:
                                      H values of x.dtype, or H int8 values + float32 scale
                                      at byte H, then padding to the slot size

Attention window (written by `npu_ffn_to_attention`, read by `npu_attention_worker_combine`)::

    byte 0                      info  int32 [M, BS, E]   1 = result for (m, t, e) arrived
    byte align512(info bytes)   data  [M, BS, E, H] of the result dtype

Row strides. The FFN-window slot size is a parameter, not a function of H: A2F writes slots
`ffn_token_data_shape[4]` elements apart and batching reads them `attn_to_ffn_token_size`
bytes apart, from its schedule context (ops-transformer `ffn_wb_get_schedule_context.h`,
`ffn_wb_gather_out_all.h`). The seed's example uses H + 128 bytes for int8 rows; A3 callers
use align512(H + 4) (int8) and align512(2H) (16-bit), since torch_npu's holder refuses
token sizes that are not multiples of 512. Attention-window rows are always H values apart:
the combine kernel reads them at H * itemsize, and no kernel reads the context's
`ffn_to_attn_token_size` (ops-transformer `attention_worker_combine_split_bs.h`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from afd_dispatch.errors import check

ALIGN = 512
# The empty marker of an info entry, and the consumer's test for "empty".
EMPTY_LOCAL_ID = 2**31 - 1
EMPTY_ID_THRESHOLD = 1_000_000
QUANT_ROW_PADDING = 128  # the seed's int8 slot: H values plus 128 bytes (scale at byte H)
QUANT_SCALE_BYTES = 4  # the float32 scale stored at byte H of an int8 slot
FLAG_OFFSET, LAYER_OFFSET, SLOTS_OFFSET = 0, 1, 2  # columns of an FFN info row

MAX_TOKENS_PER_MICRO_BATCH = 512
MAX_MICRO_BATCHES = 8  # M: micro-batch slots in flight
MAX_TOPK = 16
MAX_SHARED_EXPERTS = 4
A3_HIDDEN_RANGE = (1024, 8192)
DEFAULT_HCCL_BUFFSIZE_MB = 200
# The FFN journal (reference backend): header words, per-row fields, a copy of one
# micro-batch's info rows, then each session's receipt count when the rank collected it
JOURNAL_HEADER_WORDS = 6  # state, slot, layer, count, batched count before, micro-batch
JOURNAL_ROW_FIELDS = 5  # session, micro-batch, token, slot, local expert id
JOURNAL_EMPTY, JOURNAL_BATCHED, JOURNAL_COLLECTING = 0, 1, 2

QUANT_NONE = 0
QUANT_INT8 = 2
QUANT_MODES = (QUANT_NONE, QUANT_INT8)

# token_dtype codes of batching/combine. 0..2 are torch_npu's; 3 is the reference's own
# float32 extension (A3 has no fp32 path), refused by the NPU backend.
TOKEN_DTYPE_FP16, TOKEN_DTYPE_BF16, TOKEN_DTYPE_INT8, TOKEN_DTYPE_FP32 = 0, 1, 2, 3
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 3}
TOKEN_DTYPES = tuple(_DTYPE_CODES)


def align512(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def _int32_table_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of an int32 table of `shape` (a window's info area)."""
    return math.prod(shape) * 4


def token_dtype_code(dtype: torch.dtype) -> int:
    check(dtype in _DTYPE_CODES, "dtype", "one of float16, bfloat16, float32", dtype)
    return _DTYPE_CODES[dtype]


def dtype_of_code(code: int) -> torch.dtype:
    for dtype, c in _DTYPE_CODES.items():
        if c == code:
            return dtype
    raise ValueError(f"token_dtype: expected one of {sorted(_DTYPE_CODES.values())}, got {code}")


def a3_attn_to_ffn_token_size(hidden: int, dtype: torch.dtype, quant: bool) -> int:
    """The FFN-window slot size A3 callers use: align512(H + 4) bytes for int8 rows,
    align512(H * itemsize) otherwise (torch_npu's batching test and A3 model scripts)."""
    payload = hidden + QUANT_SCALE_BYTES if quant else hidden * dtype.itemsize
    return align512(payload)


@dataclass(frozen=True)
class WindowLayout:
    """Shapes and byte offsets of the FFN and attention windows of one window group.

    num_attention_ranks A (the ops' session_num), micro_batches M, tokens BS (per
    micro-batch and attention rank), topk K, shared S, hidden H, dtype of the activations,
    quant (int8 A2F rows), and
    attn_to_ffn_token_size: bytes of one FFN-window slot (0: the seed's H + 128 for int8
    rows, H * itemsize otherwise; `a3_attn_to_ffn_token_size` gives A3 callers' size).
    It must hold the row (H * itemsize, or H + 4 with int8) and a whole number of elements.
    """

    num_attention_ranks: int
    micro_batches: int
    tokens: int
    topk: int
    shared: int
    hidden: int
    dtype: torch.dtype = torch.bfloat16
    quant: bool = False
    attn_to_ffn_token_size: int = 0

    def __post_init__(self) -> None:
        check(
            self.num_attention_ranks >= 1,
            "num_attention_ranks (A)",
            ">= 1",
            self.num_attention_ranks,
        )
        check(self.micro_batches >= 1, "micro_batches (M)", ">= 1", self.micro_batches)
        check(
            0 < self.tokens <= MAX_TOKENS_PER_MICRO_BATCH,
            "tokens (BS)",
            f"0 < BS <= {MAX_TOKENS_PER_MICRO_BATCH}",
            self.tokens,
        )
        check(0 < self.topk <= MAX_TOPK, "topk (K)", f"0 < K <= {MAX_TOPK}", self.topk)
        check(
            0 <= self.shared <= MAX_SHARED_EXPERTS,
            "shared (S)",
            f"0 <= S <= {MAX_SHARED_EXPERTS}",
            self.shared,
        )
        check(self.hidden >= 1, "hidden (H)", ">= 1", self.hidden)
        if self.quant:
            check(self.hidden % 32 == 0, "hidden (H)", "a multiple of 32 with quant", self.hidden)
        token_dtype_code(self.dtype)
        if self.attn_to_ffn_token_size == 0:
            default = (
                self.hidden + QUANT_ROW_PADDING if self.quant else self.hidden * self.dtype.itemsize
            )
            object.__setattr__(self, "attn_to_ffn_token_size", default)
        size, elem = self.attn_to_ffn_token_size, self.a2f_elem_size
        check(
            size >= self.row_payload_bytes and size % elem == 0,
            "attn_to_ffn_token_size (HS bytes)",
            f">= {self.row_payload_bytes} bytes (the row{' and its scale' if self.quant else ''})"
            f" and a multiple of {elem}",
            size,
        )

    # -- derived sizes -------------------------------------------------------------------
    @property
    def slots(self) -> int:
        """E: slots per token, K routed then S shared."""
        return self.topk + self.shared

    @property
    def row_elems(self) -> int:
        """HS: elements of one FFN-window slot (`ffn_token_data_shape[4]`)."""
        return self.attn_to_ffn_token_size // self.a2f_elem_size

    @property
    def row_payload_bytes(self) -> int:
        """Bytes of a slot that carry data: H values, or H int8 values and the scale."""
        return self.hidden + QUANT_SCALE_BYTES if self.quant else self.hidden * self.dtype.itemsize

    @property
    def a2f_elem_size(self) -> int:
        return 1 if self.quant else self.dtype.itemsize

    @property
    def a2f_dtype(self) -> torch.dtype:
        return torch.int8 if self.quant else self.dtype

    @property
    def ffn_to_attn_token_size(self) -> int:
        """Bytes of one attention-window row: H values (the combine kernel's stride)."""
        return self.hidden * self.dtype.itemsize

    # -- FFN window ------------------------------------------------------------------------
    @property
    def ffn_info_shape(self) -> tuple[int, int, int]:
        return (
            self.num_attention_ranks,
            self.micro_batches,
            SLOTS_OFFSET + self.tokens * self.slots,
        )

    @property
    def ffn_data_shape(self) -> tuple[int, int, int, int, int]:
        return (
            self.num_attention_ranks,
            self.micro_batches,
            self.tokens,
            self.slots,
            self.row_elems,
        )

    @property
    def ffn_info_bytes(self) -> int:
        return _int32_table_bytes(self.ffn_info_shape)

    @property
    def ffn_data_offset(self) -> int:
        return align512(self.ffn_info_bytes)

    @property
    def ffn_data_bytes(self) -> int:
        a, m, bs, e, _ = self.ffn_data_shape
        return a * m * bs * e * self.attn_to_ffn_token_size

    # -- FFN journal (reference backend only: crash recovery, nothing of A3's) -------------
    @property
    def ffn_journal_bytes(self) -> int:
        """An FFN rank's journal: int32 header [state, slot, layer, count, batched count
        before, micro-batch]; [5, A*BS*E] per-row (session, micro-batch, token, slot, local
        expert id) of the batch it collected and has not given back; a copy of the info
        rows [A, 2 + BS*E] of the micro-batch it is collecting; [A] each session's receipt
        count of that micro-batch (`attn_receipts_bytes`) when it was collected."""
        rows = self.num_attention_ranks * self.tokens * self.slots
        return 4 * (
            JOURNAL_HEADER_WORDS
            + JOURNAL_ROW_FIELDS * rows
            + self.ffn_info_shape[0] * self.ffn_info_shape[2]
            + self.num_attention_ranks
        )

    def ffn_journal_views(
        self, storage: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(header int32 [6], rows int32 [5, A*BS*E], info copy int32 [A, 2 + BS*E],
        receipts int32 [A]) over an FFN rank's journal storage."""
        check(
            storage.dtype == torch.uint8 and storage.numel() == self.ffn_journal_bytes,
            "journal storage",
            f"{self.ffn_journal_bytes} uint8 bytes",
            (storage.dtype, storage.numel()),
        )
        words = storage.view(torch.int32)
        a, _, width = self.ffn_info_shape
        n = JOURNAL_ROW_FIELDS * self.num_attention_ranks * self.tokens * self.slots
        header = words[:JOURNAL_HEADER_WORDS]
        rows = words[JOURNAL_HEADER_WORDS : JOURNAL_HEADER_WORDS + n].view(JOURNAL_ROW_FIELDS, -1)
        info_end = JOURNAL_HEADER_WORDS + n + a * width
        info = words[JOURNAL_HEADER_WORDS + n : info_end].view(a, width)
        return header, rows, info, words[info_end:]

    @property
    def attn_receipts_bytes(self) -> int:
        """An attention rank's receipts (reference backend: crash recovery, nothing of
        A3's): int32 [M], per micro-batch the number of results it began to combine. The
        rank counts one before combine clears the result flags, so an FFN rank's successor
        can tell a result that was delivered and consumed from one never delivered (both
        leave the flags 0)."""
        return 4 * self.micro_batches

    @property
    def ffn_scheduler_buffer_bytes(self) -> tuple[int, int, int, int]:
        """Bytes of the FFN scheduler's outputs (layer ids, session ids, micro-batch ids:
        int32 [A] each; expert ids: int32 [A, BS, E]), as torch_npu's holder sizes them."""
        a = self.num_attention_ranks
        return 4 * a, 4 * a, 4 * a, 4 * a * self.tokens * self.slots

    @property
    def ffn_window_bytes(self) -> int:
        return self.ffn_data_offset + self.ffn_data_bytes

    # -- attention window ------------------------------------------------------------------
    @property
    def attn_info_shape(self) -> tuple[int, int, int]:
        return (self.micro_batches, self.tokens, self.slots)

    @property
    def attn_data_shape(self) -> tuple[int, int, int, int]:
        return (self.micro_batches, self.tokens, self.slots, self.hidden)

    @property
    def attn_info_bytes(self) -> int:
        return _int32_table_bytes(self.attn_info_shape)

    @property
    def attn_data_offset(self) -> int:
        return align512(self.attn_info_bytes)

    @property
    def attn_window_bytes(self) -> int:
        m, bs, e, h = self.attn_data_shape
        return self.attn_data_offset + m * bs * e * h * self.dtype.itemsize

    # -- the A3 host check -----------------------------------------------------------------
    @property
    def hccl_buffsize_mb(self) -> int:
        """The smallest `HCCL_BUFFSIZE` (MB) the A3 host check accepts for this layout."""
        return (self.ffn_info_bytes + self.ffn_data_bytes) // 2**20 + 1

    def check_hccl_buffsize(self, buffsize_mb: int = DEFAULT_HCCL_BUFFSIZE_MB) -> None:
        check(
            self.hccl_buffsize_mb <= buffsize_mb,
            "HCCL_BUFFSIZE",
            f">= {self.hccl_buffsize_mb} MB for A={self.num_attention_ranks} "
            f"M={self.micro_batches} "
            f"BS={self.tokens} E={self.slots} HS={self.row_elems}",
            buffsize_mb,
        )

    # -- op argument shapes (what callers pass as int[] arguments) -------------------------
    @property
    def op_shapes(self) -> dict[str, list[int]]:
        return {
            "ffn_token_info_table_shape": list(self.ffn_info_shape),
            "ffn_token_data_shape": list(self.ffn_data_shape),
            "attn_token_info_table_shape": list(self.attn_info_shape),
            "token_info_table_shape": list(self.attn_info_shape),
            "token_data_shape": list(self.attn_data_shape),
        }

    # -- typed views over a window's bytes -------------------------------------------------
    def ffn_views(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(info int32 [A, M, 2+BS*E], data [A, M, BS, E, HS]) over an FFN window."""
        _check_window(window, self.ffn_window_bytes, "FFN")
        info = window[: self.ffn_info_bytes].view(torch.int32).view(self.ffn_info_shape)
        data = window[self.ffn_data_offset : self.ffn_window_bytes]
        return info, data.view(self.a2f_dtype).view(self.ffn_data_shape)

    def attn_views(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(info int32 [M, BS, E], data [M, BS, E, H]) over an attention window."""
        _check_window(window, self.attn_window_bytes, "attention")
        info = window[: self.attn_info_bytes].view(torch.int32).view(self.attn_info_shape)
        data = window[self.attn_data_offset : self.attn_window_bytes]
        return info, data.view(self.dtype).view(self.attn_data_shape)

    def initialize_ffn(self, window: torch.Tensor) -> None:
        """The state a fresh FFN window starts in: flags 0, every slot empty."""
        info, _ = self.ffn_views(window)
        info.fill_(EMPTY_LOCAL_ID)
        info[:, :, FLAG_OFFSET] = 0
        info[:, :, LAYER_OFFSET] = 0

    def initialize_attn(self, window: torch.Tensor) -> None:
        info, _ = self.attn_views(window)
        info.zero_()


def _check_window(window: torch.Tensor, needed: int, role: str) -> None:
    if window.dtype != torch.uint8 or window.dim() != 1:
        raise TypeError(
            f"{role} window must be a 1-D uint8 tensor, got {window.dtype} {window.dim()}-D"
        )
    check(window.numel() >= needed, f"{role} window bytes", f">= {needed}", window.numel())


# -- The health board: how every rank of a deployment is doing (both backends) ---------------
# Rows of HEALTH_ROW_WORDS int64 words, then a UTF-8 message of at most HEALTH_MESSAGE_BYTES
# (its length in word HEALTH_MESSAGE_LENGTH). Each row has one writer: F state rows (the
# FFN pool's supervisor), F event rows (each FFN rank: refused micro-batches, link
# failures), A attention rows (each session).
HEALTH_ROW_WORDS = 16
HEALTH_MESSAGE_BYTES = 384
HEALTH_ROW_BYTES = 8 * HEALTH_ROW_WORDS + HEALTH_MESSAGE_BYTES
HEALTH_MESSAGE_LENGTH = HEALTH_ROW_WORDS - 1
# an FFN state row: state, restarts, when it was entered / last answered (Unix ms)
STATE_WORD, RESTARTS_WORD, SINCE_MS_WORD, ANSWERED_MS_WORD = 0, 1, 2, 3
# an FFN event row: the last refusal's layer, slot and time, link failures, then one
# refusal count per micro-batch slot (REFUSALS_WORD + slot)
REFUSED_LAYER_WORD, REFUSED_SLOT_WORD, EVENT_MS_WORD, LINK_FAILURES_WORD = 0, 1, 2, 3
REFUSALS_WORD = 4
# an attention row: AFD errors so far, time of the last, and whether it stopped exchanging
ERRORS_WORD, ERROR_MS_WORD, BROKEN_WORD = 0, 1, 2


def health_board_bytes(num_ffn_ranks: int, num_attention_ranks: int) -> int:
    """Bytes of the health board of a deployment with F FFN ranks and A attention ranks."""
    return HEALTH_ROW_BYTES * (2 * num_ffn_ranks + num_attention_ranks)


def health_board_views(
    storage: torch.Tensor, num_ffn_ranks: int, num_attention_ranks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(words int64 [2F + A, HEALTH_ROW_WORDS], messages uint8 [2F + A, HEALTH_MESSAGE_BYTES])
    over the board's storage: rows [0, F) FFN states, [F, 2F) FFN events, [2F, 2F + A)
    attention ranks."""
    needed = health_board_bytes(num_ffn_ranks, num_attention_ranks)
    check(
        storage.dtype == torch.uint8 and storage.numel() == needed,
        "health board storage",
        f"{needed} uint8 bytes",
        (storage.dtype, storage.numel()),
    )
    rows = storage.view(2 * num_ffn_ranks + num_attention_ranks, HEALTH_ROW_BYTES)
    words = rows[:, : 8 * HEALTH_ROW_WORDS].view(torch.int64)
    return words, rows[:, 8 * HEALTH_ROW_WORDS :]
