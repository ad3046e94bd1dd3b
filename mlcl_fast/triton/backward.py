"""Second sweeps: the regulariser's value and the gradient, recomputing logits from the
forward statistics (lse_i, W_i, the weight normalisers; lse in base 2, see forward.py).

For anchor i and softmax column j (SPEC):
    p_ij = beta_j exp(s_ij - lse_i),  r_ij = max(p_ij - w_ij, 0) on positives (reg only),
    dl_i/ds_ij = W_i p_ij - w_ij - r_ij,   g_ij = G_i dl_i/ds_ij / tau.
rows_kernel owns anchor blocks: dq_i = sum_j g_ij k_j (and the regulariser's sum_j r_ij s_ij).
cols_kernel owns column blocks: dk_j = sum_i g_ij q_i.
Each program writes only its own output block, in a fixed order: deterministic, no atomics.
With MODE_NONE (the closed-form and pair-list regimes) the tile has no positives and
g_ij = G_i W_i p_ij / tau; the positives' part is added outside (closed.py, pairs.py), and the
column gradient runs transposed (cols_free_kernel): the column block is the resident operand and
both products of a tile have the owned columns as their M dimension, as wgmma needs; so does the
dense label mode's (cols_dense_kernel), whose label dots are transposed with it.
Probabilities come from exp2 of logits scaled by log2(e)/tau (`scale2`), as in the forward.
"""
import triton
import triton.language as tl

from .tiles import (_MODE_HEAD, LN2, W_LABEL, anchor_rows, dot_tile, head_weights, load_rows, pair_factor,
                    pair_omega, positive_weights, softmax_mask, split_dot_right)


@triton.jit
def anchor_state(rows, rmask, self_col, a_count, lse, w_tot, scale, g_up):
    """What a gradient tile needs of its anchors: own column, |y_i|, and the forward's saved
    lse_i, W_i, weight scale and the upstream gradient G_i."""
    self_c = tl.load(self_col + rows, mask=rmask, other=-1)
    a_i = tl.load(a_count + rows, mask=rmask, other=0).to(tl.float32)
    lse_i = tl.load(lse + rows, mask=rmask, other=0.0)
    w_i = tl.load(w_tot + rows, mask=rmask, other=0.0)
    scale_i = tl.load(scale + rows, mask=rmask, other=0.0)
    g_i = tl.load(g_up + rows, mask=rmask, other=0.0)
    return self_c, a_i, lse_i, w_i, scale_i, g_i


