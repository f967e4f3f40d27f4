"""The aggregators' numerics: certificates of the optimisation-based ones (min-norm KKT,
the CAGrad dual's Frank-Wolfe gap and its primal, the Nash equation), exact answers in closed
form (two tasks, orthogonal, duplicate and opposite gradients), scale invariance from 1e-30 to
1e30, degenerate inputs, the precomputed-Gramian path and the float32 chunked path; and a
Hypothesis property over random Jacobians."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.errors import WorkbenchError
from workbench.mtl import aggregate
from workbench.mtl.aggregators import (
    STATELESS,
    cagrad_weights,
    gramian_weights,
    min_norm_weights,
    nash_weights,
)

OPTIMISED = ("mgda", "cagrad", "nash_mtl")


def jac(rows) -> torch.Tensor:
    return torch.as_tensor(np.asarray(rows, dtype=np.float64))


def random_j(T: int, P: int = 12, seed: int = 0, kind: str = "random") -> torch.Tensor:
    rng = np.random.default_rng(seed)
    J = rng.normal(size=(T, P))
    if kind == "stationary":  # 0 almost in the hull
        J = J - rng.dirichlet(np.ones(T)) @ J + 1e-3 * rng.normal(size=(T, P))
    if kind == "dominant":
        J[0] *= 100
    return torch.as_tensor(J)


def kkt_gap(G: np.ndarray, w: np.ndarray) -> float:
    """w.G.w - min_i (G w)_i on the Gramian normalised to unit mean diagonal."""
    gn = G / np.mean(np.diag(G))
    gw = gn @ w
    return float(w @ gw - gw.min())


# --------------------------------------------------------------------------- certificates


@pytest.mark.parametrize("kind", ["random", "stationary", "dominant"])
@pytest.mark.parametrize("T", [2, 3, 5, 8])
def test_mgda_is_the_exact_min_norm_point(T, kind):
    J = random_j(T, seed=T, kind=kind)
    G = (J @ J.T).numpy()
    upd, w = aggregate(J, "mgda")
    assert w.min() >= 0 and w.sum() == pytest.approx(1, abs=1e-12)
    gap = kkt_gap(G, w)
    assert gap <= 1e-10, f"KKT gap {gap:.3g}"
    # on the support, every task gradient has exactly the min-norm point's squared norm along it
    d = upd.numpy()
    proj = J.numpy() @ d
    support = w > 1e-9
    assert np.allclose(proj[support], d @ d, rtol=1e-8, atol=1e-12 * np.diag(G).mean()), (proj, d @ d)
    # no point of the hull is shorter: random and vertex points
    rng = np.random.default_rng(1)
    pts = np.vstack([rng.dirichlet(np.ones(T), size=2000), np.eye(T)]) @ J.numpy()
    assert (np.linalg.norm(pts, axis=1) >= np.linalg.norm(d) * (1 - 1e-12)).all()


def test_mgda_frank_wolfe_case_of_the_issue_converges():
    """Nearly conflicting gradients with T >= 3, where a fixed number of Frank-Wolfe steps
    stops with cosine ~0.89 to the exact point: the exact point has a zero KKT gap and equals
    the support's affine minimiser."""
    for seed in range(20):
        J = random_j(4, 40, seed, "stationary")
        G = (J @ J.T).numpy()
        w = min_norm_weights(G)
        assert kkt_gap(G, w) <= 1e-10
        S = w > 0
        gs = G[np.ix_(S, S)]
        k = np.block([[gs, np.ones((S.sum(), 1))], [np.ones((1, S.sum())), np.zeros((1, 1))]])
        y = np.linalg.solve(k, np.r_[np.zeros(S.sum()), 1.0])[:-1]
        assert np.allclose(w[S], y, atol=1e-8)


