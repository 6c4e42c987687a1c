"""The neural mirror map: a learned convex potential h whose Bregman divergence regularises GRPO.

126 units in 6 families of 21, u_j = w_j*y + b_j, activations act_j in
(u^3, u^2, sqrt(u), cbrt(u), log(u + 1e-3), exp(u)):

    phi_inv(y) = sum_j v_j*act_j(u_j) + a*y + c*log(y)           (= h'(y))
    h(y)       = sum_j v_j*H_j(y) + a*y^2/2 + c*(y*log(y) - y)    (H_j' = act_j(u_j))
    D(y || y0) = h(y) - h(y0) - phi_inv(y0)*(y - y0)

With v, w, b, a, c >= 0 (project_), phi_inv is increasing, h is convex and D >= 0.
H_j = F_j(u_j)/w_j (F_j' = act_j) divides by a tiny w_j, so D is never formed as a difference
of h values. With d = y - y0, u0_j = w_j*y0 + b_j and e_j = w_j*d (= u_j - u0_j):

    D = d * (sum_j v_j*E_j + a*d/2 + c*K),   E_j = (F_j(u_j) - F_j(u0_j))/e_j - act_j(u0_j),
                                             K   = (y*log(y/y0) - d)/d

each E_j and K written in closed form as O(d) without subtracting nearly equal numbers
(a series for tiny arguments), in float64. Probabilities are clamped to [1e-30, 1] so that
log(y) is finite.

    python mirror.py plot A.safetensors [B.safetensors ...] --out mirror.png

draws phi_inv and D(p || p_ref) of saved maps (es.py's best_mirror.safetensors) beside their initial
maps and the KL penalty (needs matplotlib).
"""
import argparse
import difflib
import importlib
import math
import os
import sys

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

N_UNITS = 126  # 6 families x 21 units
N_PARAMS = 3 * N_UNITS + 2  # v, w, b, a, c
P_MIN = 1e-30  # probabilities are clamped to [P_MIN, 1]
LOG_EPS = 1e-3  # the log family is log(u + LOG_EPS)
SMALL = 1e-2  # below this the excesses use their series
DIVERGENCES = ("neural_mirror", "kl", "prob_l2", "none")

# series of the excesses below, as x * (c0 + c1*x + ...), for |x| < SMALL (truncation ~1e-16 relative)
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
    """E_j = (F_j(u) - F_j(u0))/e - act_j(u0) with F_j' = act_j, each O(e); u, u0, e = u - u0: (..., 6, 21)."""
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
    """Probabilities as broadcast float64 tensors clamped to [P_MIN, 1], and the output dtype:
    float64 if any input is float64, else float32 (never a half dtype)."""
    ys = [torch.as_tensor(y) for y in ys]
    out = torch.float64 if any(y.dtype == torch.float64 for y in ys) else torch.float32
    return (*torch.broadcast_tensors(*(y.double().clamp(P_MIN, 1.0) for y in ys)), out)


