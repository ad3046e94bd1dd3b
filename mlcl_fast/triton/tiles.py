"""Device functions shared by the kernels: one [BLOCK_M anchors x BLOCK_N columns] tile's logits,
softmax mask, label overlaps and positive weights (SPEC "Positive weights").

Conventions: `rows` index anchors (0..M), `cols` index columns (0..C); columns >= N are
prototypes. Labels of anchors are padded sorted lists [M, KA] (-1 = none); labels of columns
are read through `table` in the label mode MODE (configs.MODE_*).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import configs
from .configs import FACTOR_CODES, MODE_BITS, MODE_DENSE, MODE_HEAD, MODE_LIST, WEIGHTING_CODES

LN2 = tl.constexpr(configs.LN2)
# Option codes as named constexprs (configs / presets hold the one definition).
W_ANY = tl.constexpr(WEIGHTING_CODES["any"])
W_ALL = tl.constexpr(WEIGHTING_CODES["all"])
W_LABEL = tl.constexpr(WEIGHTING_CODES["label"])
F_ONE = tl.constexpr(FACTOR_CODES["one"])
F_UNION = tl.constexpr(FACTOR_CODES["union"])
_MODE_BITS = tl.constexpr(MODE_BITS)
_MODE_HEAD = tl.constexpr(MODE_HEAD)
_MODE_DENSE = tl.constexpr(MODE_DENSE)
_MODE_LIST = tl.constexpr(MODE_LIST)


@triton.jit
def dot_tile(q_ptr, k_ptr, rows, rmask, cols, cmask, d, stride_q, stride_k, q_res,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             Q_RESIDENT: tl.constexpr, PRECISION: tl.constexpr):
    """<q_i, k_j> for the tile, accumulated in fp32. With Q_RESIDENT the anchor block `q_res`
    ([BLOCK_M, BLOCK_K], the whole of d) was loaded once by the caller."""
    offs_k = tl.arange(0, BLOCK_K)
    if Q_RESIDENT:
        k = tl.load(k_ptr + cols[:, None] * stride_k + offs_k[None, :],
                    mask=cmask[:, None] & (offs_k[None, :] < d), other=0.0)
        acc = tl.dot(q_res, tl.trans(k), input_precision=PRECISION)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + offs_k
            q = tl.load(q_ptr + rows[:, None] * stride_q + kk[None, :],
                        mask=rmask[:, None] & (kk[None, :] < d), other=0.0)
            k = tl.load(k_ptr + cols[:, None] * stride_k + kk[None, :],
                        mask=cmask[:, None] & (kk[None, :] < d), other=0.0)
            acc += tl.dot(q, tl.trans(k), input_precision=PRECISION)
    return acc


@triton.jit
def anchor_rows(order, live, first, BLOCK_M: tl.constexpr):
    """The anchors of one block: positions [first, first + BLOCK_M) of the visiting order `order`;
    only the first `live` positions are visited (the closed form puts the anchors that have a
    positive first, so those without one cost no sweep). Returns (anchor ids, mask)."""
    slot = first + tl.arange(0, BLOCK_M)
    rmask = slot < live
    return tl.load(order + slot, mask=rmask, other=0), rmask


@triton.jit
def block_rows(order, M, first, BLOCK_M: tl.constexpr):
    """Every anchor of a block's positions [first, first + BLOCK_M) of `order`, visited or not
    (for stores: a block writes its skipped anchors' outputs as zeros, so no zero fill is needed)."""
    slot = first + tl.arange(0, BLOCK_M)
    rmask = slot < M
    return tl.load(order + slot, mask=rmask, other=0), rmask


@triton.jit
def load_rows(q_ptr, rows, rmask, d, stride_q, BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    return tl.load(q_ptr + rows[:, None] * stride_q + offs_k[None, :],
                   mask=rmask[:, None] & (offs_k[None, :] < d), other=0.0)


@triton.jit
def softmax_mask(rmask, cols, cmask, self_col, C):
    """Column j enters anchor i's softmax: it exists and is not i itself (the caller's column
    range already starts after the sample columns when beta = 0)."""
    return rmask[:, None] & cmask[None, :] & (cols[None, :] != self_col[:, None]) & (cols[None, :] < C)


@triton.jit
def member(lab, cols, cmask, table, width,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, WORDS: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: column j carries label lab_i (lab_i = -1: no label)."""
    has = lab >= 0
    if MODE == _MODE_LIST:
        hit = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32) != 0
        for u in range(width):
            other = tl.load(table + cols * width + u, mask=cmask, other=-2)
            hit = hit | (other[None, :] == lab[:, None])
    elif MODE == _MODE_BITS:
        word = lab >> 5
        sel = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for w in tl.static_range(WORDS):
            bits = tl.load(table + cols * WORDS + w, mask=cmask, other=0)
            sel = tl.where(word[:, None] == w, bits[None, :], sel)
        hit = ((sel >> (lab & 31)[:, None]) & 1) != 0
    elif MODE == _MODE_DENSE:
        ok = has[:, None] & cmask[None, :]
        hit = tl.load(table + cols[None, :] * WORDS + lab[:, None], mask=ok, other=0.0) != 0
    else:  # MODE_GATHER
        ok = has[:, None] & cmask[None, :]
        bits = tl.load(table + cols[None, :] * width + (lab >> 5)[:, None], mask=ok, other=0)
        hit = ((bits >> (lab & 31)[:, None]) & 1) != 0
    return hit & has[:, None]


@triton.jit
def popcount(x, NATIVE: tl.constexpr):
    """Set bits of each int32 (the interpreter has no popc: bit tricks on uint32 there)."""
    if NATIVE:
        n = libdevice.popc(x)
    else:
        u = x.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        n = ((u * 0x01010101) >> 24).to(tl.int32)
    return n


@triton.jit
def overlap(rows, rmask, cols, cmask, a_index, a_bits, KA, table, width,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, WORDS: tl.constexpr,
            NATIVE: tl.constexpr):
    """c_ij = |y_i ∩ y_j| as fp32: one tl.dot of 0/1 fp16 label rows in MODE_DENSE (exact: at most
    64 ones), popcounts of bitset ANDs in MODE_BITS (WORDS ops per pair instead of KA
    membership tests), else one membership test per anchor label."""
    if MODE == _MODE_DENSE:
        offs = tl.arange(0, WORDS)
        a = tl.load(a_bits + rows[:, None] * WORDS + offs[None, :], mask=rmask[:, None], other=0.0)
        b = tl.load(table + cols[:, None] * WORDS + offs[None, :], mask=cmask[:, None], other=0.0)
        c = tl.dot(a, tl.trans(b))
    elif MODE == _MODE_BITS:
        n = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for w in tl.static_range(WORDS):
            a = tl.load(a_bits + rows * WORDS + w, mask=rmask, other=0)
            b = tl.load(table + cols * WORDS + w, mask=cmask, other=0)
            n += popcount(a[:, None] & b[None, :], NATIVE)
        c = n.to(tl.float32)
    else:
        c = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for t in range(KA):
            lab = tl.load(a_index + rows * KA + t, mask=rmask, other=-1)
            c += member(lab, cols, cmask, table, width, BLOCK_M, BLOCK_N, MODE, WORDS).to(tl.float32)
    return c


@triton.jit
def pair_axes(a_i, a_j, TRANSPOSED: tl.constexpr):
    """Per-anchor and per-column values broadcast over a tile: [anchors, columns], or
    [columns, anchors] for the transposed column kernel."""
    if TRANSPOSED:
        ai = a_i[None, :]
        aj = a_j[:, None]
    else:
        ai = a_i[:, None]
        aj = a_j[None, :]
    return ai, aj


@triton.jit
def pair_omega(c, a_i, a_j, WEIGHTING: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """Unnormalised pair-centric weight: any, all, jaccard."""
    ai, aj = pair_axes(a_i, a_j, TRANSPOSED)
    pos = c > 0
    if WEIGHTING == W_ANY:
        om = pos.to(tl.float32)
    elif WEIGHTING == W_ALL:
        om = (pos & (c == ai) & (c == aj)).to(tl.float32)
    else:
        union = tl.maximum(ai + aj - c, 1.0)
        om = tl.where(pos, c / union, 0.0)
    return om


@triton.jit
def pair_factor(c, a_i, a_j, proto_col, alpha, FACTOR: tl.constexpr, HARD: tl.constexpr,
                TRANSPOSED: tl.constexpr = False):
    """f_ij of the label-centric weighting: one, union, overlap; HARD: alpha < 0."""
    ai, aj = pair_axes(a_i, a_j, TRANSPOSED)
    _, proto = pair_axes(a_i, proto_col, TRANSPOSED)
    if FACTOR == F_ONE:
        f = tl.full(c.shape, 1.0, tl.float32)
    elif FACTOR == F_UNION:
        union = tl.maximum(ai + aj - c, 1.0)
        f = tl.where(proto, 1.0, 1.0 / union)
    else:
        if HARD:
            f = (c == aj).to(tl.float32)
        else:
            ratio = c / tl.maximum(aj, 1.0)
            # (c/a_j)^alpha on overlapping columns; log2 is only taken where c > 0.
            f = tl.where(c > 0, tl.exp2(alpha * tl.log2(tl.where(c > 0, ratio, 1.0))), 0.0)
    return f


@triton.jit
def positive_weights(rows, rmask, cols, cmask, soft, a_i, a_j, scale_i, inv_z, N,
                     a_index, a_bits, KA, KAP, table, width, alpha,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, WORDS: tl.constexpr,
                     WEIGHTING: tl.constexpr, FACTOR: tl.constexpr, HARD: tl.constexpr, NATIVE: tl.constexpr):
    """w_ij from the per-anchor normalisers of the forward statistics:
    pair-centric w = scale_i * omega_ij (scale = 1 / sum omega);
    label-centric w = scale_i * f_ij * sum_{t: k_it in y_j} inv_z[i, t] (scale = 1 / a_i)."""
    if WEIGHTING == W_LABEL:
        if FACTOR == F_ONE:
            f = tl.full([BLOCK_M, BLOCK_N], 1.0, tl.float32)
        else:
            c = overlap(rows, rmask, cols, cmask, a_index, a_bits, KA, table, width, BLOCK_M, BLOCK_N, MODE, WORDS,
                        NATIVE)
            f = pair_factor(c, a_i, a_j, cols >= N, alpha, FACTOR, HARD)
        if MODE == _MODE_DENSE:
            # inv_z is label-indexed here ([M, WORDS], 0 off the anchor's labels): one split dot.
            offs = tl.arange(0, WORDS)
            iz = tl.load(inv_z + rows[:, None] * KAP + offs[None, :], mask=rmask[:, None], other=0.0)
            acc = split_dot(iz, tl.trans(dense_labels(table, cols, cmask, WORDS)))
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for t in range(KA):
                lab = tl.load(a_index + rows * KA + t, mask=rmask, other=-1)
                iz = tl.load(inv_z + rows * KAP + t, mask=rmask, other=0.0)
                hit = member(lab, cols, cmask, table, width, BLOCK_M, BLOCK_N, MODE, WORDS)
                acc += tl.where(hit, iz[:, None], 0.0)
        w = f * acc * scale_i[:, None]
    else:
        c = overlap(rows, rmask, cols, cmask, a_index, a_bits, KA, table, width, BLOCK_M, BLOCK_N, MODE, WORDS,
                        NATIVE)
        w = pair_omega(c, a_i, a_j, WEIGHTING) * scale_i[:, None]
    return tl.where(soft, w, 0.0)


@triton.jit
def split_rows(v):
    """(hi, lo, m): each row of the fp32 tile v scaled by its largest magnitude m and split into an
    fp16 high part and the fp16 rest (~22 significant bits together)."""
    m = tl.max(tl.abs(v), axis=1)
    m = tl.where(m > 0, m, 1.0)
    unit = v / m[:, None]
    hi = unit.to(tl.float16)
    lo = (unit - hi.to(tl.float32)).to(tl.float16)
    return hi, lo, m


@triton.jit
def split_dot(v, y):
    """v @ y for an fp32 tile v and a 0/1 fp16 tile y, on fp16 tensor cores to ~22 significant
    bits (split_rows; 0/1 products are exact; the accumulation is fp32)."""
    hi, lo, m = split_rows(v)
    return (tl.dot(hi, y) + tl.dot(lo, y)) * m[:, None]


@triton.jit
def split_dot_right(y, v):
    """y @ v^T for a 0/1 fp16 tile y and an fp32 tile v: split_dot with the fp32 operand on the
    right (its rows, now the result's columns, carry the scales)."""
    hi, lo, m = split_rows(v)
    return (tl.dot(y, tl.trans(hi)) + tl.dot(y, tl.trans(lo))) * m[None, :]


@triton.jit
def dense_labels(table, cols, cmask, WORDS: tl.constexpr):
    """[BLOCK_N, WORDS] fp16 0/1 label rows of the columns (MODE_DENSE)."""
    offs = tl.arange(0, WORDS)
    return tl.load(table + cols[:, None] * WORDS + offs[None, :], mask=cmask[:, None], other=0.0)


@triton.jit
def head_weights(rows, rmask, cols, cmask, head_u, head_y, scale_i, HB: tl.constexpr):
    """[BLOCK_M, BLOCK_N] w_ij over the head labels (MODE_HEAD): sum_h u_ih y_jh as two fp16 dots.
    head_u [M, 2*HB] holds each anchor's head weights divided by its row scale, split into an
    fp16 high part and the fp16 rest (22 significant bits together); head_y [C, HB] the columns'
    0/1 head labels (exact in fp16); scale_i the row scales. The fp32 accumulation of exact
    products then loses nothing that matters."""
    offs_h = tl.arange(0, HB)
    y = tl.load(head_y + cols[:, None] * HB + offs_h[None, :], mask=cmask[:, None], other=0.0)
    hi = tl.load(head_u + rows[:, None] * (2 * HB) + offs_h[None, :], mask=rmask[:, None], other=0.0)
    lo = tl.load(head_u + rows[:, None] * (2 * HB) + HB + offs_h[None, :], mask=rmask[:, None], other=0.0)
    w = tl.dot(hi, tl.trans(y)) + tl.dot(lo, tl.trans(y))
    return w * scale_i[:, None]
