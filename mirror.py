"""The neural mirror map: a learned convex potential h whose Bregman divergence regularises GRPO.

126 units in 6 families of 21, u_j = w_j*y + b_j, act_j = F_j' in (u^3, u^2, sqrt(u), cbrt(u), log(u + 1e-3), exp(u)):

    phi_inv(y) = h'(y) = sum_j v_j*act_j(u_j) + a*y + c*log(y)
    h(y)       = sum_j v_j*(F_j(u_j) - F_j(b_j))/w_j + a*y^2/2 + c*(y*log(y) - y)
    D(y || y0) = h(y) - h(y0) - phi_inv(y0)*d = d * (sum_j v_j*E_j + a*d/2 + c*K),   d = y - y0,
    E_j = (F_j(u_j) - F_j(u0_j))/e_j - act_j(u0_j),   u0_j = w_j*y0 + b_j,   e_j = w_j*d,   K = (y*log(y/y0) - d)/d

v, w, b, a, c >= 0 make phi_inv increasing, h convex and D >= 0: a map with a negative or non-finite parameter is
refused where it enters (from_vector, load; ES projects its candidates). h divides by tiny w_j, so D is never a
difference of h values: each E_j and K is O(d) in closed form, subtracting no nearly equal numbers (a series for tiny
arguments), in float64. bregman is one autograd Function over blocks of tokens that keeps one number per token for
backward, dD/dy = phi_inv(y) - phi_inv(y0); the map's own parameters take no gradient (es.py learns them).
"""
import math

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common import atomic_write, did_you_mean

N_UNITS = 126  # 6 families x 21 units
N_PARAMS = 3 * N_UNITS + 2  # v, w, b, a, c
P_MIN = 1e-30  # probabilities are clamped to [P_MIN, 1], so log(y) is finite
LOG_EPS = 1e-3  # the log family is log(u + LOG_EPS)
DIVERGENCES = ("neural_mirror", "kl", "prob_l2", "none")
SMALL = 1e-2  # for |x| < SMALL the excesses use their series, x * (c0 + c1*x + ...), truncated at ~1e-16 relative
_XLOGX_SERIES = tuple((-1) ** (k + 1) / (k * (k + 1)) for k in range(1, 8))  # 1/2, -1/6, 1/12, ...
_EXP_SERIES = tuple(1 / math.factorial(k + 1) for k in range(1, 7))  # 1/2, 1/6, 1/24, ...


def _series(x, coefs):
    """x * (coefs[0] + coefs[1]*x + ...), by Horner."""
    acc = torch.full_like(x, coefs[-1])
    for c in reversed(coefs[:-1]):
        acc = acc * x + c
    return x * acc


def _xlogx_excess(z, z0, dz):
    """(z*log(z/z0) - dz)/dz for z = z0 + dz > 0, z0 > 0: x/2 - x^2/6 + ... with x = dz/z0."""
    x = dz / z0
    small = x.abs() < SMALL
    if small.all():  # the common case: one branch only
        return _series(x, _XLOGX_SERIES)
    q = torch.where(small, 2.0, z / z0)  # the unused branch is kept finite so autograd stays NaN-free
    xs = torch.where(small, 1.0, x)
    return torch.where(small, _series(x, _XLOGX_SERIES), (q * torch.log(q) - xs) / xs)


def _exp_excess(e):
    """(expm1(e) - e)/e = e/2 + e^2/6 + ..."""
    small = e.abs() < SMALL
    if small.all():
        return _series(e, _EXP_SERIES)
    es = torch.where(small, 1.0, e)
    return torch.where(small, _series(e, _EXP_SERIES), (torch.expm1(es) - es) / es)


def _root(u, k):
    """u**(1/k) for u >= 0, with a finite gradient at u = 0."""
    pos = u > 0
    return torch.where(pos, torch.where(pos, u, 1.0) ** (1 / k), 0.0)


def _acts(u):
    """The six families' activations of u (..., 6, 21)."""
    return torch.stack([u[..., 0, :] ** 3, u[..., 1, :] ** 2, _root(u[..., 2, :], 2), _root(u[..., 3, :], 3),
                        torch.log(u[..., 4, :] + LOG_EPS), torch.exp(u[..., 5, :])], dim=-2)


def _excess(u, u0, e):
    """E_j of every unit, each O(e); u, u0, e = u - u0: (..., 6, 21)."""
    (c, s), (c0, s0), (ce, se) = (x[..., :2, :].unbind(-2) for x in (u, u0, e))  # the cube and square units
    polynomial = torch.stack([ce * (c ** 2 + 2 * c * c0 + 3 * c0 ** 2) / 4,  # cube:   F = u^4/4
                              se * (s + 2 * s0) / 3], dim=-2)  # square: F = u^3/3
    return torch.cat([polynomial, _excess_curved(u[..., 2:, :], u0[..., 2:, :], e[..., 2:, :])], dim=-2)