@pytest.mark.parametrize("c", [0.1, 0.5, 0.9, 2.0])
@pytest.mark.parametrize("kind", ["random", "dominant", "stationary"])
def test_cagrad_solves_its_primal_and_dual(c, kind):
    """The dual's Frank-Wolfe gap is <= 1e-9, and the update (times 1 + c^2) is primal
    optimal: inside the ball |d - g0| <= c |g0| and no point of the ball's sphere (sampled in
    the span of the gradients) has a better worst-task improvement min_i g_i . d."""
    T = 4
    J = random_j(T, 10, seed=int(10 * c), kind=kind).numpy()
    G = J @ J.T
    upd, wts = aggregate(torch.as_tensor(J), "cagrad", c=c)
    d = upd.numpy() * (1 + c**2)
    g0 = J.mean(0)
    r = c * np.linalg.norm(g0)
    assert np.linalg.norm(d - g0) <= r * (1 + 1e-9) + 1e-12
    q, _ = np.linalg.qr(J.T)  # an orthonormal basis of the span
    rng = np.random.default_rng(0)
    u = rng.normal(size=(50000, q.shape[1]))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    cand = g0 + r * u @ q.T
    best = (cand @ J.T).min(1).max()
    ours = (J @ d).min()
    assert ours >= best - 1e-9 * np.diag(G).mean(), (ours, best)
    # the dual: w (from the weights) minimises F on the simplex, certified by the gap
    w = wts * (1 + c**2) - 1 / T
    w /= w.sum()
    gn = G / np.diag(G).mean()
    k = c * math.sqrt(gn.mean())
    grad = gn.mean(1) + k * gn @ w / math.sqrt(w @ gn @ w)
    assert grad @ w - grad.min() <= 1e-9


def test_cagrad_issue_cases_one_dominant_task_and_overflow():
    """One dominant task with T >= 4 (the softmax solver stopped at a corner, objective 52.0
    against 39.2) and the same at 10x and 1e30x scale (its softmax overflowed to NaN): the
    exact optimum, the same weights at every scale."""
    rng = np.random.default_rng(4)
    J = rng.normal(size=(5, 20))
    J[2] *= 30
    base = cagrad_weights(J @ J.T, 0.5)
    for s in (10.0, 1e15, 1e-15):
        Js = torch.as_tensor(J * s)
        upd, w = aggregate(Js, "cagrad")
        assert torch.isfinite(upd).all() and np.allclose(w, base, rtol=1e-9)
    # F at the answer is the minimum over a fine sample of the simplex
    G = J @ J.T
    gn = G / np.diag(G).mean()
    k = 0.5 * math.sqrt(gn.mean())
    F = lambda w: w @ gn.mean(1) + k * np.sqrt(np.einsum("ni,ij,nj->n", w, gn, w))  # noqa: E731
    w_ours = base * 1.25 - 0.2
    w_ours /= w_ours.sum()
    samples = np.random.default_rng(0).dirichlet(np.ones(5) * 0.3, size=200000)
    assert F(w_ours[None])[0] <= F(samples).min() + 1e-12


@pytest.mark.parametrize("kind", ["random", "dominant", "stationary"])
@pytest.mark.parametrize("T", [2, 3, 6, 8])
def test_nash_mtl_solves_the_bargaining_equation(T, kind):
    J = random_j(T, 15, seed=T + 1, kind=kind)
    G = (J @ J.T).numpy()
    upd, a = aggregate(J, "nash_mtl")
    assert (a > 0).all()
    res = np.abs(a * (G @ a) - 1).max()
    assert res <= 1e-9, f"max |a_i (G a)_i - 1| = {res:.3g}"
    assert float(upd @ upd) == pytest.approx(T, rel=1e-8)  # |d|^2 = sum_i a_i (g_i . d) = T


def test_imtl_g_has_equal_projections():
    for T in (2, 3, 6):
        J = random_j(T, 10, seed=T) * torch.linspace(0.1, 10, T)[:, None].double()
        upd, w = aggregate(J, "imtl_g")
        proj = (J / J.norm(dim=1, keepdim=True)) @ upd
        assert np.allclose(proj, proj[0], rtol=1e-10) and w.sum() == pytest.approx(1)


