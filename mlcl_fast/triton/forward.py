"""Forward statistics: one sweep of each anchor block over its columns.

Per anchor it keeps the online log-sum-exp of beta_j exp(s_ij) over the softmax columns and the
sums that give the loss once the sweep is over:
  pair-centric:  Omega_i = sum_j omega_ij,            T_i = sum_j omega_ij s_ij
  label-centric: Z_it = sum_{j: k_it in y_j} f_ij,     S_it = sum_{j: k_it in y_j} f_ij s_ij
so that l_i = W_i lse_i - T_i / Omega_i, or W_i lse_i - (1/a_i) sum_t S_it / Z_it.
The regulariser needs final lse and weights, so its value comes from a second sweep
(backward.rows_kernel with REG_VALUE).

The log-sum-exp runs in base 2: the logit tile is scaled once by log2(e)/tau (`scale2`) and
exp2 is the only transcendental per pair. The saved statistic is the base-2 log-sum-exp
lse2_i = lse_i * log2(e), which the second sweeps subtract from base-2 logits as it is (a lone
softmax column then has p = exp2(0) = 1 exactly); callers take lse_i = lse2_i * ln(2).
Without labels (MODE_NONE: the closed-form and pair-list regimes) the sweep is the logit GEMM
and one exp2 per pair, nothing else. The closed form's per-anchor label sums (SUMS: V_i and the
loss without the regulariser, closed.py) follow in the same programs once the log-sum-exp is
final: O(K_a d) per anchor, no launch of their own.
"""
import triton
import triton.language as tl

from .tiles import (_MODE_DENSE, F_ONE, LN2, W_LABEL, anchor_rows, block_rows, dense_labels, dot_tile, load_rows,
                    member, overlap, pair_factor, pair_omega, softmax_mask, split_dot)


@triton.jit
def stats_kernel(q_ptr, k_ptr, self_col, a_index, a_bits, a_count, table, c_count, order, live,
                 lse_out, acc_z, acc_s,
                 s_cid, s_u, s_u_tail, s_ubar, s_ubar_tail, s_w, e_ptr, base_out, v_tail_out,
                 M, C, N, col_lo, d, KA, KAP, width, stride_q, stride_k,
                 scale2, log2_beta, alpha, KS, inv_tau, stride_e, stride_v,
                 SUMS: tl.constexpr, BLOCK_DS: tl.constexpr, LABELS: tl.constexpr, MODE: tl.constexpr,
                 WORDS: tl.constexpr, WEIGHTING: tl.constexpr, FACTOR: tl.constexpr, HARD: tl.constexpr, NATIVE: tl.constexpr,
                 SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 Q_RESIDENT: tl.constexpr, PRECISION: tl.constexpr):
    # float scalars as fp32: inductor passes Python floats as fp64 (README, torch.compile)
    scale2, log2_beta = tl.cast(scale2, tl.float32), tl.cast(log2_beta, tl.float32)
    alpha, inv_tau = tl.cast(alpha, tl.float32), tl.cast(inv_tau, tl.float32)
    pid = tl.program_id(0)
    live_n = tl.load(live)
    rows, rmask = anchor_rows(order, live_n, pid * BLOCK_M, BLOCK_M)
    c_end = tl.where(pid * BLOCK_M < live_n, C, col_lo)  # a block of skipped anchors sweeps nothing
    self_c = tl.load(self_col + rows, mask=rmask, other=-1)
    a_i = tl.load(a_count + rows, mask=rmask, other=0).to(tl.float32)
    if Q_RESIDENT:
        q_res = load_rows(q_ptr, rows, rmask, d, stride_q, BLOCK_K)
    else:
        q_res = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # pair-centric: column 0 of these holds Omega / T; label-centric: slot t holds Z_it / S_it
    z_acc = tl.zeros([BLOCK_M, SLOTS], dtype=tl.float32)
    s_acc = tl.zeros([BLOCK_M, SLOTS], dtype=tl.float32)
    slots = tl.arange(0, SLOTS)

    for start in range(col_lo, c_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < C
        s2 = dot_tile(q_ptr, k_ptr, rows, rmask, cols, cmask, d, stride_q, stride_k, q_res,
                      BLOCK_M, BLOCK_N, BLOCK_K, Q_RESIDENT, PRECISION) * scale2
        soft = softmax_mask(rmask, cols, cmask, self_c, C)
        shifted = s2 + tl.where(cols < N, log2_beta, 0.0)[None, :]
        shifted = tl.where(soft, shifted, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(shifted, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(shifted - m_new[:, None]), axis=1)
        m_i = m_new

        if LABELS:
            s = s2 * LN2  # natural-unit logits for the weighted sums
            a_j = tl.load(c_count + cols, mask=cmask, other=0).to(tl.float32)
            if WEIGHTING == W_LABEL:
                if FACTOR == F_ONE:
                    f = tl.where(soft, 1.0, 0.0)
                else:
                    c = overlap(rows, rmask, cols, cmask, a_index, a_bits, KA, table, width,
                                BLOCK_M, BLOCK_N, MODE, WORDS, NATIVE)
                    f = tl.where(soft, pair_factor(c, a_i, a_j, cols >= N, alpha, FACTOR, HARD), 0.0)
                if MODE == _MODE_DENSE:
                    # Label-indexed sums (SLOTS == WORDS): Z_ik = sum_j f_ij y_jk, S_ik likewise
                    # with f_ij s_ij, as split dots; labels off the anchor's set are masked below.
                    y = dense_labels(table, cols, cmask, WORDS)
                    z_acc += split_dot(f, y)
                    s_acc += split_dot(f * s, y)
                else:
                    for t in range(KA):
                        lab = tl.load(a_index + rows * KA + t, mask=rmask, other=-1)
                        hit = member(lab, cols, cmask, table, width, BLOCK_M, BLOCK_N, MODE, WORDS)
                        fm = tl.where(hit, f, 0.0)
                        at_t = (slots == t)[None, :]
                        z_acc += tl.where(at_t, tl.sum(fm, axis=1)[:, None], 0.0)
                        s_acc += tl.where(at_t, tl.sum(fm * s, axis=1)[:, None], 0.0)
            else:
                c = overlap(rows, rmask, cols, cmask, a_index, a_bits, KA, table, width,
                            BLOCK_M, BLOCK_N, MODE, WORDS, NATIVE)
                om = tl.where(soft, pair_omega(c, a_i, a_j, WEIGHTING), 0.0)
                at_0 = (slots == 0)[None, :]
                z_acc += tl.where(at_0, tl.sum(om, axis=1)[:, None], 0.0)
                s_acc += tl.where(at_0, tl.sum(om * s, axis=1)[:, None], 0.0)

    # An anchor without any column (a batch of one) keeps lse = 0; it has no positive either.
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), 0.0)
    # Every slot of the block is written, the skipped anchors' (past `live`) with the zeros they
    # accumulated: the outputs need no zero fill before the launch.
    rows, rmask = block_rows(order, M, pid * BLOCK_M, BLOCK_M)
    tl.store(lse_out + rows, lse, mask=rmask)
    if SUMS:
        visited = pid * BLOCK_M + tl.arange(0, BLOCK_M) < live_n
        anchor_sums(q_ptr, rows, rmask, visited, lse, d, stride_q, s_cid, s_u, s_u_tail, s_ubar, s_ubar_tail, s_w,
                    e_ptr, base_out, v_tail_out, KS, inv_tau, stride_e, stride_v, BLOCK_M, BLOCK_DS)
    if LABELS:
        if MODE == _MODE_DENSE:
            if WEIGHTING == W_LABEL:
                own = tl.load(a_bits + rows[:, None] * WORDS + slots[None, :], mask=rmask[:, None], other=0.0)
                z_acc = tl.where(own != 0, z_acc, 0.0)
                s_acc = tl.where(own != 0, s_acc, 0.0)
        out = rows[:, None] * SLOTS + slots[None, :]
        tl.store(acc_z + out, z_acc, mask=rmask[:, None])
        tl.store(acc_s + out, s_acc, mask=rmask[:, None])