def _excess_curved(u, u0, e, slope=False):
    """E_j of the sqrt, cbrt, log and exp units, (..., 4, 21) each; slope: also G_j = act_j(u) - act_j(u0), written
    without subtracting nearly equal numbers (dD/dy is the sum of G weighted by v)."""
    u, u0, e = u.unbind(-2), u0.unbind(-2), e.unbind(-2)  # four (..., 21) family blocks each
    s, s0 = _root(u[0], 2), _root(u0[0], 2)
    t, t0 = _root(u[1], 3), _root(u0[1], 3)
    # u = u0 = 0 only for a constant unit (w = b = 0), where e = 0: any non-zero denominator will do
    ds = torch.where(s + s0 > 0, s + s0, 1.0)  # u - u0 = (s - s0)*ds
    dt = t * t + t * t0 + t0 * t0
    dt = torch.where(dt > 0, dt, 1.0)  # u - u0 = (t - t0)*dt
    E = torch.stack([
        e[0] * (2 * s + s0) / (3 * ds ** 2),  # sqrt:   F = (2/3) u^(3/2)
        e[1] * (3 * t * t + 2 * t * t0 + t0 * t0) / (4 * dt ** 2),  # cbrt:   F = (3/4) u^(4/3)
        _xlogx_excess(u[2] + LOG_EPS, u0[2] + LOG_EPS, e[2]),  # log:    F = z log z - z, z = u + 1e-3
        torch.exp(u0[3]) * _exp_excess(e[3]),  # exp:    F = exp(u)
    ], dim=-2)
    if not slope:
        return E
    return E, torch.stack([e[0] / ds, e[1] / dt, torch.log1p(e[2] / (u0[2] + LOG_EPS)),
                           torch.exp(u0[3]) * torch.expm1(e[3])], dim=-2)


def _moments(v, w, b):
    """The five sums over the cube and square units that _polynomial needs: v w^3, v w^2 b, v w b^2; v w^2, v w b."""
    return ([(v[0] * w[0] ** (3 - k) * b[0] ** k).sum() for k in range(3)] +
            [(v[1] * w[1] ** (2 - k) * b[1] ** k).sum() for k in range(2)])


def _polynomial(y, y0, d, moments):
    """(sum_j v_j*E_j, sum_j v_j*G_j, sum_j v_j*w_j*act_j'(u0_j)) over the cube and square units, (n,) each. Their
    terms are polynomials in y and y0, so the sums over units are a few moments of v, w, b, and every term is >= 0
    (times d for E and G): no cancellation. E.g. u^2 + 2*u*u0 + 3*u0^2 = w^2*(y^2 + 2*y*y0 + 3*y0^2) + w*b*(4*y +
    8*y0) + 6*b^2."""
    m3, m2, m1, s2, s1 = moments  # (_moments) cube: v w^3, v w^2 b, v w b^2; square: v w^2, v w b
    E = d * (m3 * (y * y + 2 * y * y0 + 3 * y0 * y0) / 4 + m2 * (y + 2 * y0) + 1.5 * m1 + s2 * (y + 2 * y0) / 3 + s1)
    G = d * (m3 * (y * y + y * y0 + y0 * y0) + 3 * m2 * (y + y0) + 3 * m1 + s2 * (y + y0) + 2 * s1)
    return E, G, 3 * (m3 * y0 * y0 + 2 * m2 * y0 + m1) + 2 * (s2 * y0 + s1)


def _curvature(u0, w):
    """w_j * act_j'(u0_j) of the sqrt, cbrt, log and exp units (..., 4, 21): phi_inv'(y0) is their sum weighted by v,
    the cube and square units' (_polynomial), and a + c/y0. A constant unit (w = 0, where u0 may be 0) adds 0; else
    u0 >= w * P_MIN > 0."""
    u = u0.unbind(-2)
    act = torch.stack([0.5 / _root(u[0], 2), 1 / (3 * _root(u[1], 3) ** 2), 1 / (u[2] + LOG_EPS), torch.exp(u[3])],
                      dim=-2)
    return torch.where(w > 0, w * act, 0.0)


CHUNK = 4096  # tokens per block of the divergence: its (CHUNK, 6, 21) float64 temporaries stay a few MB


