"""The @triton.jit kernels of SpecVerify; imported only by `triton_kernel.build_kernels`.

Kept apart so that `triton_kernel` imports without triton: Triton resolves the helpers a
kernel calls through this module's globals, so they must live at module level.
"""
import triton
import triton.language as tl


@triton.jit
def _row_stats(row_ptr, V, inv_t, WITH_SUM: tl.constexpr, BLOCK: tl.constexpr):
    """Online max, sum(exp((x - max) * inv_t)) and first argmax of one logits row."""
    offs = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    arg = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        x = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, 0)
        block_arg = tl.argmax(x, 0, tie_break_left=True).to(tl.int32)
        new_m = tl.maximum(m, block_max)
        if WITH_SUM:
            e = tl.where(x == float("-inf"), 0.0, tl.exp((x - new_m) * inv_t))
            rescale = tl.where(m == float("-inf"), 0.0, tl.exp((m - new_m) * inv_t))
            s = s * rescale + tl.sum(e, 0)
        arg = tl.where(block_max > m, start + block_arg, arg)  # strict: keep the first max
        m = new_m
    return m, s, arg

@triton.jit
def _probs(row_ptr, idx, valid, m, s, inv_t):
    """p = exp((x - m) * inv_t) / s at `idx` (0 where masked or -inf)."""
    x = tl.load(row_ptr + idx, mask=valid, other=float("-inf")).to(tl.float32)
    return tl.where(x == float("-inf"), 0.0, tl.exp((x - m) * inv_t)) / s


@triton.jit
def _merge_stats(ws_m, ws_s, ws_arg, slot, NC, inv_t, NC_P2: tl.constexpr):
    """Combine the split-V chunk statistics of one (row, position) slot."""
    offs = tl.arange(0, NC_P2)
    mask = offs < NC
    base = slot.to(tl.int64) * NC
    cm = tl.load(ws_m + base + offs, mask=mask, other=float("-inf"))
    cs = tl.load(ws_s + base + offs, mask=mask, other=0.0)
    ca = tl.load(ws_arg + base + offs, mask=mask, other=2147483647)
    m = tl.max(cm, 0)
    s = tl.sum(tl.where(cm == float("-inf"), 0.0, cs * tl.exp((cm - m) * inv_t)), 0)
    arg = tl.min(tl.where(cm == m, ca, 2147483647), 0)
    return m, s, arg

@triton.jit
def _position_stats(logits_ptr, ws_m, ws_s, ws_arg, slot, V, NC, inv_t, sampling,
                    BLOCK: tl.constexpr, NC_P2: tl.constexpr, USE_WS: tl.constexpr):
    if USE_WS:
        m, s, arg = _merge_stats(ws_m, ws_s, ws_arg, slot, NC, inv_t, NC_P2)
    else:
        row_ptr = logits_ptr + slot.to(tl.int64) * V
        if sampling:
            m, s, arg = _row_stats(row_ptr, V, inv_t, True, BLOCK)
        else:
            m, s, arg = _row_stats(row_ptr, V, inv_t, False, BLOCK)
    return m, s, arg

