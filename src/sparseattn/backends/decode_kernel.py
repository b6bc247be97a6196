"""A Triton decode kernel: a few new queries over a long KV cache, reading only the key/value tiles the plan keeps.

Decoding is memory-bound: each step reads the cache once. Masked dense attention reads all of it; this kernel reads
the tiles of ``block_n`` keys that hold at least one kept key for the step's queries, split over the kept tiles
as flash decoding does (each program reduces a share of the list; a second pass merges the shares' softmax
statistics), so a short list still fills the GPU.

What it takes (``decode_attention``):
- q (B, H, Lq, D): the new tokens' queries (Lq small: one token, or a few of speculative decoding);
- k, v (B, H_kv, Lk, D): the cache (grouped-query heads: query head h reads key head h // (H / H_kv));
- keep (B, 1 or H, Lq, Lk) bool: the plan's rows for these queries (``LayerPlan.mask_rows``, O(Lq x Lk) to
  compute: a bit per key against the 2 x D x 2 bytes of its key and value).

The tile lists are made on the device from ``keep`` with fixed shapes (a sort of the tiles' flags, a count per
(example, key head)), and each program finds its share from the count in memory, so a step reads nothing back
and captures in a CUDA graph (transformers' static cache under ``torch.compile(mode="reduce-overhead")``).
Registered as the operator ``sparseattn::decode_attention``. Forward only: generation needs no gradient.
"""

from __future__ import annotations

import torch

from . import triton_kernel
from .triton_kernel import _pad_head, _padded_head, interpreted
from .triton_launch import on_device_of_first_input

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is missing
    triton = None

# Rows of one program: the query heads sharing a key head, times the step's queries (tl.dot takes >= 16 rows).
MAX_ROWS = 128
BLOCK_N = 64  # keys per tile: the kernel's granule of what is read