@triton.jit
def anchor_sums(q_ptr, rows, rmask, visited, lse2, d, stride_q, a_cid, u, u_tail, ubar, ubar_tail, w_tot, e_ptr,
                base_out, v_tail_out, KA, inv_tau, stride_e, stride_v, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The closed form's per-anchor sums for the block's anchors `rows` (closed.py):
    V_i = sum_k u_ik E_k - ubar_i q_i (the own column holds q_i itself), the loss without the
    regulariser W_i lse_i - <q_i, V_i> / tau (0 without a positive), and the tail labels' V^T_i
    (u^T, ubar^T) for the backward. An anchor that is not `visited` has no positive, so u_i = 0
    and everything it gets is 0: its rows are written without a load."""
    live = rmask & visited
    own = tl.load(ubar + rows, mask=live, other=0.0)
    own_t = tl.load(ubar_tail + rows, mask=live, other=0.0)
    weighted = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = (dd < d)[None, :]
        qi = tl.load(q_ptr + rows[:, None] * stride_q + dd[None, :], mask=live[:, None] & dmask,
                     other=0.0).to(tl.float32)
        v = -own[:, None] * qi
        v_t = -own_t[:, None] * qi
        for t in range(KA):
            cid = tl.load(a_cid + rows * KA + t, mask=live, other=-1)
            e = tl.load(e_ptr + cid[:, None] * stride_e + dd[None, :], mask=(cid >= 0)[:, None] & dmask, other=0.0)
            v += tl.load(u + rows * KA + t, mask=live, other=0.0)[:, None] * e
            v_t += tl.load(u_tail + rows * KA + t, mask=live, other=0.0)[:, None] * e
        weighted += tl.sum(qi * v, axis=1)
        tl.store(v_tail_out + rows[:, None] * stride_v + dd[None, :], v_t, mask=rmask[:, None] & dmask)
    w = tl.load(w_tot + rows, mask=live, other=0.0)
    base = w * lse2 * LN2 - weighted * inv_tau
    tl.store(base_out + rows, tl.where(w > 0, base, 0.0), mask=rmask)
