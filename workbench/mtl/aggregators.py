"""Gradient aggregators behind one interface: the T x P Jacobian (one row per task) in,
one update direction out, with the task weights it amounts to.

    update, weights = aggregate(jacobian, method="pcgrad")
    update, weights = aggregate(jacobian, "mgda", gramian=tg["gramian"])  # reuse a float64 Gramian

Every stateless method is a function of the Gramian G = J J^T alone (the weights), then one
weighted sum of the rows (the update: one matrix-vector product in the Jacobian's dtype).
The weights are computed on the *normalised* Gramian G / s, s = mean(diag G) (the mean
squared gradient norm), so the overall scale of the gradients (1e-30 or 1e30) cannot break a
solver; every method's weights are invariant to that scale except Nash-MTL's, which are
rescaled back exactly (alpha = alpha_n / sqrt(s)). ``gramian_weights`` gives the weights
from a Gramian without a Jacobian.

The optimisation-based methods solve their problem to a stated tolerance and check the
optimality condition on the answer (a certificate); a failed certificate is a WorkbenchError,
never a silently wrong direction. Tolerances are on the normalised Gramian:

- ``mgda``: exact min-norm point of the convex hull (Wolfe's algorithm, finite); certificate
  min_i (G w)_i >= w.G.w - 1e-10 (the KKT condition: no task gradient points below the
  min-norm point), w >= 0, sum w = 1.
- ``cagrad``: the dual over the simplex solved exactly through a 1-D root search over the
  multiplier of its norm term (each step an exact min-norm problem); certificate: its
  Frank-Wolfe gap <= 1e-9.
- ``nash_mtl``: Newton with a line search on a self-concordant objective (guaranteed
  convergence); certificate max_i |alpha_i (G alpha)_i - 1| <= 1e-9.

Degenerate inputs have a stated answer: all-zero gradients give the zero update; a zero task
gradient or Pareto-stationary gradients (0 in their convex hull, e.g. two opposite ones) are
handled per method below (Nash-MTL has no solution there: a WorkbenchError says so).

Conformance with TorchJD 0.18.0 (``tests/conformance/test_torchjd.py``): ``mean`` = Mean,
``equal`` = Sum, ``pcgrad`` = PCGrad (given the same projection orders), ``imtl_g`` = IMTLG,
``mgda`` = the exact point TorchJD's Frank-Wolfe MGDA approaches (it stops after at most 100
iterations or a step < 1e-3); ``cagrad`` = TorchJD's CAGrad divided by 1 + c^2 (TorchJD
returns 0 where trace(G) < 1e-4, an absolute threshold, or its |g_w| < 1e-4 |J|_F; here the
answer is scale-invariant and 0 only where |g_w| <= 1e-6 of the root-mean-square gradient norm);
``aligned_mtl`` = T x TorchJD's AlignedMTL (its default preference vector is the mean);
``nash_mtl`` = TorchJD's NashMTL(max_norm=0) where its solver converges.

Two methods keep state across steps and need the losses too: ``UncertaintyWeighting``
(Kendall et al., 2018) and ``GradNorm`` (Chen et al., 2018); build them once and call them
every step.

Sign convention: rows are gradients of losses (to descend); the update is a descent
direction to subtract (``param -= lr * update``).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from workbench.errors import WorkbenchError, one_of
from workbench.mtl.gradients import gram64

STATELESS = ("equal", "mean", "pcgrad", "mgda", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl")
STATEFUL = ("uncertainty", "gradnorm")
PARAMS = {"pcgrad": ("seed",), "cagrad": ("c",), "nash_mtl": ("iters",)}

MGDA_TOL = 1e-10  # min-norm KKT, on the normalised Gramian
CAGRAD_TOL = 1e-9  # Frank-Wolfe gap of the CAGrad dual, on the normalised Gramian
NASH_TOL = 1e-9  # max |alpha_i (G alpha)_i - 1|
CAGRAD_ZERO = 1e-6  # |g_w| / sqrt(mean |g_i|^2) below which CAGrad's optimum counts as g_w = 0
PARETO_TOL = 1e-12  # |min-norm point|^2 / mean |g_i|^2 below which 0 is in the hull
RANK_RTOL = 1e-10  # eigenvalues below this times the largest count as zero (IMTL-G, Aligned-MTL)


# --------------------------------------------------------------------------- Gramians


def check_jacobian(jacobian, *, finite: bool = False) -> torch.Tensor:
    """``jacobian`` as a floating [T, P] tensor with T >= 2, else a WorkbenchError. With
    ``finite``, NaN / inf entries are refused now; without, they are caught where they show
    (a non-finite Gramian or update, then named by ``raise_non_finite``), which spares a
    pass over a large Jacobian."""
    if isinstance(jacobian, np.ndarray):
        jacobian = torch.from_numpy(jacobian)
    if not isinstance(jacobian, torch.Tensor):
        raise WorkbenchError(f"the Jacobian must be a [tasks, params] tensor, got {type(jacobian).__name__}")
    j = jacobian.detach()
    if j.ndim != 2 or j.shape[0] < 2 or j.shape[1] < 1:
        raise WorkbenchError(f"need a [tasks, params] Jacobian with at least two tasks and one parameter, got shape "
                             f"{tuple(j.shape)}{' (one task: nothing to aggregate, use its gradient)' if j.ndim == 2 and j.shape[0] == 1 else ''}")
    if not j.is_floating_point():
        raise WorkbenchError(f"the Jacobian must be a floating-point tensor, got dtype {j.dtype}")
    if finite:
        raise_non_finite(j)
    return j


def raise_non_finite(j: torch.Tensor) -> None:
    """A WorkbenchError naming the tasks whose rows hold NaN or inf, if any."""
    bad = [i for i, row in enumerate(j) if not torch.isfinite(row).all()]
    if bad:
        raise WorkbenchError(f"the Jacobian has NaN or infinite entries in the rows of task(s) {bad}")


def _products(j: torch.Tensor) -> np.ndarray:
    if j.dtype == torch.float64 or j.numel() <= (1 << 20):
        return (j.double() @ j.double().T).cpu().numpy()
    return gram64(j.float())


def jacobian_gramian(j: torch.Tensor) -> tuple[np.ndarray, float]:
    """(G / s, sqrt(s)) for the Gramian G = J J^T, s = mean(diag G) (0 for all-zero
    gradients), in float64 at any magnitude: one pass over J when its products neither
    overflow nor underflow, else J is scaled by a power of two (exact) and multiplied again.
    NaN / inf in J is a WorkbenchError naming the tasks."""
    g = _products(j)
    if np.isfinite(g).all() and float(np.diag(g).max()) >= 2.0**-60:
        return normalise_gramian(g)
    raise_non_finite(j)
    m = float(j.abs().max())
    if m == 0.0:
        return np.zeros((j.shape[0],) * 2), 0.0
    e = -math.frexp(m)[1]  # J * 2^e has entries below 1: no overflow, the least underflow
    gn, sigma = normalise_gramian(_products(j * 2.0**e))
    return gn, sigma * 2.0**-e


def check_gramian(gramian, T: int) -> np.ndarray:
    """A Gramian given by the caller as a finite symmetric [T, T] float64 array."""
    if isinstance(gramian, torch.Tensor):
        gramian = gramian.detach().cpu().double().numpy()
    try:
        g = np.asarray(gramian, dtype=np.float64)
    except (TypeError, ValueError):
        raise WorkbenchError(f"gramian must be a [tasks, tasks] float array (J @ J.T), got {type(gramian).__name__}") from None
    if g.shape != (T, T):
        raise WorkbenchError(f"gramian must be [{T}, {T}] (J @ J.T for the {T} tasks of the Jacobian), got shape {g.shape}")
    if not np.isfinite(g).all():
        raise WorkbenchError("gramian has NaN or infinite entries (it must be J @ J.T of finite gradients)")
    d = np.diag(g)
    scale = max(float(d.max()), 0.0)
    if (d < -1e-12 * scale).any() or not np.allclose(g, g.T, rtol=1e-9, atol=1e-12 * scale):
        raise WorkbenchError("gramian is not a Gramian: it must be symmetric with a non-negative diagonal (J @ J.T)")
    return g


def normalise_gramian(g: np.ndarray) -> tuple[np.ndarray, float]:
    """(G / s, sqrt(s)) with s = mean(diag G); (zeros, 0.0) for a zero Gramian."""
    g = (g + g.T) / 2
    s = float(np.mean(np.clip(np.diag(g), 0.0, None)))
    if not s > 0:
        return np.zeros_like(g), 0.0
    return g / s, math.sqrt(s)


def combine(j: torch.Tensor, w: np.ndarray, method: str = "the aggregator") -> torch.Tensor:
    """w @ J in J's dtype (float16 / bfloat16 accumulated in float32): one matrix-vector
    product, memory-bound like the backward passes that wrote J (a float64 accumulation of a
    [8, 22M] float32 Jacobian costs twice the time for an error below one float32 ulp of the
    larger terms); a WorkbenchError if the result is not finite (an overflow of that dtype)."""
    w = np.asarray(w, dtype=np.float64)
    if not np.isfinite(w).all():
        raise WorkbenchError(f"{method} produced non-finite task weights {w.tolist()}")
    if j.dtype in (torch.float16, torch.bfloat16):
        out = (torch.as_tensor(w, dtype=torch.float32, device=j.device) @ j.float()).to(j.dtype)
    else:
        out = torch.as_tensor(w, dtype=j.dtype, device=j.device) @ j
    lo, hi = torch.stack(torch.aminmax(out)).tolist()  # NaN propagates; far faster than isfinite(out).all()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise_non_finite(j)  # NaN / inf in J shows here when the Gramian was given
        raise WorkbenchError(f"{method} produced a non-finite update: the weighted sum of the task gradients (weights "
                             f"{np.round(w, 6).tolist()}) overflows {j.dtype}; rescale the losses")
    return out


# --------------------------------------------------------------------------- solvers


def _affine_min(g: np.ndarray) -> np.ndarray:
    """Barycentric weights (summing to 1) of the point of least norm in the affine hull of
    the points whose Gramian is ``g``."""
    n = len(g)
    k = np.zeros((n + 1, n + 1))
    k[:n, :n] = g
    k[:n, n] = k[n, :n] = 1.0
    rhs = np.zeros(n + 1)
    rhs[n] = 1.0
    sol = np.linalg.lstsq(k, rhs, rcond=None)[0]
    return sol[:n]


def _kkt_gap(g: np.ndarray, w: np.ndarray) -> float:
    gw = g @ w
    return float(w @ gw - gw.min())


def _wolfe(g: np.ndarray, tol: float) -> np.ndarray | None:
    """Wolfe's (1976) min-norm-point algorithm in Gramian form; None if it stalls."""
    T = len(g)
    S = [int(np.argmin(np.diag(g)))]
    x = np.ones(1)
    for _ in range(50 * T + 50):
        w = np.zeros(T)
        w[S] = x
        gw = g @ w
        j = int(np.argmin(gw))
        if gw[j] >= w @ gw - tol or j in S:
            return w
        S.append(j)
        x = np.append(x, 0.0)
        for _ in range(T + 2):  # minor cycles: each drops at least one point
            y = _affine_min(g[np.ix_(S, S)])
            if (y > 1e-15).all():
                x = y
                break
            neg = y <= 1e-15
            den = x - y
            ok = neg & (den > 0)
            ratios = np.full(len(S), np.inf)
            ratios[ok] = x[ok] / den[ok]
            theta = float(min(1.0, ratios.min())) if ok.any() else 0.0
            x = x + theta * (y - x)
            drop = int(np.argmin(ratios)) if ok.any() else int(np.argmin(y))
            keep = [i for i in range(len(S)) if i != drop and x[i] > 1e-15]
            if not keep:
                return None
            S = [S[i] for i in keep]
            x = np.clip(x[keep], 0.0, None)
            x /= x.sum()
        else:
            return None
    return None