class _Bregman(torch.autograd.Function):
    """D(y || y0) of float64 y, y0 (N,), in blocks of CHUNK tokens, keeping for backward one number per token:
    dD/dy = phi_inv(y) - phi_inv(y0) (and dD/dy0 = -phi_inv'(y0) * (y - y0), only when y0 needs a gradient)."""

    @staticmethod
    def forward(ctx, y, y0, v, w, b, a, c):
        D = torch.empty_like(y)
        dy = torch.empty_like(y) if ctx.needs_input_grad[0] else None  # none asked (no_grad, metrics): not computed
        dy0 = torch.empty_like(y) if ctx.needs_input_grad[1] else None
        vc, wc, bc, moments = v[2:], w[2:], b[2:], _moments(v, w, b)  # (4, 21) each: the units summed one by one
        for i in range(0, len(y), CHUNK):
            yi, y0i = y[i:i + CHUNK], y0[i:i + CHUNK]
            d = yi - y0i  # (n,)
            u, u0, e = wc * yi[:, None, None] + bc, wc * y0i[:, None, None] + bc, wc * d[:, None, None]  # (n, 4, 21)
            E, G = _excess_curved(u, u0, e, slope=True) if dy is not None else (_excess_curved(u, u0, e), None)
            pE, pG, pC = _polynomial(yi, y0i, d, moments)
            D[i:i + CHUNK] = d * ((E * vc).sum((-2, -1)) + pE + a * d / 2 + c * _xlogx_excess(yi, y0i, d))
            if dy is not None:
                dy[i:i + CHUNK] = (G * vc).sum((-2, -1)) + pG + a * d + c * torch.log1p(d / y0i)
            if dy0 is not None:
                dy0[i:i + CHUNK] = -d * ((_curvature(u0, wc) * vc).sum((-2, -1)) + pC + a + c / y0i)
        ctx.save_for_backward(dy, dy0)
        return D

    @staticmethod
    def backward(ctx, grad):
        dy, dy0 = ctx.saved_tensors
        return (None if dy is None else grad * dy), (None if dy0 is None else grad * dy0), None, None, None, None, None


def check_parameters(x, where):
    """ValueError, naming `where`, unless every parameter in x (a tensor) is finite and >= 0: with a negative one
    phi_inv may decrease and D turn negative, and sqrt, cbrt and log of a negative u give NaN."""
    x = torch.as_tensor(x).detach().float()
    bad = ~torch.isfinite(x) | (x < 0)
    if bad.any():
        first = x[bad][0].item()
        raise ValueError(f"{where}: mirror parameters must be finite and >= 0 (so that D >= 0), but {int(bad.sum())} "
                         f"of {x.numel()} are not (e.g. {first:g}); project it (NeuralMirror.project_) or give another "
                         "map")


def _prep(*ys):
    """The probabilities broadcast, as float64 clamped to [P_MIN, 1], and the output dtype (see NeuralMirror)."""
    ys = [torch.as_tensor(y) for y in ys]
    out = torch.float64 if any(y.dtype == torch.float64 for y in ys) else torch.float32
    return (*torch.broadcast_tensors(*(y.double().clamp(P_MIN, 1.0) for y in ys)), out)


