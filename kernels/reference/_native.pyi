"""Types of the C extension built from _native.c (see rows.py): every argument is an
integer, an address (`Tensor.data_ptr()`), a count, a stride in bytes or a dtype code."""

ABI: int

def move_rows(
    dst: int,
    dst_stride: int,
    dst_rows: int,
    dst_index: int,
    src: int,
    src_stride: int,
    src_rows: int,
    src_index: int,
    n: int,
    row_bytes: int,
    /,
) -> int:
    """Move whole rows by index (see the C source)."""

def weighted_sum(
    d_addr: int,
    w_addr: int,
    y_addr: int,
    tokens: int,
    slots: int,
    topk: int,
    hidden: int,
    dtype: int,
    /,
) -> bool:
    """The combine's weighted sum."""

def quantize_rows(
    x_addr: int, n: int, hidden: int, dtype: int, out_addr: int, out_stride: int, out_len: int, /
) -> bool:
    """Per-row dynamic int8 quantization."""

def a2f_scatter(
    src: int,
    src_stride: int,
    per_slot: int,
    n: int,
    topk: int,
    slots: int,
    ids: int,
    ids_elem: int,
    first_shared: int,
    table: int,
    table_rows: int,
    table_cols: int,
    session: int,
    ffn_start: int,
    ffn_ranks: int,
    data_rows: int,
    info_rows: int,
    slot_stride: int,
    row_bytes: int,
    touched: int,
    /,
) -> int:
    """npu_attention_to_ffn's row and id writes."""

def f2a_scatter(
    x: int,
    row_bytes: int,
    n: int,
    sessions: int,
    mbs: int,
    toks: int,
    offs: int,
    session_index: int,
    sessions_num: int,
    data_rows: int,
    info_rows: int,
    micro_batch_num: int,
    bs: int,
    slots: int,
    touched: int,
    /,
) -> int:
    """npu_ffn_to_attention's row and flag writes."""

def gather_batch(
    info: int,
    sessions_num: int,
    width: int,
    slots_offset: int,
    bs: int,
    slots: int,
    micro_batch: int,
    micro_batch_num: int,
    expert_num: int,
    threshold: int,
    data: int,
    token_size: int,
    value_bytes: int,
    y: int,
    o_se: int,
    o_mb: int,
    o_tk: int,
    o_sl: int,
    o_rows: int,
    group_list: int,
    scales: int,
    /,
) -> int:
    """npu_ffn_worker_batching's sort and gather."""
