"""Gradient aggregators behind one interface: the T x P Jacobian (one row per task) in,
one update direction out, with the task weights it amounts to.

    update, weights = aggregate(jacobian, method="pcgrad")

Stateless methods work from the Jacobian or its Gramian alone. Two methods keep state
across steps and need the losses too: ``UncertaintyWeighting`` (Kendall et al., 2018)
and ``GradNorm`` (Chen et al., 2018); build them once and call them every step.

Sign convention: rows are gradients of losses (to descend); the update is a descent
direction to subtract (``param -= lr * update``).
"""

from __future__ import annotations

import numpy as np
import torch

from workbench.errors import WorkbenchError, one_of

STATELESS = ("equal", "mean", "pcgrad", "mgda", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl")
STATEFUL = ("uncertainty", "gradnorm")


def _gram(j: torch.Tensor) -> np.ndarray:
    j64 = j.double()
    return (j64 @ j64.T).cpu().numpy()


def _from_weights(j: torch.Tensor, w: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    return (torch.as_tensor(w, dtype=torch.float64, device=j.device) @ j.double()).to(j.dtype), np.asarray(w, float)


def min_norm_weights(g: np.ndarray, iters: int = 250, tol: float = 1e-10) -> np.ndarray:
    """Weights on the simplex of the minimum-norm point of the convex hull of the rows
    (MGDA; Sener & Koltun 2018), from the Gramian: exact for two tasks, Frank-Wolfe with
    exact line search otherwise."""
    T = g.shape[0]
    if T == 2:
        a, b, c = g[0, 0], g[1, 1], g[0, 1]
        denom = a + b - 2 * c
        gamma = 0.5 if denom <= 0 else float(np.clip((b - c) / denom, 0.0, 1.0))
        return np.array([gamma, 1 - gamma])
    w = np.full(T, 1.0 / T)
    for _ in range(iters):
        grad = g @ w
        t = int(np.argmin(grad))
        d = -w.copy()
        d[t] += 1
        # minimise |(w + s d)|_G^2 over s in [0, 1]
        dgd = d @ g @ d
        if dgd <= 0:
            break
        s = float(np.clip(-(w @ g @ d) / dgd, 0.0, 1.0))
        if s * np.abs(d).max() < tol:
            break
        w = w + s * d
    return w


def pcgrad(j: torch.Tensor, *, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """PCGrad (Yu et al., 2020): each task gradient is projected off the normal plane of
    every other task gradient it conflicts with (in a random order), then summed.

    Every projected gradient stays a combination of the task gradients, so the method runs
    on the Gramian: row i of ``C`` holds the coefficients of projected gradient i, its dot
    product with g_k is ``C[i] @ G[:, k]``, and the update is ``C.sum(0) @ J`` (exactly
    the task weights it amounts to)."""
    rng = np.random.default_rng(seed)
    G = _gram(j)
    T = G.shape[0]
    C = np.eye(T)
    for i in range(T):
        for k in rng.permutation(T):
            if k == i:
                continue
            dot = C[i] @ G[:, k]
            if dot < 0:
                C[i, k] -= dot / G[k, k]
    return _from_weights(j, C.sum(0))


def cagrad(j: torch.Tensor, *, c: float = 0.5) -> tuple[torch.Tensor, np.ndarray]:
    """CAGrad (Liu et al., 2021): d = g0 + sqrt(phi) / |g_w| g_w with g0 the mean gradient,
    phi = c^2 |g0|^2 and w = argmin over the simplex of g_w . g0 + sqrt(phi) |g_w|; the
    update is d / (1 + c^2) (the original code's rescaling)."""
    from scipy.optimize import minimize

    G = _gram(j)
    T = G.shape[0]
    g0_g = G.mean(1)  # g_i . g0
    g0_norm2 = float(G.mean())
    sqrt_phi = c * np.sqrt(max(g0_norm2, 0.0))

    def objective(x):
        w = np.exp(x) / np.exp(x).sum()
        return float(w @ g0_g + sqrt_phi * np.sqrt(max(w @ G @ w, 1e-20)))

    best = min((minimize(objective, x0, method="Nelder-Mead" if T <= 3 else "BFGS",
                         options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 4000} if T <= 3 else {"gtol": 1e-10})
                for x0 in [np.zeros(T), *np.eye(T) * 3]), key=lambda r: r.fun)
    w = np.exp(best.x) / np.exp(best.x).sum()
    gw_norm = np.sqrt(max(w @ G @ w, 1e-20))
    coef = np.full(T, 1.0 / T) + sqrt_phi / gw_norm * w
    return _from_weights(j, coef / (1 + c**2))


def imtl_g(j: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """IMTL-G (Liu et al., 2021): weights a (summing to 1) such that the update has the
    same projection on every task's unit gradient."""
    g = j.double()
    u = g / g.norm(dim=1, keepdim=True)
    D = (g[:1] - g[1:])  # [T-1, P]
    U = (u[:1] - u[1:])
    a_rest = (g[0] @ U.T) @ torch.linalg.inv(D @ U.T)
    a = torch.cat([1 - a_rest.sum()[None], a_rest]).cpu().numpy()
    return _from_weights(j, a)


def nash_mtl(j: torch.Tensor, *, iters: int = 100) -> tuple[torch.Tensor, np.ndarray]:
    """Nash-MTL (Navon et al., 2022): the bargaining solution alpha > 0 with
    alpha_i (G alpha)_i = 1 for every task; update = sum alpha_i g_i.

    That condition is the stationary point of the convex f(a) = a.G.a / 2 - sum log a_i,
    found by damped Newton steps kept inside a > 0 (unique when the task gradients are
    linearly independent)."""
    G = _gram(j)
    scale = np.sqrt(np.mean(np.diag(G)))
    Gs = G / scale**2  # solve on a unit scale; alpha scales as 1/|g|
    T = G.shape[0]
    f = lambda a: 0.5 * a @ Gs @ a - np.log(a).sum()  # noqa: E731
    a = np.ones(T)
    for _ in range(iters):
        grad = Gs @ a - 1 / a
        if np.abs(grad * a).max() < 1e-12:
            break
        step = -np.linalg.solve(Gs + np.diag(1 / a**2), grad)
        t = 1.0
        while (a + t * step <= 0).any() or f(a + t * step) > f(a) + 1e-4 * t * grad @ step:
            t /= 2
            if t < 1e-12:
                break
        a = a + t * step
    return _from_weights(j, a / scale)


def aligned_mtl(j: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Aligned-MTL (Senushkin et al., 2023): the task gradients re-conditioned to equal
    singular values (the smallest one), then summed: with J J^T = V S^2 V^T, the weights
    are sigma_min V S^-1 V^T 1."""
    G = _gram(j)
    vals, vecs = np.linalg.eigh(G)
    keep = vals > vals.max() * 1e-10
    s = np.sqrt(vals[keep])
    v = vecs[:, keep]
    w = s.min() * (v @ np.diag(1 / s) @ v.T) @ np.ones(G.shape[0])
    return _from_weights(j, w)


def aggregate(jacobian: torch.Tensor, method: str = "equal", **params) -> tuple[torch.Tensor, np.ndarray]:
    """One update direction [P] from the Jacobian [T, P], and the task weights it equals."""
    j = torch.as_tensor(jacobian)
    if j.ndim != 2 or j.shape[0] < 2:
        raise WorkbenchError(f"need a [tasks, params] Jacobian with at least two tasks, got shape {tuple(j.shape)}")
    if not torch.isfinite(j).all():
        raise WorkbenchError("the Jacobian has NaN or infinite entries")
    T = j.shape[0]
    if method == "equal":
        return _from_weights(j, np.ones(T))
    if method == "mean":
        return _from_weights(j, np.full(T, 1.0 / T))
    if method == "pcgrad":
        return pcgrad(j, **params)
    if method == "mgda":
        return _from_weights(j, min_norm_weights(_gram(j)))
    if method == "cagrad":
        return cagrad(j, **params)
    if method == "imtl_g":
        return imtl_g(j)
    if method == "nash_mtl":
        return nash_mtl(j, **params)
    if method == "aligned_mtl":
        return aligned_mtl(j)
    if method in STATEFUL:
        raise WorkbenchError(f"{method!r} keeps state across steps: build {'UncertaintyWeighting' if method == 'uncertainty' else 'GradNorm'}"
                             "(n_tasks) once and call it with the Jacobian and the losses every step")
    raise one_of("aggregator", method, STATELESS + STATEFUL)


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
        return _from_weights(torch.as_tensor(jacobian), w)


class GradNorm:
    """Chen et al. (2018): task weights moved so that each weighted gradient norm tracks
    the mean norm times (relative inverse training rate)^alpha; weights sum to T."""

    def __init__(self, n_tasks: int, alpha: float = 1.5, lr: float = 0.025) -> None:
        self.w = np.ones(n_tasks)
        self.alpha, self.lr = alpha, lr
        self.initial: np.ndarray | None = None

    def __call__(self, jacobian: torch.Tensor, losses) -> tuple[torch.Tensor, np.ndarray]:
        j = torch.as_tensor(jacobian)
        losses = np.asarray([float(l) for l in losses])
        if self.initial is None:
            self.initial = losses.copy()
        norms = np.sqrt(np.diag(_gram(j)))
        weighted = self.w * norms
        ratio = losses / self.initial
        target = weighted.mean() * (ratio / ratio.mean()) ** self.alpha
        out = _from_weights(j, self.w.copy())
        self.w = np.clip(self.w - self.lr * np.sign(weighted - target) * norms / max(norms.mean(), 1e-12), 1e-3, None)
        self.w *= len(self.w) / self.w.sum()
        return out