@triton.jit(do_not_specialize=["G", "NC"])  # V stays specialised: 16-aligned rows vectorise
def chunk_stats_kernel(logits_ptr, lengths_ptr, temperature_ptr, ws_m, ws_s, ws_arg,
                       G, V, NC, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (B * (G+1), NC): statistics of one vocabulary chunk of one needed position."""
    slot = tl.program_id(0)
    chunk = tl.program_id(1)
    b = slot // (G + 1)
    k = slot - b * (G + 1)
    length = tl.load(lengths_ptr + b).to(tl.int32)
    if k <= length:  # positions after the verify length are never read
        t = tl.load(temperature_ptr + b)
        inv_t = 1.0 / tl.where(t > 0, t, 1.0)
        row_ptr = logits_ptr + slot.to(tl.int64) * V + chunk * CHUNK
        n = tl.minimum(V - chunk * CHUNK, CHUNK)
        if t > 0:
            m, s, arg = _row_stats(row_ptr, n, inv_t, True, BLOCK)
        else:
            m, s, arg = _row_stats(row_ptr, n, inv_t, False, BLOCK)
        out = slot.to(tl.int64) * NC + chunk
        tl.store(ws_m + out, m)
        tl.store(ws_s + out, s)
        tl.store(ws_arg + out, arg + chunk * CHUNK)

@triton.jit(do_not_specialize=["G", "NC"])
def spec_verify_kernel(logits_ptr, draft_ids_ptr, draft_probs_ptr, lengths_ptr,
                       temperature_ptr, uniforms_ptr, ws_m, ws_s, ws_arg, G, V, NC,
                       accepted_ptr, tokens_ptr, BLOCK: tl.constexpr, G1_P2: tl.constexpr,
                       CHUNK: tl.constexpr, NC_P2: tl.constexpr, USE_WS: tl.constexpr):
    """Grid (B,). Argument order is inputs, int32 scalars, outputs: TensorRT's AOT ABI.

    NC = cdiv(V, CHUNK) <= NC_P2; BLOCK divides CHUNK.
    """
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    length = tl.load(lengths_ptr + b).to(tl.int32)
    t = tl.load(temperature_ptr + b)
    sampling = t > 0
    inv_t = 1.0 / tl.where(sampling, t, 1.0)
    offs = tl.arange(0, BLOCK)

    # Walk positions until the first rejection or the bonus position.
    a = 0
    walking = True
    m = 0.0
    s = 1.0
    arg = 0
    while walking:
        slot = b * (G + 1) + a
        m, s, arg = _position_stats(logits_ptr, ws_m, ws_s, ws_arg, slot, V, NC, inv_t,
                                    sampling, BLOCK, NC_P2, USE_WS)
        ok = a < length
        if ok:
            x = tl.load(draft_ids_ptr + b64 * G + a).to(tl.int32)
            x = tl.minimum(tl.maximum(x, 0), V - 1)
            if sampling:
                logit = tl.load(logits_ptr + slot.to(tl.int64) * V + x).to(tl.float32)
                p_x = tl.exp((logit - m) * inv_t) / s
                q_x = tl.load(draft_probs_ptr + (b64 * G + a) * V + x)
                u = tl.load(uniforms_ptr + b64 * (G + 1) + a)
                ok = u * q_x < p_x
            else:
                ok = x == arg
        if ok:
            a += 1
        else:
            walking = False

    token = arg
    if sampling:
        logits_row = logits_ptr + (b * (G + 1) + a).to(tl.int64) * V
        q_row = draft_probs_ptr + (b64 * G + tl.minimum(a, G - 1)) * V
        # Pass 1: the weight of every CHUNK of the row (a pipelined loop), so the inverse-CDF
        # search below scans one chunk instead of walking the row serially.
        chunks = tl.arange(0, NC_P2)
        residual = a < length
        if residual:
            sums_p = tl.zeros((NC_P2,), tl.float32)
            sums_r = tl.zeros((NC_P2,), tl.float32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                valid = idx < V
                p = _probs(logits_row, idx, valid, m, s, inv_t)
                q = tl.load(q_row + idx, mask=valid, other=0.0)
                here = chunks == start // CHUNK
                sums_p += tl.where(here, tl.sum(p, 0), 0.0)
                sums_r += tl.where(here, tl.sum(tl.maximum(p - q, 0.0), 0), 0.0)
            residual = tl.sum(sums_r, 0) > 1e-8  # else DeepSpec's fallback: sample p
            sums = tl.where(residual, sums_r, sums_p)
        elif USE_WS:  # the bonus: chunk sums of p follow from the split-V statistics
            slot = (b * (G + 1) + a).to(tl.int64) * NC
            cm = tl.load(ws_m + slot + chunks, mask=chunks < NC, other=float("-inf"))
            cs = tl.load(ws_s + slot + chunks, mask=chunks < NC, other=0.0)
            sums = tl.where(cm == float("-inf"), 0.0, cs * tl.exp((cm - m) * inv_t)) / s
        else:
            sums = tl.zeros((NC_P2,), tl.float32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                p = _probs(logits_row, idx, idx < V, m, s, inv_t)
                sums += tl.where(chunks == start // CHUNK, tl.sum(p, 0), 0.0)

        # Pass 2: count(cdf <= u * total) = CHUNK * (whole chunks below) + count inside one.
        threshold = tl.load(uniforms_ptr + b64 * (G + 1) + G) * tl.sum(sums, 0)
        prefix = tl.cumsum(sums, 0)
        below = tl.sum(((prefix <= threshold) & (chunks < NC)).to(tl.int32), 0)
        # Past the last chunk with weight only by rounding: stay inside it.
        j = tl.minimum(below, tl.max(tl.where(sums > 0, chunks, 0), 0))
        running = tl.sum(tl.where(chunks == j - 1, prefix, 0.0), 0)
        first = j * CHUNK
        end = tl.minimum(first + CHUNK, V)
        count = 0
        last_positive = first
        for start in range(first, end, BLOCK):
            idx = start + offs
            valid = idx < end
            w = _probs(logits_row, idx, valid, m, s, inv_t)
            if residual:
                w = tl.maximum(w - tl.load(q_row + idx, mask=valid, other=0.0), 0.0)
            cdf = running + tl.cumsum(w, 0)
            count += tl.sum(((cdf <= threshold) & valid).to(tl.int32), 0)
            running += tl.sum(w, 0)
            last_positive = tl.maximum(last_positive, tl.max(tl.where(w > 0, idx, first), 0))
        # The same rounding guard inside the chunk: never a token of zero weight (which may be
        # a masked or padded entry) where the shared rule would clamp to V - 1.
        token = tl.where(count < end - first, first + count, last_positive)

    tl.store(accepted_ptr + b, a.to(tl.int64))
    slots = tl.arange(0, G1_P2)
    drafts = tl.load(draft_ids_ptr + b64 * G + slots, mask=slots < a, other=-1)
    out = tl.where(slots == a, token.to(tl.int64), drafts)
    tl.store(tokens_ptr + b64 * (G + 1) + slots, out, mask=slots < G + 1)