@triton.jit
def tile_grad(s2, rows, rmask, cols, cmask, self_c, N, C, lse_i, w_tot, scale_i, g_i, a_i,
              inv_z, a_index, a_bits, KA, KAP, table, c_count, width, log2_beta, alpha,
              LABELS: tl.constexpr, MODE: tl.constexpr, WORDS: tl.constexpr, WEIGHTING: tl.constexpr,
              FACTOR: tl.constexpr, HARD: tl.constexpr, REG: tl.constexpr, NATIVE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(dl/ds scaled by G_i, r) of one tile; both 0 outside the softmax. `s2` = logits * log2(e)."""
    soft = softmax_mask(rmask, cols, cmask, self_c, C)
    shifted = s2 + tl.where(cols < N, log2_beta, 0.0)[None, :] - lse_i[:, None]
    p = tl.where(soft, tl.exp2(tl.where(soft, shifted, 0.0)), 0.0)
    grad = w_tot[:, None] * p
    r = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if MODE == _MODE_HEAD:
        # Closed form: the head labels' weights w^H (and, with REG, their regulariser) per pair;
        # the tail labels' part is added outside. a_bits / table / scale carry the head tiles.
        w = head_weights(rows, rmask, cols, cmask, a_bits, table, scale_i, WORDS)
        w = tl.where(soft, w, 0.0)
        if REG:
            r = tl.where(w > 0, tl.maximum(p - w, 0.0), 0.0)
        grad = grad - w - r
    elif LABELS:
        a_j = tl.load(c_count + cols, mask=cmask, other=0).to(tl.float32)
        w = positive_weights(rows, rmask, cols, cmask, soft, a_i, a_j, scale_i, inv_z, N,
                             a_index, a_bits, KA, KAP, table, width, alpha,
                             BLOCK_M, BLOCK_N, MODE, WORDS, WEIGHTING, FACTOR, HARD, NATIVE)
        if REG:
            r = tl.where(w > 0, tl.maximum(p - w, 0.0), 0.0)
        grad = grad - w - r
    return grad * g_i[:, None], r


@triton.jit
def rows_kernel(q_ptr, k_ptr, self_col, a_index, a_bits, a_count, table, c_count, order, live, col_list, col_count,
                lse, w_tot, scale, inv_z, g_up, dq_out, reg_out,
                M, C, N, col_lo, d, KA, KAP, width, stride_q, stride_k, stride_dq,
                scale2, log2_beta, alpha,
                LABELS: tl.constexpr, MODE: tl.constexpr, WORDS: tl.constexpr,
                WEIGHTING: tl.constexpr, FACTOR: tl.constexpr, HARD: tl.constexpr, REG: tl.constexpr,
                NATIVE: tl.constexpr, REG_VALUE: tl.constexpr, GRAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                Q_RESIDENT: tl.constexpr, PRECISION: tl.constexpr, GATHER: tl.constexpr):
    """Grid (anchor blocks, feature chunks). REG_VALUE: reg_out[i] = sum_j r_ij s_ij (written by
    the first feature chunk). GRAD: dq_out[i, chunk] = sum_j g_ij k_j. With Q_RESIDENT and one
    chunk covering d (BLOCK_D == BLOCK_K) the column tile loaded for the logits is reused for
    the gradient product. GATHER: the sweep covers only the columns col_list[0 .. col_count)
    (all >= col_lo; the symmetric backward's columns that no visited anchor owns), not
    [col_lo, C)."""
    # float scalars as fp32: inductor passes Python floats as fp64 (README, torch.compile)
    scale2, log2_beta, alpha = tl.cast(scale2, tl.float32), tl.cast(log2_beta, tl.float32), tl.cast(alpha, tl.float32)
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    live_n = tl.load(live)
    rows, rmask = anchor_rows(order, live_n, pid * BLOCK_M, BLOCK_M)
    if GATHER:
        c_start = 0
        c_end = tl.where(pid * BLOCK_M < live_n, tl.load(col_count), 0)
    else:
        c_start = col_lo
        c_end = tl.where(pid * BLOCK_M < live_n, C, col_lo)
    self_c, a_i, lse_i, w_i, scale_i, g_i = anchor_state(rows, rmask, self_col, a_count, lse, w_tot, scale, g_up)
    if Q_RESIDENT:
        q_res = load_rows(q_ptr, rows, rmask, d, stride_q, BLOCK_K)
    else:
        q_res = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    reg_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

    reuse_k: tl.constexpr = Q_RESIDENT and BLOCK_D == BLOCK_K
    for start in range(c_start, c_end, BLOCK_N):
        if GATHER:
            slot = start + tl.arange(0, BLOCK_N)
            cmask = slot < c_end
            cols = tl.load(col_list + slot, mask=cmask, other=0)
        else:
            cols = start + tl.arange(0, BLOCK_N)
            cmask = cols < C
        if reuse_k:
            k = tl.load(k_ptr + cols[:, None] * stride_k + offs_d[None, :],
                        mask=cmask[:, None] & dmask[None, :], other=0.0)
            s2 = tl.dot(q_res, tl.trans(k), input_precision=PRECISION) * scale2
        else:
            s2 = dot_tile(q_ptr, k_ptr, rows, rmask, cols, cmask, d, stride_q, stride_k, q_res,
                          BLOCK_M, BLOCK_N, BLOCK_K, Q_RESIDENT, PRECISION) * scale2
        grad, r = tile_grad(s2, rows, rmask, cols, cmask, self_c, N, C, lse_i, w_i, scale_i, g_i, a_i,
                            inv_z, a_index, a_bits, KA, KAP, table, c_count, width, log2_beta, alpha,
                            LABELS, MODE, WORDS, WEIGHTING, FACTOR, HARD, REG, NATIVE, BLOCK_M, BLOCK_N)
        if REG_VALUE:
            reg_sum += tl.sum(r * s2, axis=1)
        if GRAD:
            if not reuse_k:
                k = tl.load(k_ptr + cols[:, None] * stride_k + offs_d[None, :],
                            mask=cmask[:, None] & dmask[None, :], other=0.0)
            dq += tl.dot(grad.to(k.dtype), k, input_precision=PRECISION)

    if REG_VALUE:
        if pid_d == 0:
            tl.store(reg_out + rows, reg_sum * LN2, mask=rmask)
    if GRAD:
        tl.store(dq_out + rows[:, None] * stride_dq + offs_d[None, :], dq * (scale2 * LN2),
                 mask=rmask[:, None] & dmask[None, :])


@triton.jit
def cols_kernel(q_ptr, k_ptr, self_col, a_index, a_bits, a_count, table, c_count, order, live,
                lse, w_tot, scale, inv_z, g_up, dk_out,
                M, C, N, col_lo, d, KA, KAP, width, stride_q, stride_k, stride_dk,
                scale2, log2_beta, alpha,
                LABELS: tl.constexpr, MODE: tl.constexpr, WORDS: tl.constexpr,
                WEIGHTING: tl.constexpr, FACTOR: tl.constexpr, HARD: tl.constexpr, REG: tl.constexpr,
                NATIVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                K_RESIDENT: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (column blocks of [col_lo, C), feature chunks): dk_out[j, chunk] = sum_i g_ij q_i."""
    # float scalars as fp32: inductor passes Python floats as fp64 (README, torch.compile)
    scale2, log2_beta, alpha = tl.cast(scale2, tl.float32), tl.cast(log2_beta, tl.float32), tl.cast(alpha, tl.float32)
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = col_lo + pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < C
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    offs_k = tl.arange(0, BLOCK_K)
    if K_RESIDENT:
        k_res = tl.load(k_ptr + cols[:, None] * stride_k + offs_k[None, :],
                        mask=cmask[:, None] & (offs_k[None, :] < d), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    live_n = tl.load(live)
    for start in range(0, live_n, BLOCK_M):
        rows, rmask = anchor_rows(order, live_n, start, BLOCK_M)
        self_c, a_i, lse_i, w_i, scale_i, g_i = anchor_state(rows, rmask, self_col, a_count, lse, w_tot, scale, g_up)
        if K_RESIDENT:
            q = load_rows(q_ptr, rows, rmask, d, stride_q, BLOCK_K)
            s = tl.dot(q, tl.trans(k_res), input_precision=PRECISION)
        else:
            s = dot_tile(q_ptr, k_ptr, rows, rmask, cols, cmask, d, stride_q, stride_k, rows,
                         BLOCK_M, BLOCK_N, BLOCK_K, False, PRECISION)
        s2 = s * scale2
        grad, r = tile_grad(s2, rows, rmask, cols, cmask, self_c, N, C, lse_i, w_i, scale_i, g_i, a_i,
                            inv_z, a_index, a_bits, KA, KAP, table, c_count, width, log2_beta, alpha,
                            LABELS, MODE, WORDS, WEIGHTING, FACTOR, HARD, REG, NATIVE, BLOCK_M, BLOCK_N)
        qd = tl.load(q_ptr + rows[:, None] * stride_q + offs_d[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        dk += tl.dot(tl.trans(grad.to(qd.dtype)), qd, input_precision=PRECISION)

    tl.store(dk_out + cols[:, None] * stride_dk + offs_d[None, :], dk * (scale2 * LN2),
             mask=cmask[:, None] & dmask[None, :])


@triton.jit
def cols_free_kernel(q_ptr, k_ptr, self_col, col_owner, order, live, lse, w_tot, g_up, head_u, head_y, head_scale,
                     dk_out, M, C, N, col_lo, d, stride_q, stride_k, stride_dk, scale2, log2_beta,
                     HEAD: tl.constexpr, REG: tl.constexpr, SYM: tl.constexpr, HB: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Label-free column gradient (MODE_NONE, or MODE_HEAD with HEAD), transposed: grid (column
    blocks of [col_lo, C),). The owned column block k_j ([BLOCK_N, d], d <= BLOCK_K) stays
    resident; each anchor tile gives sT = k_j q_i^T [BLOCK_N, BLOCK_M] and dk_j += gT q_i with
    g_ij = G_i (W_i p_ij - w^H_ij - r_ij) with the head labels' weights and regulariser (HEAD;
    r only with REG), or g_ij = G_i W_i p_ij.

    SYM (the symmetric backward; every anchor row is its own column's embedding, q_i = k_own(i),
    and col_lo = 0): the same tile, read as s_oc = q_o k_c for the anchor o that owns column j
    (col_owner) and the swept anchor i's own column c, is also that of anchor o's softmax at
    column c. So the one gradient product adds both dk_j and anchor o's dq_o part from the columns
    that visited anchors own, (gT_ji + g_oc) q_i with q_i = k_c: two products per tile for what
    the anchor- and column-owned sweeps take four. The owner's part is returned in dk_j, its own
    column's row (q and k are one embedding: only dq_o + dk_j matters); the other columns of o's
    softmax come from rows_kernel's GATHER sweep. Owners without a positive (W_o = 0, never
    visited, their lse not computed) add nothing."""
    # float scalars as fp32: inductor passes Python floats as fp64 (README, torch.compile)
    scale2, log2_beta = tl.cast(scale2, tl.float32), tl.cast(log2_beta, tl.float32)
    pid = tl.program_id(0)
    cols = col_lo + pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < C
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < d
    k_res = tl.load(k_ptr + cols[:, None] * stride_k + offs_k[None, :], mask=cmask[:, None] & kmask[None, :],
                    other=0.0)
    if HEAD:
        offs_h = tl.arange(0, HB)
        y_res = tl.load(head_y + cols[:, None] * HB + offs_h[None, :], mask=cmask[:, None], other=0.0)
    col_shift = tl.where(cols < N, log2_beta, 0.0)
    if SYM:
        owner = tl.load(col_owner + cols, mask=cmask, other=-1)
        o = tl.where(owner >= 0, owner, 0)
        lse2_o = tl.load(lse + o, mask=owner >= 0, other=0.0)
        w_o = tl.load(w_tot + o, mask=owner >= 0, other=0.0)
        g_o = tl.load(g_up + o, mask=owner >= 0, other=0.0)
        o_live = (owner >= 0) & (w_o > 0)
        if HEAD:
            hi_o = tl.load(head_u + o[:, None] * (2 * HB) + offs_h[None, :], mask=o_live[:, None], other=0.0)
            lo_o = tl.load(head_u + o[:, None] * (2 * HB) + HB + offs_h[None, :], mask=o_live[:, None], other=0.0)
            scale_o = tl.load(head_scale + o, mask=o_live, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    live_n = tl.load(live)
    for start in range(0, live_n, BLOCK_M):
        rows, rmask = anchor_rows(order, live_n, start, BLOCK_M)
        self_c = tl.load(self_col + rows, mask=rmask, other=-1)
        lse2_i = tl.load(lse + rows, mask=rmask, other=0.0)
        w_i = tl.load(w_tot + rows, mask=rmask, other=0.0)
        g_i = tl.load(g_up + rows, mask=rmask, other=0.0)
        q = tl.load(q_ptr + rows[:, None] * stride_q + offs_k[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0)
        s2 = tl.dot(k_res, tl.trans(q), input_precision=PRECISION) * scale2
        soft = cmask[:, None] & rmask[None, :] & (cols[:, None] != self_c[None, :])
        p = tl.exp2(tl.where(soft, s2 + col_shift[:, None] - lse2_i[None, :], float("-inf")))
        grad = p * w_i[None, :]
        if HEAD:
            hi = tl.load(head_u + rows[:, None] * (2 * HB) + offs_h[None, :], mask=rmask[:, None], other=0.0)
            lo = tl.load(head_u + rows[:, None] * (2 * HB) + HB + offs_h[None, :], mask=rmask[:, None], other=0.0)
            w = (tl.dot(y_res, tl.trans(hi)) + tl.dot(y_res, tl.trans(lo))) * \
                tl.load(head_scale + rows, mask=rmask, other=0.0)[None, :]
            w = tl.where(soft, w, 0.0)
            grad -= w
            if REG:
                grad -= tl.where(w > 0, tl.maximum(p - w, 0.0), 0.0)
        grad = grad * g_i[None, :]
        if SYM:
            # Anchor o's softmax at column c = own(i): every visited anchor's own column is in it
            # (col_lo = 0) except o's own (i == o).
            soft_o = o_live[:, None] & rmask[None, :] & (rows[None, :] != owner[:, None])
            shift_c = tl.where(self_c < N, log2_beta, 0.0)
            p_o = tl.exp2(tl.where(soft_o, s2 + shift_c[None, :] - lse2_o[:, None], float("-inf")))
            grad_o = p_o * w_o[:, None]
            if HEAD:
                y_c = tl.load(head_y + self_c[:, None] * HB + offs_h[None, :], mask=rmask[:, None], other=0.0)
                w2 = (tl.dot(hi_o, tl.trans(y_c)) + tl.dot(lo_o, tl.trans(y_c))) * scale_o[:, None]
                w2 = tl.where(soft_o, w2, 0.0)
                grad_o -= w2
                if REG:
                    grad_o -= tl.where(w2 > 0, tl.maximum(p_o - w2, 0.0), 0.0)
            grad += grad_o * g_o[:, None]
        dk += tl.dot(grad.to(q.dtype), q, input_precision=PRECISION)
    tl.store(dk_out + cols[:, None] * stride_dk + offs_k[None, :], dk * (scale2 * LN2),
             mask=cmask[:, None] & kmask[None, :])


@triton.jit
def cols_dense_kernel(q_ptr, k_ptr, self_col, a_bits, a_count, table, c_count, order, live,
                      lse, w_tot, scale, inv_z, g_up, dk_out,
                      M, C, N, col_lo, d, KAP, stride_q, stride_k, stride_dk, scale2, log2_beta, alpha,
                      WORDS: tl.constexpr, WEIGHTING: tl.constexpr, FACTOR: tl.constexpr, HARD: tl.constexpr,
                      REG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Column gradient of the dense label mode (MODE_DENSE, d <= BLOCK_K), transposed: grid
    (column blocks of [col_lo, C),). The owned columns' features k_j and 0/1 label rows y_j stay
    resident; per anchor tile every product has the owned columns as its M dimension (wgmma):
    sT = k_j q_i^T, the overlaps cT = y_j a_i^T, label-centric weights y_j (1/Z_i)^T as a split
    dot, and dk_j += gT q_i. The weights are those of tiles.positive_weights, transposed."""
    # float scalars as fp32: inductor passes Python floats as fp64 (README, torch.compile)
    scale2, log2_beta, alpha = tl.cast(scale2, tl.float32), tl.cast(log2_beta, tl.float32), tl.cast(alpha, tl.float32)
    pid = tl.program_id(0)
    cols = col_lo + pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < C
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < d
    offs_w = tl.arange(0, WORDS)
    k_res = tl.load(k_ptr + cols[:, None] * stride_k + offs_k[None, :], mask=cmask[:, None] & kmask[None, :],
                    other=0.0)
    y_res = tl.load(table + cols[:, None] * WORDS + offs_w[None, :], mask=cmask[:, None], other=0.0)
    a_j = tl.load(c_count + cols, mask=cmask, other=0).to(tl.float32)
    col_shift = tl.where(cols < N, log2_beta, 0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    live_n = tl.load(live)
    for start in range(0, live_n, BLOCK_M):
        rows, rmask = anchor_rows(order, live_n, start, BLOCK_M)
        self_c, a_i, lse2_i, w_i, scale_i, g_i = anchor_state(rows, rmask, self_col, a_count, lse, w_tot, scale,
                                                              g_up)
        q = tl.load(q_ptr + rows[:, None] * stride_q + offs_k[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0)
        s2 = tl.dot(k_res, tl.trans(q), input_precision=PRECISION) * scale2
        soft = cmask[:, None] & rmask[None, :] & (cols[:, None] != self_c[None, :])
        p = tl.exp2(tl.where(soft, s2 + col_shift[:, None] - lse2_i[None, :], float("-inf")))
        a_rows = tl.load(a_bits + rows[:, None] * WORDS + offs_w[None, :], mask=rmask[:, None], other=0.0)
        c = tl.dot(y_res, tl.trans(a_rows))  # exact: at most WORDS ones
        if WEIGHTING == W_LABEL:
            f = pair_factor(c, a_i, a_j, cols >= N, alpha, FACTOR, HARD, True)
            iz = tl.load(inv_z + rows[:, None] * KAP + offs_w[None, :], mask=rmask[:, None], other=0.0)
            w = f * split_dot_right(y_res, iz) * scale_i[None, :]
        else:
            w = pair_omega(c, a_i, a_j, WEIGHTING, True) * scale_i[None, :]
        w = tl.where(soft, w, 0.0)
        grad = p * w_i[None, :] - w
        if REG:
            grad -= tl.where(w > 0, tl.maximum(p - w, 0.0), 0.0)
        dk += tl.dot((grad * g_i[None, :]).to(q.dtype), q, input_precision=PRECISION)
    tl.store(dk_out + cols[:, None] * stride_dk + offs_k[None, :], dk * (scale2 * LN2),
             mask=cmask[:, None] & kmask[None, :])
