"""The neural mirror map: a learned convex potential h whose Bregman divergence regularises GRPO.

126 units in 6 families of 21, u_j = w_j*y + b_j, act_j = F_j' in (u^3, u^2, sqrt(u), cbrt(u), log(u + 1e-3), exp(u)):

    phi_inv(y) = h'(y) = sum_j v_j*act_j(u_j) + a*y + c*log(y)
    h(y)       = sum_j v_j*(F_j(u_j) - F_j(b_j))/w_j + a*y^2/2 + c*(y*log(y) - y)
    D(y || y0) = h(y) - h(y0) - phi_inv(y0)*d = d * (sum_j v_j*E_j + a*d/2 + c*K),   d = y - y0,
    E_j = (F_j(u_j) - F_j(u0_j))/e_j - act_j(u0_j),   u0_j = w_j*y0 + b_j,   e_j = w_j*d,   K = (y*log(y/y0) - d)/d

v, w, b, a, c >= 0 (project_) make phi_inv increasing, h convex and D >= 0. h divides by tiny w_j, so D is never a
difference of h values: each E_j and K is O(d) in closed form, subtracting no nearly equal numbers (a series for tiny
arguments), in float64.
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
    q = torch.where(small, 2.0, z / z0)  # the unused branch is kept finite so autograd stays NaN-free
    xs = torch.where(small, 1.0, x)
    return torch.where(small, _series(x, _XLOGX_SERIES), (q * torch.log(q) - xs) / xs)


def _exp_excess(e):
    """(expm1(e) - e)/e = e/2 + e^2/6 + ..."""
    small = e.abs() < SMALL
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
    u, u0, e = u.unbind(-2), u0.unbind(-2), e.unbind(-2)  # six (..., 21) family blocks each
    s, s0 = _root(u[2], 2), _root(u0[2], 2)
    t, t0 = _root(u[3], 3), _root(u0[3], 3)
    # u = u0 = 0 only for a constant unit (w = b = 0), where e = 0: any non-zero denominator will do
    ds = torch.where(s + s0 > 0, s + s0, 1.0)  # u - u0 = (s - s0)*ds
    dt = t * t + t * t0 + t0 * t0
    dt = torch.where(dt > 0, dt, 1.0)  # u - u0 = (t - t0)*dt
    return torch.stack([
        e[0] * (u[0] ** 2 + 2 * u[0] * u0[0] + 3 * u0[0] ** 2) / 4,  # cube:   F = u^4/4
        e[1] * (u[1] + 2 * u0[1]) / 3,  # square: F = u^3/3
        e[2] * (2 * s + s0) / (3 * ds ** 2),  # sqrt:   F = (2/3) u^(3/2)
        e[3] * (3 * t * t + 2 * t * t0 + t0 * t0) / (4 * dt ** 2),  # cbrt:   F = (3/4) u^(4/3)
        _xlogx_excess(u[4] + LOG_EPS, u0[4] + LOG_EPS, e[4]),  # log:    F = z log z - z, z = u + 1e-3
        torch.exp(u0[5]) * _exp_excess(e[5]),  # exp:    F = exp(u)
    ], dim=-2)


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
        self.v, self.w, self.b, self.a, self.c = map(nn.Parameter, draws)  # (126,) x 3, (1,) x 2, registered in order

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
        """D(y || y0), elementwise, accurate down to y = y0, differentiable w.r.t. both."""
        y, y0, out = _prep(y, y0)
        v, w, b, a, c = self._params()
        d = y - y0  # (...)
        u, u0, e = w * y[..., None, None] + b, w * y0[..., None, None] + b, w * d[..., None, None]  # (..., 6, 21)
        units = (_excess(u, u0, e) * v).sum((-2, -1))  # (...)
        return (d * (units + a * d / 2 + c * _xlogx_excess(y, y0, d))).to(out)

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