def test_aligned_mtl_equalises_singular_values():
    J = random_j(4, 9, seed=3) * torch.tensor([[1.0], [4.0], [0.5], [2.0]], dtype=torch.float64)
    upd, w = aggregate(J, "aligned_mtl")
    U, S, Vt = np.linalg.svd(J.numpy(), full_matrices=False)
    assert np.allclose(upd.numpy(), (S.min() * U @ Vt).sum(0), rtol=1e-10)


# --------------------------------------------------------------------------- closed forms


def test_two_task_closed_forms():
    g1, g2 = np.array([2.0, 0.0, 1.0]), np.array([-1.0, 1.5, 0.5])
    J = jac([g1, g2])
    # MGDA: gamma = clip((|g2|^2 - g1.g2) / |g1 - g2|^2, 0, 1) on g1
    gamma = np.clip((g2 @ g2 - g1 @ g2) / ((g1 - g2) @ (g1 - g2)), 0, 1)
    assert np.allclose(aggregate(J, "mgda")[1], [gamma, 1 - gamma], atol=1e-14)
    # PCGrad: each projected off the other (they conflict), summed
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    assert np.allclose(aggregate(J, "pcgrad")[0].numpy(), p1 + p2, atol=1e-14)
    # IMTL-G: u . (g1/|g1| - g2/|g2|) = 0 with weights summing to 1
    upd = aggregate(J, "imtl_g")[0].numpy()
    assert upd @ g1 / np.linalg.norm(g1) == pytest.approx(upd @ g2 / np.linalg.norm(g2), rel=1e-12)


def test_orthogonal_gradients():
    n = np.array([1.0, 3.0, 0.5, 2.0])
    J = torch.as_tensor(np.diag(n))  # orthogonal task gradients of norms n
    T = len(n)
    assert np.allclose(aggregate(J, "mgda")[1], (1 / n**2) / (1 / n**2).sum(), atol=1e-14)
    assert np.allclose(aggregate(J, "nash_mtl")[1], 1 / n, rtol=1e-10)
    assert np.allclose(aggregate(J, "imtl_g")[1], (1 / n) / (1 / n).sum(), rtol=1e-12)
    assert np.allclose(aggregate(J, "aligned_mtl")[1], n.min() / n, rtol=1e-12)
    assert np.allclose(aggregate(J, "pcgrad")[1], np.ones(T))  # nothing conflicts
    # CAGrad on orthonormal gradients: by symmetry w = 1/T, d = (1 + c) g0
    for c in (0.3, 0.5, 1.5):
        w = aggregate(torch.eye(T, dtype=torch.float64), "cagrad", c=c)[1]
        assert np.allclose(w, (1 + c) / T / (1 + c**2), rtol=1e-9)


def test_duplicate_and_opposite_gradients():
    g = np.array([1.0, 2.0, -1.0])
    dup = jac([g, g])
    opp = jac([g, -2 * g])
    assert np.allclose(aggregate(dup, "nash_mtl")[1], 1 / (np.linalg.norm(g) * math.sqrt(2)), rtol=1e-10)
    assert np.allclose(aggregate(dup, "mgda")[0].numpy(), g)
    assert np.allclose(aggregate(dup, "imtl_g")[1], [0.5, 0.5])
    # opposite: the min-norm point is 0, IMTL-G has no direction (0), PCGrad projects both away
    upd, w = aggregate(opp, "mgda")
    assert np.allclose(w, [2 / 3, 1 / 3]) and np.abs(upd.numpy()).max() <= 1e-15
    upd, w = aggregate(jac([g, -g]), "imtl_g")  # equal norms: no direction has equal projections but 0
    assert (w == 0).all() and (upd == 0).all()
    # unequal norms: the pseudo-inverse's least-squares answer (TorchJD's generalisation), G^+ d normalised
    assert np.allclose(aggregate(opp, "imtl_g")[1], [-1.0, 2.0])
    assert np.abs(aggregate(opp, "pcgrad")[0].numpy()).max() <= 1e-15
    with pytest.raises(WorkbenchError, match="Pareto-stationary"):
        aggregate(opp, "nash_mtl")
    # CAGrad on the collinear pair g, -2g: with g_w = s g, F = |g|^2 (c |s| - s) / 2 is least at
    # s = 1 (c < 1): g_w = g, d = g0 + c |g0| g / |g| = (c - 1) g / 2
    upd, w = aggregate(opp, "cagrad", c=0.5)
    d = (0.5 - 1) * g / 2
    assert np.allclose(upd.numpy() * 1.25, d, rtol=1e-9)