def _support_search(g: np.ndarray, tol: float) -> np.ndarray | None:
    """Exhaustive fallback (T <= 12): the affine minimiser of every support, the first (by
    support size) that is in the simplex and satisfies the KKT condition."""
    import itertools

    T = len(g)
    if T > 12:
        return None
    for size in range(1, T + 1):
        for S in itertools.combinations(range(T), size):
            y = _affine_min(g[np.ix_(S, S)])
            if (y < -1e-14).any():
                continue
            w = np.zeros(T)
            w[list(S)] = np.clip(y, 0.0, None) / np.clip(y, 0.0, None).sum()
            if _kkt_gap(g, w) <= tol:
                return w
    return None


def min_norm_weights(gramian, tol: float = MGDA_TOL) -> np.ndarray:
    """Weights on the simplex of the minimum-norm point of the convex hull of the task
    gradients (MGDA; Sener & Koltun 2018), from their Gramian: Wolfe's algorithm on the
    normalised Gramian (exact after finitely many steps), an exhaustive support search if
    rounding stalls it. Certificate, checked: w >= 0, sum w = 1 and
    min_i (G w)_i >= w.G.w - tol * mean(diag G) (KKT), else a WorkbenchError.
    All-zero gradients: the uniform weights (every point of the hull is 0)."""
    g = np.asarray(gramian, dtype=np.float64)
    gn, sigma = normalise_gramian(g)
    T = len(gn)
    if sigma == 0.0:
        return np.full(T, 1.0 / T)
    w = _wolfe(gn, tol / 10)
    if w is None or _kkt_gap(gn, w) > tol:
        w = _support_search(gn, tol)
    if w is None or (w < 0).any() or abs(w.sum() - 1) > 1e-12 or _kkt_gap(gn, w) > tol:
        gap = float("nan") if w is None else _kkt_gap(gn, w)
        raise WorkbenchError(f"mgda: the min-norm solver did not reach its certificate (KKT gap {gap:.3g} > {tol:g} "
                             f"on the normalised Gramian, T = {T}); the Gramian may not be positive semi-definite")
    return w