class NeuralMirror(nn.Module):
    """The omega-potential mirror map: v, w, b (126,) and a, c (1,), float32, kept >= 0 by project_().

    Maps take probabilities of any shape and float dtype, work in float64, return float64 for float64 input, else
    float32 (never a half dtype)."""

    def __init__(self, init_scale=0.01, seed=42):
        super().__init__()
        self.init_scale, self.seed = init_scale, seed
        g = torch.Generator().manual_seed(seed)  # private: the global RNG is left alone
        draws = [torch.rand(n, generator=g, dtype=torch.float32) * init_scale for n in (N_UNITS,) * 3 + (1, 1)]
        # (126,) x 3, (1,) x 2, registered in order; no gradient (ES learns them), as bregman requires
        self.v, self.w, self.b, self.a, self.c = (nn.Parameter(x, requires_grad=False) for x in draws)

    def _params(self):
        v, w, b = (p.double().view(6, 21) for p in (self.v, self.w, self.b))  # (6, 21): family x unit
        return v, w, b, self.a.double()[0], self.c.double()[0]

    def phi_inv(self, y):
        """phi_inv(y) = h'(y), increasing in y."""
        y, out = _prep(y)
        v, w, b, a, c = self._params()
        u = w * y[..., None, None] + b  # (..., 6, 21)
        return ((_acts(u) * v).sum((-2, -1)) + a * y + c * torch.log(y)).to(out)

    def h(self, y):
        """The potential h(y), finite as w_j -> 0."""
        y, out = _prep(y)
        v, w, b, a, c = self._params()
        e = w * y[..., None, None]  # (..., 6, 21) = u - b
        units = ((_acts(b) + _excess(e + b, b, e)) * v).sum((-2, -1))  # sum_j v_j*(F_j(u_j) - F_j(b_j))/(w_j*y)
        return (y * (units + a * y / 2) + c * (y * torch.log(y) - y)).to(out)

    def bregman(self, y, y0):
        """D(y || y0), elementwise, accurate down to y = y0, differentiable w.r.t. both (_Bregman: one number per
        token kept for backward); the mirror's own parameters get no gradient (ES learns them without one)."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise ValueError("NeuralMirror.bregman gives no gradient to the mirror's parameters (es.py learns them "
                             "without one): call mirror.requires_grad_(False), or use mirror.h and phi_inv")
        y, y0, out = _prep(y, y0)
        shape = y.shape
        D = _Bregman.apply(y.reshape(-1), y0.reshape(-1), *self._params())
        return D.view(shape).to(out)

    def to_vector(self):
        """All parameters as one flat float32 tensor (380,) = [v, w, b, a, c]."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()]).float()

    @torch.no_grad()
    def from_vector(self, x):
        """Load parameters from a (380,) vector laid out as to_vector's; returns self."""
        x = torch.as_tensor(x)
        if x.shape != (N_PARAMS,):
            raise ValueError(f"a mirror vector has shape ({N_PARAMS},) = [v, w, b, a, c] of sizes "
                             f"{N_UNITS}, {N_UNITS}, {N_UNITS}, 1, 1; got shape {tuple(x.shape)}")
        check_parameters(x, "NeuralMirror.from_vector")
        for p, chunk in zip(self.parameters(), x.split([N_UNITS, N_UNITS, N_UNITS, 1, 1])):
            p.copy_(chunk)
        return self

    @torch.no_grad()
    def project_(self):
        """Clamp every parameter to >= 0 in place; returns self."""
        for p in self.parameters():
            p.clamp_(min=0)
        return self

    def save(self, path):
        """Write the parameters (init_scale and seed as metadata) to a safetensors file, atomically."""
        tensors = {k: p.detach().cpu().contiguous() for k, p in self.named_parameters()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"init_scale": repr(self.init_scale),
                                                                          "seed": str(self.seed)}))

    @classmethod
    def load(cls, path):
        """A NeuralMirror (on the CPU) read from a file written by save()."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{path} is not a mirror file ({e}): give a best_mirror.safetensors from es.py or a "
                             "file written by NeuralMirror.save") from None
        mirror = cls(float(meta.get("init_scale", 0.01)), int(meta.get("seed", 42)))
        expected = {k: tuple(p.shape) for k, p in mirror.named_parameters()}
        found = {k: tuple(t.shape) for k, t in tensors.items()}
        if found != expected:
            raise ValueError(f"{path} is not a mirror file: expected tensors {expected}, found {found}")
        check_parameters(torch.cat([tensors[k].reshape(-1) for k in expected]), str(path))
        mirror.load_state_dict(tensors)
        return mirror


def divergence(kind, logp, ref_logp, *, mirror=None, coef=0.0, beta=0.0):
    """Per-token regulariser, logp's shape and float32 (float64 for float64 logp), differentiable w.r.t. logp.

    From the sampled tokens' log-probs under policy (logp) and reference (ref_logp), in float64: neural_mirror:
    coef * D_h(p || p_ref); kl: beta * (exp(lr - lp) - (lr - lp) - 1) (k3); prob_l2: coef * (p - p_ref)^2 (AlignTune's
    ProbL2); none: zeros (ref_logp may be None)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}{did_you_mean(kind, DIVERGENCES)}; known: "
                         f"{', '.join(DIVERGENCES)}")
    out = torch.float64 if logp.dtype == torch.float64 else torch.float32
    if kind == "none":
        return torch.zeros(logp.shape, dtype=out, device=logp.device)
    if ref_logp is None:
        raise ValueError(f"divergence {kind!r} needs ref_logp; only 'none' runs without a reference")
    lp, lr = logp.double(), ref_logp.double()
    if kind == "kl":
        x = lr - lp
        return (beta * (torch.expm1(x) - x)).to(out)
    if kind == "prob_l2":
        return (coef * (lp.exp() - lr.exp()) ** 2).to(out)
    if mirror is None:
        raise ValueError("divergence 'neural_mirror' needs mirror=NeuralMirror(...)")
    return (coef * mirror.bregman(lp.exp(), lr.exp())).to(out)