def test_zero_task_gradient():
    J = jac([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.5, -1.0, 3.0]])
    for m in STATELESS:
        if m == "nash_mtl":
            with pytest.raises(WorkbenchError, match=r"task\(s\) \[1\] have a zero gradient"):
                aggregate(J, m)
            continue
        upd, w = aggregate(J, m)
        assert torch.isfinite(upd).all() and np.isfinite(w).all(), m
    # IMTL-G: the zero task gets weight 0, the others are IMTL-G among themselves
    w = aggregate(J, "imtl_g")[1]
    assert w[1] == 0 and np.allclose(w[[0, 2]], aggregate(J[[0, 2]], "imtl_g")[1])
    # MGDA: the zero gradient is the min-norm point
    assert np.allclose(aggregate(J, "mgda")[1], [0, 1, 0])
    # all zero: the zero update everywhere (Nash-MTL excepted: undefined)
    Z = torch.zeros(3, 4, dtype=torch.float64)
    for m in STATELESS:
        if m != "nash_mtl":
            assert (aggregate(Z, m)[0] == 0).all(), m


# --------------------------------------------------------------------------- scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", [m for m in STATELESS if m not in ("equal", "mean")])
def test_scale_invariance_from_1e_30_to_1e30(method, dtype):
    """aggregate(s J) = s aggregate(J) with the same weights (Nash-MTL: the same update,
    alpha / s), at s = 1e-30 .. 1e30 in float64 and float32."""
    J = random_j(5, 16, seed=11, kind="dominant").to(dtype)
    J = J / J.abs().max()  # entries up to 1: s J stays inside float32
    upd, w = aggregate(J, method)
    for s in (1e-30, 1e-10, 1e10, 1e30):
        us, ws = aggregate(J * s, method)
        assert torch.isfinite(us).all()
        if method == "nash_mtl":
            assert np.allclose(ws * s, w, rtol=1e-6) and torch.allclose(us, upd, rtol=1e-4, atol=1e-5)
        else:
            assert np.allclose(ws, w, rtol=1e-6, atol=1e-9), (method, s, ws, w)
            assert torch.allclose(us / s, upd, rtol=1e-4, atol=1e-6 * float(upd.abs().max()))


# --------------------------------------------------------------------------- plumbing


def test_precomputed_gramian_gives_the_same_answer():
    J = random_j(4, 30, seed=5)
    G = (J @ J.T).numpy()
    for m in STATELESS:
        a = aggregate(J, m)
        b = aggregate(J, m, gramian=G)
        assert torch.allclose(a[0], b[0], rtol=1e-10, atol=1e-14) and np.allclose(a[1], b[1], rtol=1e-10), m
        assert np.allclose(gramian_weights(G, m), a[1], rtol=1e-10), m


def test_float32_large_jacobian_matches_float64():
    """The float32 path: the Gramian by float64-accumulated chunks (no float64 copy of J),
    the update one float32 matrix-vector product."""
    g = torch.Generator().manual_seed(0)
    J = torch.randn(3, (1 << 20) + 7, generator=g)
    J[1] -= 0.9 * J[0]
    for m in ("mgda", "cagrad", "nash_mtl", "pcgrad"):
        u32, w32 = aggregate(J, m)
        u64, w64 = aggregate(J.double(), m)
        assert u32.dtype == torch.float32
        assert np.allclose(w32, w64, rtol=1e-6), m
        assert torch.allclose(u32.double(), u64, rtol=1e-5, atol=1e-6 * float(u64.abs().max())), m