def _cagrad_dual(gn: np.ndarray, w: np.ndarray, k: float) -> tuple[float, np.ndarray]:
    b = gn.mean(1)
    nrm = math.sqrt(max(float(w @ gn @ w), 0.0))
    return float(b @ w + k * nrm), b + k * (gn @ w) / max(nrm, 1e-300)


def cagrad_weights(gramian, c: float = 0.5) -> np.ndarray:
    """CAGrad's task weights (Liu et al., 2021), from the Gramian.

    The dual over the simplex, min_w F(w) = g_w . g0 + k |g_w| with g0 the mean gradient and
    k = c |g0|, is solved exactly: for a fixed multiplier l > 0, minimising
    g_w . g0 + k |g_w|^2 / (2 l) is the min-norm problem of the shifted points
    g_i + (l / k) g0 (solved exactly by ``min_norm_weights``), and the optimal l is the root
    of l = |g_w(l)|, found by Brent's method on log l between |min-norm point| and
    max_i |g_i| (the bracket always holds). Certificate: the Frank-Wolfe gap of F at the
    answer <= 1e-9 (normalised Gramian). The update d = g0 + k g_w / |g_w| is returned
    divided by 1 + c^2 (the original code's rescaling), so the weights are
    (1/T + k w / |g_w|) / (1 + c^2): TorchJD's CAGrad weights divided by 1 + c^2.

    Degenerate cases: k = 0 (c = 0, or a zero mean gradient) gives d = g0 (the mean
    weights); an optimum at g_w = 0 (|g_w| <= 1e-6 of the root-mean-square gradient norm,
    where float64 cannot resolve it: Pareto-stationary gradients with c large enough) gives
    the zero update, as TorchJD does (its threshold: 1e-4 of |J|_F)."""
    if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c) or c < 0:
        raise WorkbenchError(f"cagrad: c must be a finite number >= 0 (the radius of the ball around the mean gradient, "
                             f"in units of its norm; 0.5 is usual), got {c!r}")
    from scipy.optimize import brentq

    c = float(c)
    gn, sigma = normalise_gramian(np.asarray(gramian, dtype=np.float64))
    T = len(gn)
    mean_w = np.full(T, 1.0 / T)
    m = float(gn.mean())  # |g0|^2
    k = c * math.sqrt(max(m, 0.0))
    if sigma == 0.0 or k <= 1e-12:
        return mean_w / (1 + c**2)
    b = gn.mean(1)

    def inner(log_l: float) -> tuple[float, np.ndarray]:
        t = math.exp(log_l) / k
        shifted = gn + t * (b[:, None] + b[None, :]) + t * t * m
        w = min_norm_weights(shifted)
        r2 = max(float(w @ gn @ w), 0.0)
        return 1.0 - r2 / math.exp(2 * log_l), w

    # the bracket: |min-norm point| <= |g_w| <= max_i |g_i|; below CAGRAD_ZERO the sign of
    # l - |g_w(l)| is not resolved in float64 (|g_w|^2 comes from the Gramian)
    lo = math.sqrt(max(float((w0 := min_norm_weights(gn)) @ gn @ w0), 0.0))
    lo = max(lo * (1 - 1e-12), CAGRAD_ZERO)
    hi = math.sqrt(float(np.diag(gn).max())) * (1 + 1e-12)
    f_lo, w = inner(math.log(lo))
    if f_lo >= 0:  # |g_w| <= CAGRAD_ZERO at the optimum: g_w = 0
        return np.zeros(T)
    f_hi, w = inner(math.log(hi))
    if f_hi < 0:
        raise WorkbenchError(f"cagrad: the bracket of the dual's multiplier failed (|g_w| > max_i |g_i|), T = {T}, c = {c}")
    if f_hi > 0:
        root = brentq(lambda u: inner(u)[0], math.log(lo), math.log(hi), xtol=1e-13, rtol=1e-15, maxiter=200)
        w = inner(root)[1]
    nrm = math.sqrt(max(float(w @ gn @ w), 0.0))
    if nrm <= CAGRAD_ZERO:  # the optimum is g_w = 0 to working precision
        return np.zeros(T)
    _, grad = _cagrad_dual(gn, w, k)
    gap = float(grad @ w - grad.min())
    if not gap <= CAGRAD_TOL:
        raise WorkbenchError(f"cagrad: the dual solver did not reach its certificate (Frank-Wolfe gap {gap:.3g} > "
                             f"{CAGRAD_TOL:g} on the normalised Gramian, T = {T}, c = {c})")
    return (mean_w + k / nrm * w) / (1 + c**2)