def available() -> bool:
    return triton is not None


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether a call of these shapes runs here: few enough query rows per key head."""
    return available() and (q.shape[1] // k.shape[1]) * q.shape[2] <= MAX_ROWS


def tile_lists(keep: torch.Tensor, num_kv_heads: int, block_n: int = BLOCK_N) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles (B, H_kv, NT) int32, count (B, H_kv) int32): per example and key head, the tiles of ``block_n`` keys
    holding a key kept by any of its query heads and queries, first and in ascending order (the rest of the row
    is unused). Fixed shapes, no read back: capture-safe."""
    B, Hm, Lq, Lk = keep.shape
    nt = -(-Lk // block_n)
    flags = torch.nn.functional.pad(keep, (0, nt * block_n - Lk)).view(B, Hm, Lq, nt, block_n).any(-1).any(2)
    if Hm == 1:
        flags = flags.expand(B, num_kv_heads, nt)
    else:
        flags = flags.view(B, num_kv_heads, Hm // num_kv_heads, nt).any(2)
    order = torch.sort((~flags).to(torch.int8), dim=-1, stable=True).indices  # kept tiles first, ascending
    return order.to(torch.int32).contiguous(), flags.sum(-1, dtype=torch.int32).contiguous()


def compiled_variants(device: torch.device) -> int:
    """How many variants of the decode kernels Triton has compiled so far in this process on ``device`` (0 off
    CUDA): a count that grows while decoding means compilation in the middle of it."""
    if device.type != "cuda" or not available() or interpreted():
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return sum(len(k.device_caches[index][0]) for k in (_decode_split, _merge_splits) if index in k.device_caches)


def num_splits(batch: int, kv_heads: int, tiles: int, device) -> int:
    """How many programs share one (example, key head)'s list: enough programs for the GPU's multiprocessors
    (twice over), at least 2 tiles each. Fixed by the shapes alone, so a captured step keeps it."""
    if device.type != "cuda":
        return max(1, min(4, tiles // 2))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-2 * sms // max(1, batch * kv_heads)), tiles // 2, 64))


if triton is not None:
    # Triton compiles a variant per value class of each integer argument (== 1, divisible by 16). The key length,
    # the keep-mask's strides (Lk), the tile lists' (their length) and, at short lengths, the split count change as
    # the cache grows, so a decoding run crossed into a new variant every few steps and compiled it in the middle
    # of decoding: one compile in 32 steps doubled the fourteenth round's time per step. Left unspecialized they
    # keep one variant for every length; the cache's strides stay specialized (multiples of the padded head size,
    # so their class is fixed)
    @triton.jit(do_not_specialize=["smb", "smh", "smq", "stb", "sth", "LK", "SPLITS"])
    def _decode_split(Q, K, V, KEEP, TILES, COUNT, O_PART, M_PART, L_PART,
                      sqb, sqh, sqq, skb, skh, skn, svb, svh, svn, smb, smh, smq,
                      stb, sth, scb, sob, soh, sos, sor, smpb, smph, smps,
                      scale, H_KV, LQ, LK, SPLITS,
                      G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                      MASK_PER_HEAD: tl.constexpr, IEEE: tl.constexpr):
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H_KV
        hk = pid_bh % H_KV
        r = tl.arange(0, R)
        head = hk * G + r // LQ
        qi = r % LQ
        row_ok = r < G * LQ
        d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + head[:, None] * sqh + qi[:, None] * sqq + d[None, :], mask=row_ok[:, None],
                    other=0.0)
        count = tl.load(COUNT + b * scb + hk)
        share = (count + SPLITS - 1) // SPLITS
        first = split * share
        last = tl.minimum(first + share, count)
        m = tl.full([R], float("-inf"), tl.float32)
        lsum = tl.zeros([R], tl.float32)
        acc = tl.zeros([R, D], tl.float32)
        mhead = head if MASK_PER_HEAD else head * 0
        for i in range(first, last):
            t = tl.load(TILES + b * stb + hk * sth + i)
            n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < LK
            k = tl.load(K + b * skb + hk * skh + n[:, None] * skn + d[None, :], mask=n_ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            keep = tl.load(KEEP + b * smb + mhead[:, None] * smh + qi[:, None] * smq + n[None, :],
                           mask=row_ok[:, None] & n_ok[None, :], other=0)
            s = tl.where(keep != 0, s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            # rows that kept nothing yet stay at -inf: shift by 0 there, so exp gives 0, never NaN
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - shift)
            p = tl.exp(s - shift[:, None])
            lsum = lsum * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + hk * svh + n[:, None] * svn + d[None, :], mask=n_ok[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        tl.store(O_PART + b * sob + hk * soh + split * sos + r[:, None] * sor + d[None, :], acc)
        tl.store(M_PART + b * smpb + hk * smph + split * smps + r, m)
        tl.store(L_PART + b * smpb + hk * smph + split * smps + r, lsum)

    @triton.jit(do_not_specialize=["SPLITS"])  # as _decode_split's
    def _merge_splits(O_PART, M_PART, L_PART, OUT, sob, soh, sos, sor, smpb, smph, smps,
                      sxb, sxh, sxq, H_KV, LQ, ROWS, SPLITS,
                      G: tl.constexpr, BLOCK_R: tl.constexpr, D: tl.constexpr, D_OUT: tl.constexpr):
        # _merge's computation in one launch (it is ten small ones per layer and step): the splits' partial outputs
        # weighed by exp(their max - the overall max), rows that kept nothing anywhere giving zeros
        pid_bh = tl.program_id(0)
        b = pid_bh // H_KV
        hk = pid_bh % H_KV
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, D)
        row_ok = r < ROWS
        stats = b * smpb + hk * smph + r
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for split in range(0, SPLITS):
            m = tl.maximum(m, tl.load(M_PART + stats + split * smps, mask=row_ok, other=float("-inf")))
        shift = tl.where(m == float("-inf"), 0.0, m)
        num = tl.zeros([BLOCK_R, D], tl.float32)
        den = tl.zeros([BLOCK_R], tl.float32)
        for split in range(0, SPLITS):
            w = tl.exp(tl.load(M_PART + stats + split * smps, mask=row_ok, other=float("-inf")) - shift)
            den += w * tl.load(L_PART + stats + split * smps, mask=row_ok, other=0.0)
            part = tl.load(O_PART + b * sob + hk * soh + split * sos + r[:, None] * sor + d[None, :],
                           mask=row_ok[:, None], other=0.0)
            num += w[:, None] * part
        out = num / tl.where(den > 0, den, 1.0)[:, None]
        head = hk * G + r // LQ
        qi = r % LQ
        tl.store(OUT + b * sxb + head[:, None] * sxh + qi[:, None] * sxq + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & (d[None, :] < D_OUT))


@on_device_of_first_input
def _decode(q, k, v, keep, tiles, count, scale: float) -> torch.Tensor:
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    rows = G * Lq
    R = max(16, 1 << (rows - 1).bit_length())
    Dp = _padded_head(D)
    qp, kp, vp = (_pad_head(t, Dp).contiguous() for t in (q, k, v))
    keep = keep.contiguous()
    keep = keep.view(torch.int8) if keep.dtype == torch.bool else keep  # bytes read in place: no copy per layer
    S = num_splits(B, Hkv, tiles.shape[-1], q.device)
    o_part = torch.empty(B, Hkv, S, R, Dp, dtype=torch.float32, device=q.device)
    m_part = torch.empty(B, Hkv, S, R, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    if interpreted():
        triton_kernel._mend_interpreter()  # loop bounds read from memory (see there)
    triton_kernel._launcher(_decode_split)[(B * Hkv, S)](
        qp, kp, vp, keep, tiles, count, o_part, m_part, l_part,
        qp.stride(0), qp.stride(1), qp.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
        vp.stride(0), vp.stride(1), vp.stride(2), keep.stride(0), keep.stride(1), keep.stride(2),
        tiles.stride(0), tiles.stride(1), count.stride(0), o_part.stride(0), o_part.stride(1), o_part.stride(2),
        o_part.stride(3), m_part.stride(0), m_part.stride(1), m_part.stride(2),
        scale, Hkv, Lq, Lk, S, G=G, R=R, D=Dp, BLOCK_N=BLOCK_N, MASK_PER_HEAD=keep.shape[1] > 1,
        IEEE=q.dtype == torch.float32)
    out = torch.empty(B, H, Lq, D, dtype=q.dtype, device=q.device)
    block_r = 16
    triton_kernel._launcher(_merge_splits)[(B * Hkv, -(-rows // block_r))](
        o_part, m_part, l_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        m_part.stride(0), m_part.stride(1), m_part.stride(2), out.stride(0), out.stride(1), out.stride(2),
        Hkv, Lq, rows, S, G=G, BLOCK_R=block_r, D=Dp, D_OUT=D)
    return out


def _merge(o_part, m_part, l_part, B, H, Lq, D, rows) -> torch.Tensor:
    """The second pass, readably (the kernel ``_merge_splits`` computes it in one launch, and is tested against
    this): the splits' partial outputs weighed by exp(their max - the overall max). A row that kept no key anywhere
    gives zeros."""
    m = m_part.amax(2, keepdim=True)  # (B, Hkv, 1, R)
    w = torch.exp(m_part - torch.where(torch.isinf(m), torch.zeros_like(m), m))  # 0 for splits with nothing
    num = (o_part * w[..., None]).sum(2)  # (B, Hkv, R, Dp)
    den = (l_part * w).sum(2)
    out = num / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    Hkv = o_part.shape[1]
    return out[:, :, :rows, :D].reshape(B, Hkv, H // Hkv, Lq, D).reshape(B, H, Lq, D)


@torch.library.custom_op("sparseattn::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, tiles: torch.Tensor,
                        count: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, Lq, D): softmax over the keys ``keep`` marks, reading only the tiles listed in ``tiles`` / ``count``
    (``tile_lists(keep, H_kv)``)."""
    return _decode(q, k, v, keep, tiles, count, scale)


@decode_attention_op.register_fake
def _(q, k, v, keep, tiles, count, scale):
    return q.new_empty(q.shape)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                     scale: float | None = None, lists: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of the new queries q (B, H, Lq, D) over the cache k, v (B, H_kv, Lk, D) under ``keep`` (B, 1 or H,
    Lq, Lk) bool, reading only the tiles that hold kept keys. Rows that keep nothing give zeros. H must be a
    multiple of H_kv, and (H / H_kv) x Lq at most MAX_ROWS. ``lists``: ``tile_lists(keep, H_kv)`` made already
    (layers sharing one keep-mask share them); made here if None."""
    if not available():
        raise RuntimeError("decode_attention needs the triton package, which is not installed")
    B, H, Lq, D = q.shape
    if k.dim() != 4 or v.shape != k.shape or k.shape[0] != B or k.shape[-1] != D:
        raise ValueError(f"key and value must be (B={B}, H_kv, Lk, D={D}) like the query, got key "
                         f"{tuple(k.shape)} and value {tuple(v.shape)}")
    if H % k.shape[1]:
        raise ValueError(f"the query's {H} heads are not a multiple of the cache's {k.shape[1]} key/value heads")
    if (H // k.shape[1]) * Lq > MAX_ROWS:
        raise ValueError(f"{H // k.shape[1]} query heads per key head x {Lq} queries = "
                         f"{(H // k.shape[1]) * Lq} rows > {MAX_ROWS}; run longer chunks through the prefill path")
    if keep.dtype != torch.bool or keep.dim() != 4 or keep.shape[0] != B or keep.shape[1] not in (1, H) \
            or keep.shape[2:] != (Lq, k.shape[2]):
        raise ValueError(f"keep must be a (B={B}, 1 or {H}, Lq={Lq}, Lk={k.shape[2]}) bool tensor, got "
                         f"{keep.dtype} {tuple(keep.shape)}")
    if q.device.type != "cuda" and not interpreted():
        raise ValueError(f"decode_attention runs on CUDA (or in Triton's interpreter: TRITON_INTERPRET=1 before "
                         f"sparseattn is imported); the query is on {q.device}")
    scale = D ** -0.5 if scale is None else float(scale)
    tiles, count = tile_lists(keep, k.shape[1]) if lists is None else lists
    if torch.compiler.is_compiling():
        return decode_attention_op(q, k, v, keep, tiles, count, scale)
    # eagerly the operator's computation without the dispatcher, whose tens of microseconds a call every layer of
    # every decoding step would pay (as triton_kernel.block_attention does)
    return _decode(q, k, v, keep, tiles, count, scale)