def test_solvers_are_cheap():
    """T = 8 on hard inputs: each solve well under 50 ms (the bench compares it with a
    backward pass)."""
    import time

    J = random_j(8, 20, seed=2, kind="stationary")
    for m in OPTIMISED:
        aggregate(J, m)
        start = time.perf_counter()
        aggregate(J, m)
        assert time.perf_counter() - start < 0.05, m


# --------------------------------------------------------------------------- property


@st.composite
def jacobians(draw):
    T = draw(st.integers(2, 6))
    P = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    exp = draw(st.integers(-30, 30))
    kind = draw(st.sampled_from(["random", "dup", "zero", "dominant", "lowrank", "opposite"]))
    rng = np.random.default_rng(seed)
    J = rng.normal(size=(T, P))
    if kind == "dup":
        J[1] = J[0]
    elif kind == "zero":
        J[-1] = 0
    elif kind == "dominant":
        J[0] *= 1e4
    elif kind == "lowrank":
        J = rng.normal(size=(T, 1)) @ rng.normal(size=(1, P))
    elif kind == "opposite":
        J[1] = -J[0] * rng.uniform(0.1, 10)
    return torch.as_tensor(J * 10.0**exp), 10.0**exp


@settings(max_examples=60, deadline=None, derandomize=True)
@given(jacobians())
def test_every_aggregator_is_finite_certified_and_scales(case):
    J, s = case
    G = (J / s @ (J / s).T).numpy()  # the unscaled Gramian
    for m in STATELESS:
        try:
            upd, w = aggregate(J, m)
        except WorkbenchError as e:
            # the one refusal: Nash-MTL where no solution exists (0 in the hull)
            assert m == "nash_mtl", (m, str(e))
            assert "zero gradient" in str(e) or "Pareto-stationary" in str(e)
            mn = min_norm_weights(G)
            assert mn @ G @ mn <= 1e-11 * np.mean(np.diag(G))
            continue
        assert torch.isfinite(upd).all() and np.isfinite(w).all(), m
        if m == "mgda":
            assert w.min() >= 0 and abs(w.sum() - 1) <= 1e-12 and kkt_gap(G, w) <= 1e-10
        elif m == "nash_mtl":
            a = w * s  # alpha scales as 1 / s
            assert np.abs(a * (G @ a) - 1).max() <= 1e-8
            assert np.allclose(nash_weights(G), a, rtol=1e-6)
        else:  # weights do not depend on the scale
            assert np.allclose(gramian_weights(G, m), w, rtol=1e-6, atol=1e-9), m


def test_trainer_hands_its_monitored_gramian_to_the_aggregator(monkeypatch):
    """On monitored steps the trainer has the float64 Gramian already: the aggregator gets it
    (and its answer equals computing it afresh); other steps compute their own."""
    from torch import nn

    from workbench.mtl import MultiTaskTrainer
    from workbench.mtl import trainer as TR

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6))
            self.heads = nn.ModuleDict({"a": nn.Linear(6, 1), "b": nn.Linear(6, 1)})

        def forward(self, batch):
            h = self.trunk(batch["x"])
            return {k: m(h).squeeze(-1) for k, m in self.heads.items()}

    def data(step):
        g = torch.Generator().manual_seed(step)
        return {"x": torch.randn(8, 4, generator=g), "y": torch.randn(8, generator=g)}

    losses = {"a": lambda o, b: ((o - b["y"]) ** 2).mean(), "b": lambda o, b: ((o + b["y"]) ** 2).mean()}
    seen = []

    def spy(j, method, *, gramian=None, **params):
        out = aggregate(j, method, gramian=gramian, **params)
        if gramian is not None:
            fresh = aggregate(j, method, **params)
            assert np.allclose(out[1], fresh[1], rtol=1e-9) and np.allclose(gramian, (j.double() @ j.double().T).numpy())
        seen.append(gramian is not None)
        return out

    monkeypatch.setattr(TR, "aggregate", spy)
    tr = MultiTaskTrainer(Net(), losses, data, aggregator="mgda", monitor_every=2)
    seen.clear()  # the constructor's trial call on a tiny Jacobian
    tr.fit(4, progress=False)
    assert seen == [True, False, True, False]