def nash_weights(gramian, iters: int = 500) -> np.ndarray:
    """Nash-MTL's alpha (Navon et al., 2022), from the Gramian: the bargaining solution
    alpha > 0 with alpha_i (G alpha)_i = 1 for every task.

    On the normalised Gramian it is the minimiser of the self-concordant
    f(a) = a.G.a / 2 - sum log a_i, found by Newton's method with a backtracking line search (convergence is guaranteed
    for a self-concordant function), the steps taken in the well-conditioned relative
    variables (a_i -> a_i (1 + z_i)); alpha = a / sqrt(mean diag G). Certificate:
    max_i |alpha_i (G alpha)_i - 1| <= 1e-9, else a WorkbenchError. The solution exists iff
    0 is not in the convex hull of the task gradients (duplicates are fine); a zero task
    gradient or Pareto-stationary gradients (e.g. two opposite ones) are a WorkbenchError:
    the weights diverge there. ``iters``: the most Newton steps."""
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
        raise WorkbenchError(f"nash_mtl: iters must be an integer >= 1 (the most Newton steps), got {iters!r}")
    gn, sigma = normalise_gramian(np.asarray(gramian, dtype=np.float64))
    T = len(gn)
    zero = [i for i in range(T) if gn[i, i] <= 1e-24]
    if sigma == 0.0 or zero:
        raise WorkbenchError(f"nash_mtl: task(s) {zero if zero else list(range(T))} have a zero gradient: no weights "
                             "satisfy alpha_i (G alpha)_i = 1 (Nash-MTL is undefined); drop the task or use another method")
    w0 = min_norm_weights(gn)
    d2 = float(w0 @ gn @ w0)
    if d2 <= PARETO_TOL:
        raise WorkbenchError(f"nash_mtl: the task gradients are Pareto-stationary (0 lies in their convex hull: the "
                             f"min-norm point has |d|^2 = {d2:.2g} of the mean squared gradient norm, e.g. opposite "
                             "gradients), where Nash-MTL has no solution (its weights diverge); use 'mgda' or 'cagrad'")
    s = float(np.ones(T) @ gn @ np.ones(T))
    a = np.full(T, math.sqrt(T / s))  # the best multiple of the ones vector

    def f(x: np.ndarray) -> float:
        return 0.5 * float(x @ gn @ x) - float(np.log(x).sum()) if (x > 0).all() else math.inf

    res = a * (gn @ a) - 1
    for _ in range(int(iters)):
        res = a * (gn @ a) - 1  # the gradient in the relative variables z
        if np.abs(res).max() <= NASH_TOL / 10:
            break
        h = a[:, None] * gn * a[None, :] + np.eye(T)
        z = -np.linalg.solve(h, res)
        dec2 = max(float(-res @ z), 0.0)  # the Newton decrement, squared
        # backtracking (Armijo) from the largest step that stays in a > 0 while the decrement
        # exceeds 1/4 (the damped step 1 / (1 + decrement) passes it: damped Newton's
        # guarantee holds), full steps inside the quadratic region (|z_i| <= decrement < 1)
        if dec2 <= 1e-28:
            break  # nothing left to gain in float64
        t = 1.0 if z.min() > -0.99 else 0.99 / -z.min()
        if dec2 > 0.0625:  # outside the quadratic region (decrement 1/4): line search
            fa = f(a)
            while t > 1e-12 and not f(a * (1 + t * z)) <= fa - 0.25 * t * dec2:
                t *= 0.5
        a = a * (1 + t * z)
        if (a <= 0).any() or not np.isfinite(a).all():
            raise WorkbenchError("nash_mtl: a Newton step left the positive orthant (the Gramian may not be "
                                 "positive semi-definite)")
    res = a * (gn @ a) - 1
    if not np.abs(res).max() <= NASH_TOL:
        raise WorkbenchError(f"nash_mtl: Newton did not reach the certificate in {iters} steps (max |alpha_i (G alpha)_i"
                             f" - 1| = {np.abs(res).max():.3g} > {NASH_TOL:g}); raise iters")
    return a / sigma