class NeuralMirror(nn.Module):
    """The omega-potential mirror map: v, w, b (126,) and a, c (1,), float32, kept >= 0 by project_().

    Every method takes probabilities of any shape and float dtype, computes in float64 and returns
    float64 for float64 input, else float32. bregman is differentiable w.r.t. both arguments.
    """

    def __init__(self, init_scale=0.01, seed=42):
        super().__init__()
        self.init_scale, self.seed = init_scale, seed
        g = torch.Generator().manual_seed(seed)  # private: the global RNG is left alone

        def draw(n):
            return nn.Parameter(torch.rand(n, generator=g, dtype=torch.float32) * init_scale)

        self.v, self.w, self.b = draw(N_UNITS), draw(N_UNITS), draw(N_UNITS)  # (126,) each
        self.a, self.c = draw(1), draw(1)  # (1,) each

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
        """The potential h(y), with H_j(y) = (F_j(u_j) - F_j(b_j))/w_j (finite as w_j -> 0)."""
        y, out = _prep(y)
        v, w, b, a, c = self._params()
        e = w * y[..., None, None]  # (..., 6, 21) = u - b
        units = ((_acts(b) + _excess(e + b, b, e)) * v).sum((-2, -1))  # sum_j v_j H_j(y) / y
        return (y * (units + a * y / 2) + c * (y * torch.log(y) - y)).to(out)

    def bregman(self, y, y0):
        """D(y || y0) = h(y) - h(y0) - phi_inv(y0)*(y - y0), elementwise, accurate down to y = y0."""
        y, y0, out = _prep(y, y0)
        v, w, b, a, c = self._params()
        d = y - y0  # (...)
        u, u0, e = w * y[..., None, None] + b, w * y0[..., None, None] + b, w * d[..., None, None]  # (..., 6, 21)
        units = (_excess(u, u0, e) * v).sum((-2, -1))  # (...)
        return (d * (units + a * d / 2 + c * _xlogx_excess(y, y0, d))).to(out)

    def forward(self, y, y0):
        """Same as bregman(y, y0)."""
        return self.bregman(y, y0)

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
        """Clamp every parameter to >= 0 in place (keeps h convex and D >= 0); returns self."""
        for p in self.parameters():
            p.clamp_(min=0)
        return self

    def save(self, path):
        """Write v, w, b, a, c (and init_scale, seed as metadata) to a safetensors file, atomically."""
        tensors = {k: p.detach().cpu().contiguous() for k, p in self.named_parameters()}
        tmp = f"{path}.tmp"
        save_file(tensors, tmp, metadata={"init_scale": repr(self.init_scale), "seed": str(self.seed)})
        os.replace(tmp, path)

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
    """Per-token regulariser from the sampled tokens' log-probs under policy (logp) and reference (ref_logp).

    neural_mirror: coef * D_h(p || p_ref);  kl: beta * (exp(lr - lp) - (lr - lp) - 1) (k3);
    prob_l2: coef * (p - p_ref)^2 / 2;  none: zeros (ref_logp may be None).
    Same shape as logp, float32 (float64 for float64 logp), computed in float64, differentiable w.r.t. logp.
    """
    if kind not in DIVERGENCES:
        close = difflib.get_close_matches(str(kind), DIVERGENCES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown divergence {kind!r}{hint} (known: {', '.join(DIVERGENCES)})")
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
        return (coef * 0.5 * (lp.exp() - lr.exp()) ** 2).to(out)
    if mirror is None:
        raise ValueError("divergence 'neural_mirror' needs mirror=NeuralMirror(...)")
    return (coef * mirror.bregman(lp.exp(), lr.exp())).to(out)


# ---------------------------------------------------------------------------- plot

P_REFS = (0.1, 0.5, 0.9)


def plot(paths, out="mirror.png", coef=1.0, beta=1.0):
    """Draw, for each mirror file in `paths` (solid) and the initial map its init_scale and seed give (dashed):
    phi_inv(p), and coef * D(p || p_ref) for p_ref in P_REFS beside beta * the k3 KL penalty on log axes.
    Writes the PNG `out` and returns its path."""
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"{path} is not a file: give mirrors saved by es.py (best_mirror.safetensors) "
                             "or NeuralMirror.save")
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise ValueError("plot needs the matplotlib package: pip install matplotlib") from None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    p = torch.linspace(0.002, 1, 500, dtype=torch.float64)  # (500,)
    fig = Figure(figsize=(4 * (1 + len(P_REFS)), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(P_REFS))
    for k, path in enumerate(paths):
        learned = NeuralMirror.load(path)
        name = os.path.basename(path)
        maps = ((learned, "-", name), (NeuralMirror(learned.init_scale, learned.seed), "--",
                                       f"initial (scale {learned.init_scale:g}, seed {learned.seed})"))
        with torch.no_grad():
            for m, style, label in maps:
                axes[0].plot(p, m.phi_inv(p), style, color=f"C{k}", label=label)
                for ax, ref in zip(axes[1:], P_REFS):
                    ax.plot(p, coef * m.bregman(p, torch.full_like(p, ref)), style, color=f"C{k}")
    for ax, ref in zip(axes[1:], P_REFS):
        x = math.log(ref) - p.log()
        ax.plot(p, beta * (torch.expm1(x) - x), ":", color="black", label="k3 KL: p_ref/p - log(p_ref/p) - 1")
        ax.set(yscale="log", title=f"penalty at p_ref = {ref}", xlabel="p (the token's probability)")
        ax.axvline(ref, color="gray", linewidth=0.5)
        ax.grid(alpha=0.3)
    axes[0].set(title="phi_inv(p) = h'(p)", xlabel="p")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    axes[1].legend(fontsize="small", loc="upper right")
    fig.suptitle(f"Neural mirror maps: solid learned, dashed initial. Penalties: {coef:g} x D_h(p || p_ref) "
                 f"and {beta:g} x k3 KL (log scale)")
    fig.savefig(out, dpi=100)
    return out


def main(argv):
    parser = argparse.ArgumentParser(prog="mirror.py", description="Tools for saved neural mirror maps.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("plot", help="draw phi_inv and D(p || p_ref) of saved maps against their initial maps and KL")
    cmd.add_argument("files", nargs="+", help="mirror files (safetensors from es.py or NeuralMirror.save)")
    cmd.add_argument("--out", default="mirror.png", help="the PNG to write (default mirror.png)")
    cmd.add_argument("--coef", type=float, default=1.0, help="weight of D (e.g. mirror_coefficient; default 1)")
    cmd.add_argument("--beta", type=float, default=1.0, help="weight of the KL penalty (e.g. beta; default 1)")
    args = parser.parse_args(argv)
    try:
        print(plot(args.files, args.out, args.coef, args.beta))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
