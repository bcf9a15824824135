"""Field numbers of the Triton kernels' job tables, shared by the kernels (:mod:`.triton_kernels`, which
read them as ``L.NAME``) and the planner that writes the tables (:mod:`.triton_plan`, no Triton import)."""

# update_kernel: one row per 2-D window of a parameter segment
(P, G, M, S, ROWS, COLS, P_LD, G_LD, M_LD, S_LD, N_VALID, N_PAD, COLS_PAD, KIND, V, VR, VC, W, WR, WC, MEAN,
 NOISE_SEED, NOISE_OFF, FIRST, SCALARS) = range(25)
UPDATE_FIELDS = 25
KIND_FULL, KIND_ROWSTAT, KIND_PRE = 0, 1, 2  # v updated per element / per row in the update / before it

# stats_kernel: row sums and partial column sums of g**2
ST_G, ST_ROWS, ST_COLS, ST_LD, ST_PART, ST_ROWSUM, ST_FIRST = range(7)
STATS_FIELDS = 7

# ema_kernel: dst <- beta2 * dst + (1 - beta2) * scale * sum_k src[k * stride + i]
EMA_DST, EMA_SRC, EMA_N, EMA_NPARTS, EMA_STRIDE, EMA_FIRST = range(6)
EMA_FIELDS = 6

# mean_kernel: dst <- max(mean(src[:n]), tiny)
MEAN_SRC, MEAN_N, MEAN_DST = range(3)
MEAN_FIELDS = 3

MOMENTUM_FLOAT, MOMENTUM_STOCHASTIC, MOMENTUM_INT8 = 0, 1, 2
QBLOCK = 256  # slimadam_hf.core.quant.BLOCK