def kept_spectrum(gramian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of a (normalised) Gramian, without those below
    ``RANK_RTOL`` x the largest (they count as zero: the rows' rank deficiency)."""
    vals, vecs = np.linalg.eigh(gramian)
    keep = vals > vals.max() * RANK_RTOL
    return vals[keep], vecs[:, keep]


def imtl_g_weights(gramian) -> np.ndarray:
    """IMTL-G's weights (Liu et al., 2021), from the Gramian: a summing to 1 such that the
    update has the same projection on every task's unit gradient, (G a)_i = k |g_i|, i.e.
    a = G^+ d / sum(G^+ d) with d_i = |g_i| (the pseudo-inverse generalisation TorchJD uses,
    which handles linearly dependent rows; eigenvalues below 1e-10 x the largest count as
    zero). A task with a zero gradient gets weight 0 (the others are IMTL-G among
    themselves); when sum(G^+ d) vanishes (e.g. two opposite gradients of equal norm: no
    direction but 0 has equal projections) the weights are all 0 and the update is 0, as in
    TorchJD. Where no exact answer exists (opposite gradients of unequal norms, linearly
    dependent rows), G^+ d is the least-squares one, as in TorchJD."""
    gn, sigma = normalise_gramian(np.asarray(gramian, dtype=np.float64))
    T = len(gn)
    if sigma == 0.0:
        return np.zeros(T)
    vals, vecs = kept_spectrum(gn)
    inv = (vecs / vals) @ vecs.T
    d = np.sqrt(np.clip(np.diag(gn), 0.0, None))
    v = inv @ d
    total = float(v.sum())
    if abs(total) <= 1e-10 * float(np.abs(inv).sum()) * float(d.sum()):
        return np.zeros(T)
    return v / total


def aligned_weights(gramian) -> np.ndarray:
    """Aligned-MTL's weights (Senushkin et al., 2023), from the Gramian: the task gradients
    re-conditioned to equal singular values (the smallest non-zero one), then summed: with
    G = V S^2 V^T, w = s_min V S^-1 V^T 1 (eigenvalues below 1e-10 x the largest count as
    zero). T x TorchJD's AlignedMTL weights (its default preference vector is the mean).
    All-zero gradients: weights 1 (TorchJD: the identity), update 0."""
    gn, sigma = normalise_gramian(np.asarray(gramian, dtype=np.float64))
    T = len(gn)
    if sigma == 0.0:
        return np.ones(T)
    vals, v = kept_spectrum(gn)
    s = np.sqrt(vals)
    return s.min() * ((v / s) @ v.T) @ np.ones(T)


def pcgrad_weights(gramian, *, seed: int = 0, orders=None) -> np.ndarray:
    """PCGrad's weights (Yu et al., 2020), from the Gramian: each task gradient is projected
    off the normal plane of every other task gradient it conflicts with, in a random order
    (``orders[i]``: the order for task i, a permutation of range(T); default: drawn from
    ``seed``), then summed. Every projected gradient stays a combination of the task
    gradients: row i of C holds the coefficients of projected gradient i, its dot product with
    g_k is C[i] @ G[:, k], and the weights are C.sum(0). A zero gradient is never projected on
    (its dot products are 0)."""
    gn, _ = normalise_gramian(np.asarray(gramian, dtype=np.float64))
    T = len(gn)
    if orders is None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise WorkbenchError(f"pcgrad: seed must be an integer, got {seed!r}")
        rng = np.random.default_rng(int(seed))
        orders = [rng.permutation(T) for _ in range(T)]
    C = np.eye(T)
    for i in range(T):
        for k in orders[i]:
            k = int(k)
            if k == i:
                continue
            dot = C[i] @ gn[:, k]
            if dot < 0:
                C[i, k] -= dot / gn[k, k]
    return C.sum(0)


# --------------------------------------------------------------------------- the interface


def _check_params(method: str, params: dict) -> None:
    accepted = PARAMS.get(method, ())
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise WorkbenchError(f"aggregator {method!r} takes no parameter(s) {unknown}; it accepts "
                             f"{list(accepted) if accepted else 'none'}")


def _check_method(method) -> None:
    if method in STATEFUL:
        raise WorkbenchError(f"{method!r} keeps state across steps: build "
                             f"{'UncertaintyWeighting' if method == 'uncertainty' else 'GradNorm'}"
                             "(n_tasks) once and call it with the Jacobian and the losses every step")
    if not isinstance(method, str) or method not in STATELESS:
        raise one_of("aggregator", method, STATELESS + STATEFUL)


def _weights(method: str, gn: np.ndarray, sigma: float, params: dict) -> np.ndarray:
    T = len(gn)
    if method == "equal":
        return np.ones(T)
    if method == "mean":
        return np.full(T, 1.0 / T)
    if method == "pcgrad":
        return pcgrad_weights(gn, **params)
    if method == "mgda":
        return min_norm_weights(gn)
    if method == "cagrad":
        return cagrad_weights(gn, **params)
    if method == "imtl_g":
        return imtl_g_weights(gn)
    if method == "nash_mtl":
        return nash_weights(gn, **params) / sigma  # gn has unit mean diagonal: rescale alpha back
    return aligned_weights(gn)


def gramian_weights(gramian, method: str = "equal", **params) -> np.ndarray:
    """The task weights [T] of ``method`` from the float64 Gramian G = J J^T [T, T] alone
    (the update is then weights @ J)."""
    _check_method(method)
    _check_params(method, params)
    if isinstance(gramian, torch.Tensor):
        gramian = gramian.detach().cpu().double().numpy()
    g = np.asarray(gramian, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] < 2:
        raise WorkbenchError(f"gramian must be a square [tasks, tasks] matrix with at least two tasks, got shape {g.shape}")
    g = check_gramian(g, g.shape[0])
    gn, sigma = normalise_gramian(g)
    return _weights(method, gn, sigma, params)


def aggregate(jacobian: torch.Tensor, method: str = "equal", *, gramian=None,
              **params) -> tuple[torch.Tensor, np.ndarray]:
    """One update direction [P] from the Jacobian [T, P], and the task weights it equals
    (update = weights @ jacobian in the Jacobian's dtype; the weights are float64).

    ``gramian``: J @ J.T as a float64 [T, T] array when the caller has it already (a
    ``TaskGradients`` result's ``gramian``; the trainer's monitored steps), so that it is not
    computed again. Bad input (shape, NaN / inf, unknown method or parameter), a solver that
    fails its certificate or an update that overflows the Jacobian's dtype is a
    WorkbenchError."""
    _check_method(method)
    _check_params(method, params)
    j = check_jacobian(jacobian)
    T = j.shape[0]
    if method in ("equal", "mean"):
        w = np.ones(T) if method == "equal" else np.full(T, 1.0 / T)
    else:
        if gramian is not None:
            gn, sigma = normalise_gramian(check_gramian(gramian, T))
        else:
            gn, sigma = jacobian_gramian(j)
        w = _weights(method, gn, sigma, params)
    return combine(j, w, f"aggregator {method!r}"), np.asarray(w, dtype=np.float64)


# One function per method, by its name: the keyword parameters each accepts (the trainer's
# ``aggregator_params``) are read from these signatures.


def pcgrad(j: torch.Tensor, *, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """PCGrad's update and weights (see ``pcgrad_weights``)."""
    return aggregate(j, "pcgrad", seed=seed)


def mgda(j: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """MGDA's update (the min-norm point of the convex hull) and weights (``min_norm_weights``)."""
    return aggregate(j, "mgda")


def cagrad(j: torch.Tensor, *, c: float = 0.5) -> tuple[torch.Tensor, np.ndarray]:
    """CAGrad's update and weights (see ``cagrad_weights``)."""
    return aggregate(j, "cagrad", c=c)


def imtl_g(j: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """IMTL-G's update and weights (see ``imtl_g_weights``)."""
    return aggregate(j, "imtl_g")


def nash_mtl(j: torch.Tensor, *, iters: int = 500) -> tuple[torch.Tensor, np.ndarray]:
    """Nash-MTL's update and alpha (see ``nash_weights``)."""
    return aggregate(j, "nash_mtl", iters=iters)


def aligned_mtl(j: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Aligned-MTL's update and weights (see ``aligned_weights``)."""
    return aggregate(j, "aligned_mtl")


class UncertaintyWeighting:
    """Kendall et al. (2018): loss_i / (2 sigma_i^2) + log sigma_i, with s_i = log sigma_i^2
    learned by SGD alongside the model: weights exp(-s_i)."""

    def __init__(self, n_tasks: int, lr: float = 0.05) -> None:
        self.s = np.zeros(n_tasks)
        self.lr = lr

    def __call__(self, jacobian: torch.Tensor, losses) -> tuple[torch.Tensor, np.ndarray]:
        losses = np.asarray([float(l) for l in losses])
        w = np.exp(-self.s)
        self.s -= self.lr * (-np.exp(-self.s) * losses + 1.0)  # d/ds of exp(-s) L + s
        j = check_jacobian(jacobian)
        return combine(j, w, "uncertainty weighting"), w


class GradNorm:
    """Chen et al. (2018): task weights moved so that each weighted gradient norm tracks
    the mean norm times (relative inverse training rate)^alpha; weights sum to T."""

    def __init__(self, n_tasks: int, alpha: float = 1.5, lr: float = 0.025) -> None:
        self.w = np.ones(n_tasks)
        self.alpha, self.lr = alpha, lr
        self.initial: np.ndarray | None = None

    def __call__(self, jacobian: torch.Tensor, losses) -> tuple[torch.Tensor, np.ndarray]:
        j = check_jacobian(jacobian)
        losses = np.asarray([float(l) for l in losses])
        if self.initial is None:
            self.initial = losses.copy()
        gn, sigma = jacobian_gramian(j)
        norms = np.sqrt(np.clip(np.diag(gn), 0, None)) * sigma
        weighted = self.w * norms
        ratio = losses / self.initial
        target = weighted.mean() * (ratio / ratio.mean()) ** self.alpha
        out = combine(j, self.w.copy(), "gradnorm"), self.w.copy()
        self.w = np.clip(self.w - self.lr * np.sign(weighted - target) * norms / max(norms.mean(), 1e-12), 1e-3, None)
        self.w *= len(self.w) / self.w.sum()
        return out
