import numpy as np
import pytest
import torch

from mirror import DIVERGENCES, LOG_EPS, N_PARAMS, NeuralMirror, divergence

F64 = torch.float64


def random_mirror(seed=0):
    """Non-negative parameters up to 2, some exactly zero: u = 0 is where sqrt and cbrt are singular."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N_PARAMS, generator=g) * 2
    w, b = 126, 252  # offsets of w and b in the vector
    x[[w + 50, b + 50, w + 70, b + 70]] = 0  # constant sqrt and cbrt units (w = b = 0, v > 0)
    x[[b + 60, b + 80, 0, 378]] = 0  # sqrt and cbrt units through u = 0 at y = 0 (b = 0); v_0; a
    return NeuralMirror().from_vector(x)


MIRRORS = {"scale0.01": lambda: NeuralMirror(0.01), "scale1": lambda: NeuralMirror(1.0), "random": random_mirror}


@pytest.fixture(params=list(MIRRORS))
def mirror(request):
    return MIRRORS[request.param]()


def t64(x):
    return torch.as_tensor(x, dtype=F64)


def integral(m, y, y0, panels=8, nodes=64):
    """int_{y0}^{y} (phi_inv(t) - phi_inv(y0)) dt by Gauss-Legendre on geometric panels, float64."""
    x, wq = np.polynomial.legendre.leggauss(nodes)
    edges = np.geomspace(min(y, y0), max(y, y0), panels + 1)
    mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
    t = t64(mid[:, None] + half[:, None] * x)  # (panels, nodes)
    with torch.no_grad():
        f = (m.phi_inv(t) - m.phi_inv(t64(y0))).numpy()
    total = (half[:, None] * wq * f).sum()
    return total if y >= y0 else -total


def naive_bregman32(m, y, y0):
    """h(y) - h(y0) - phi_inv(y0)*(y - y0) in float32 with H_j = F_j(u_j)/w_j: the form to avoid."""
    v, w, b = (p.detach().view(6, 21) for p in (m.v, m.w, m.b))
    a, c = m.a.detach()[0], m.c.detach()[0]

    def h(y):  # each family's formula is applied to all (6, 21) units, then its own row is kept
        u = w * y + b  # (6, 21)
        z = u + LOG_EPS
        F = torch.stack([u ** 4 / 4, u ** 3 / 3, 2 / 3 * u ** 1.5, 3 / 4 * u ** (4 / 3),
                         z * torch.log(z) - z, torch.exp(u)])[torch.arange(6), torch.arange(6)]
        return (v * F / w).sum() + a * y ** 2 / 2 + c * (y * torch.log(y) - y)

    def phi_inv(y):
        u = w * y + b
        acts = torch.stack([u ** 3, u ** 2, u.sqrt(), u ** (1 / 3), torch.log(u + LOG_EPS), torch.exp(u)])
        return (v * acts[torch.arange(6), torch.arange(6)]).sum() + a * y + c * torch.log(y)

    return h(y) - h(y0) - phi_inv(y0) * (y - y0)


# ----------------------------------------------------------------------------- init and parameters

def test_init_shapes_range_and_seed():
    m = NeuralMirror(0.01, seed=7)
    shapes = {k: tuple(p.shape) for k, p in m.named_parameters()}
    assert shapes == {"v": (126,), "w": (126,), "b": (126,), "a": (1,), "c": (1,)}
    for p in m.parameters():
        assert p.dtype == torch.float32 and not p.requires_grad  # ES learns them, not autograd
        assert (p >= 0).all() and (p < 0.01).all()
    assert torch.equal(m.to_vector(), NeuralMirror(0.01, seed=7).to_vector())
    assert not torch.equal(m.to_vector(), NeuralMirror(0.01, seed=8).to_vector())
    assert torch.allclose(NeuralMirror(1.0, seed=7).to_vector() * 0.01, m.to_vector())


def test_init_order_and_private_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    m = NeuralMirror(0.5, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    g = torch.Generator().manual_seed(3)
    for name, n in [("v", 126), ("w", 126), ("b", 126), ("a", 1), ("c", 1)]:
        assert torch.equal(getattr(m, name).detach(), torch.rand(n, generator=g) * 0.5), name


def test_vector_round_trip_and_order():
    m = NeuralMirror(0.01)
    x = m.to_vector()
    assert x.shape == (380,) and x.dtype == torch.float32
    assert torch.equal(x, torch.cat([m.v, m.w, m.b, m.a, m.c]).detach())
    new = torch.arange(380, dtype=torch.float32)
    m.from_vector(new)
    assert torch.equal(m.to_vector(), new)
    assert m.w[0].item() == 126 and m.b[0].item() == 252 and m.a.item() == 378 and m.c.item() == 379
    with pytest.raises(ValueError, match="380"):
        m.from_vector(torch.zeros(379))


def test_project_clamps_to_non_negative():
    m = NeuralMirror()
    with torch.no_grad():
        for p, chunk in zip(m.parameters(), torch.linspace(-1, 1, 380).split([126, 126, 126, 1, 1])):
            p.copy_(chunk)
    m.project_()
    x = m.to_vector()
    assert (x >= 0).all()
    assert torch.equal(x, torch.linspace(-1, 1, 380).clamp(min=0))


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf")])
def test_a_signed_or_non_finite_map_is_refused_where_it_enters(bad, tmp_path):
    x = NeuralMirror(0.01).to_vector()
    x[200] = bad
    with pytest.raises(ValueError, match=r"NeuralMirror.from_vector: mirror parameters must be finite and >= 0.*1 of "
                                         r"380"):
        NeuralMirror().from_vector(x)
    from safetensors.torch import save_file
    path = tmp_path / "signed.safetensors"
    save_file(dict(zip(["v", "w", "b", "a", "c"], x.split([126, 126, 126, 1, 1]))), str(path))
    with pytest.raises(ValueError, match="signed.safetensors: mirror parameters must be finite and >= 0"):
        NeuralMirror.load(path)


def test_no_map_that_enters_gives_a_negative_or_nan_divergence():
    """Property: random signed parameter vectors either stop where they enter, or (projected, as ES does) give a
    finite D >= 0 on random probabilities, float32 and float64, down to the clamp."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        x = torch.randn(N_PARAMS, generator=g) * 10 ** (trial % 4 - 2)  # signed, scales 0.01 to 10
        with pytest.raises(ValueError, match="must be finite and >= 0"):
            NeuralMirror().from_vector(x)
        m = NeuralMirror().from_vector(x.clamp(min=0))
        y = torch.cat([torch.rand(500, generator=g, dtype=F64) ** 8, t64([1e-30, 1e-12, 1.0, 0.0])])
        y0 = torch.cat([torch.rand(500, generator=g, dtype=F64), t64([1.0, 0.5, 1e-30, 0.3])])
        for dtype in (F64, torch.float32):
            D = m.bregman(y.to(dtype), y0.to(dtype))
            assert torch.isfinite(D).all() and (D >= 0).all(), trial


def test_the_function_matches_the_autograd_form_it_replaced(mirror):
    """Values and gradients (w.r.t. y and y0) equal bench.bregman_autograd's to 1e-12 relative, in float64."""
    from bench import bregman_autograd
    g = torch.Generator().manual_seed(4)
    y = torch.cat([torch.rand(6000, generator=g, dtype=F64), torch.logspace(-30, 0, 100, dtype=F64)])
    near = y[3000:] * (1 + 1e-7 * torch.rand(3100, generator=g, dtype=F64))  # pairs where the forms cancel most
    y0 = torch.cat([torch.rand(3000, generator=g, dtype=F64), near]).clamp(max=1)
    ours, theirs = [(y.clone().requires_grad_(), y0.clone().requires_grad_()) for _ in range(2)]
    D, ref = mirror.bregman(*ours), bregman_autograd(mirror, *theirs)
    upstream = torch.rand(len(y), generator=g, dtype=F64)
    (D * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert ((D - ref).abs() <= 1e-12 * ref.abs()).all()
    for mine, want in ((ours[0].grad, theirs[0].grad), (ours[1].grad, theirs[1].grad)):
        assert torch.isfinite(mine).all()
        assert ((mine - want).abs() <= 1e-12 * want.abs() + 1e-15 * want.abs().max()).all()


def test_the_mirrors_parameters_get_no_gradient_and_say_so():
    m = NeuralMirror(0.01)
    assert not any(p.requires_grad for p in m.parameters())
    y = torch.rand(8, dtype=F64, requires_grad=True)
    m.bregman(y, t64([0.5] * 8)).sum().backward()  # the policy's side gets its gradient
    m.requires_grad_(True)
    with pytest.raises(ValueError, match="no gradient to the mirror's parameters"):
        m.bregman(y, t64([0.5] * 8))
    with torch.no_grad():
        assert m.bregman(y, t64([0.5] * 8)).shape == (8,)  # no gradient asked: fine


def test_save_load_round_trip(tmp_path):
    m = random_mirror(3)
    m.init_scale, m.seed = 0.5, 11
    path = tmp_path / "mirror.safetensors"
    m.save(path)
    loaded = NeuralMirror.load(path)
    assert torch.equal(loaded.to_vector(), m.to_vector())
    assert (loaded.init_scale, loaded.seed) == (0.5, 11)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "other.safetensors"
    save_file({"v": torch.zeros(126), "w": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="not a mirror file"):
        NeuralMirror.load(path)


# ----------------------------------------------------------------------------- the divergence

def test_zero_on_the_diagonal(mirror):
    y = torch.cat([torch.logspace(-30, 0, 200, dtype=F64), torch.rand(200, dtype=F64)])  # (400,)
    D = mirror.bregman(y, y.clone())
    assert D.dtype == F64 and D.abs().max().item() < 1e-15


def test_non_negative_on_a_grid(mirror):
    g = torch.Generator().manual_seed(1)
    edges = t64([1e-30, 1e-12, 1e-6, 0.5, 1 - 1e-7, 1.0])
    p = torch.cat([edges, 1e-6 + (1 - 1e-6) * torch.rand(150, generator=g, dtype=F64)])  # (156,)
    D = mirror.bregman(p[:, None], p[None, :])  # (156, 156)
    assert torch.isfinite(D).all() and (D >= 0).all()
    assert (D[~torch.eye(len(p), dtype=torch.bool)] > 0).all()  # strictly convex h: D > 0 off the diagonal


def test_h_and_phi_inv_consistent(mirror):
    y = (torch.rand(64, dtype=F64) * 0.98 + 0.01).requires_grad_()
    mirror.h(y).sum().backward()
    assert torch.allclose(y.grad, mirror.phi_inv(y.detach()), rtol=1e-9, atol=1e-12)  # h' = phi_inv
    y, y0 = t64([0.9, 0.01, 0.3]), t64([0.1, 0.7, 0.8])  # far pairs: the naive form is fine in float64
    naive = mirror.h(y) - mirror.h(y0) - mirror.phi_inv(y0) * (y - y0)
    assert torch.allclose(mirror.bregman(y, y0), naive, rtol=1e-9)


def test_gradient_is_phi_inv_difference(mirror):
    g = torch.Generator().manual_seed(2)
    y = torch.rand(300, generator=g, dtype=F64).requires_grad_()
    y0 = torch.cat([torch.rand(200, generator=g, dtype=F64), y[200:].detach() * (1 + 1e-9)])
    mirror.bregman(y, y0).sum().backward()
    expected = mirror.phi_inv(y.detach()) - mirror.phi_inv(y0)
    assert torch.isfinite(y.grad).all()
    scale = mirror.phi_inv(y0).abs().max()  # expected itself cancels to ~1e-16 of this on near pairs
    assert ((y.grad - expected).abs() <= 1e-8 * expected.abs() + 1e-14 * scale).all()


def test_gradient_at_clamp_edges():
    m = NeuralMirror(0.01)
    y = t64([1.0, 0.0]).requires_grad_()
    m.bregman(y, t64([0.5, 0.5])).sum().backward()
    assert y.grad[0] > 0  # p = 1 (log-prob 0) still gets a gradient
    assert y.grad[1] == 0  # below the clamp there is none


@pytest.mark.parametrize("y,y0", [(0.9, 0.1), (0.01, 0.7), (1.0, 1e-6), (0.5 * (1 + 1e-3), 0.5),
                                  (0.5 * (1 + 1e-6), 0.5), (0.03, 0.03 * (1 + 1e-6)), (0.8, 0.8 * (1 - 1e-3))])
def test_matches_numerical_integral(mirror, y, y0):
    ref = integral(mirror, y, y0)
    D = mirror.bregman(t64(y), t64(y0)).item()
    assert ref > 0 and abs(D - ref) < 1e-4 * ref


@pytest.mark.parametrize("gap", [1e-6, 1e-4, 3e-3, 1e-2, 3e-2, 0.1, 0.5])
def test_matches_integral_across_series_threshold(gap):
    m = NeuralMirror(1.0)  # w up to 1: arguments of the excess series cross the 1e-2 threshold
    y0 = 0.4
    y = y0 * (1 + gap)
    ref = integral(m, y, y0)  # itself good to ~3e-16/gap
    assert abs(m.bregman(t64(y), t64(y0)).item() - ref) < 1e-8 * ref


@pytest.mark.parametrize("scale", [0.01, 1.0])
def test_naive_float32_fails_where_careful_form_holds(scale):
    m = NeuralMirror(scale)
    y0 = torch.tensor(0.5)
    y = torch.tensor(0.5 * (1 + 1e-6))  # float32; a few ulps above y0
    ref = integral(m, y.double().item(), y0.double().item())
    careful = m.bregman(y, y0)  # float32 in, float32 out
    assert careful.dtype == torch.float32
    assert abs(careful.item() - ref) < 1e-4 * ref
    with torch.no_grad():
        naive = naive_bregman32(m, y, y0).item()
    assert abs(naive - ref) > 1.0 * ref  # catastrophic cancellation: not even the order of magnitude


def test_dtypes_half_inputs_accurate_out():
    m = NeuralMirror(0.01)
    g = torch.Generator().manual_seed(4)
    y, y0 = torch.rand(500, generator=g), torch.rand(500, generator=g)
    for half in (torch.bfloat16, torch.float16):
        D = m.bregman(y.to(half), y0.to(half))
        assert D.dtype == torch.float32
        assert torch.equal(D, m.bregman(y.to(half).float(), y0.to(half).float()))
    assert m.bregman(y, y0).dtype == torch.float32
    assert m.bregman(y.double(), y0).dtype == F64
    assert m.phi_inv(y.bfloat16()).dtype == torch.float32 and m.h(y.double()).dtype == F64


def test_broadcast_and_clamp():
    m = NeuralMirror(0.01)
    y, y0 = torch.rand(4, 1, 3, dtype=F64), torch.rand(5, 1, dtype=F64)
    D = m.bregman(y, y0)
    assert D.shape == (4, 5, 3)
    assert torch.equal(D[2, 3], m.bregman(y[2, 0], y0[3].expand(3)))
    assert m.bregman(t64(0.0), t64(0.5)).item() == m.bregman(t64(1e-30), t64(0.5)).item()


# ----------------------------------------------------------------------------- divergence()

def _logps(n=256, seed=5):
    g = torch.Generator().manual_seed(seed)
    return -5 * torch.rand(n, generator=g), -5 * torch.rand(n, generator=g)


def test_kl_k3():
    lp, lr = _logps()
    kl = divergence("kl", lp, lr, beta=0.04)
    assert kl.dtype == torch.float32 and kl.shape == lp.shape
    assert torch.allclose(kl, 0.04 * (torch.exp(lr - lp) - (lr - lp) - 1), rtol=1e-5, atol=1e-8)
    assert (kl >= 0).all() and (kl > 0).any()
    assert divergence("kl", lp, lp, beta=0.04).abs().max() == 0


def test_prob_l2():
    lp, lr = _logps()
    out = divergence("prob_l2", lp, lr, coef=0.3)
    assert torch.allclose(out, 0.3 * (lp.exp() - lr.exp()) ** 2, rtol=1e-5, atol=1e-10)  # AlignTune's ProbL2


def test_none_is_zeros_without_reference():
    lp, _ = _logps()
    out = divergence("none", lp.view(16, 16), None)
    assert out.shape == (16, 16) and out.dtype == torch.float32 and not out.any()


def test_neural_mirror_is_coef_times_bregman():
    m = random_mirror(1)
    lp, lr = _logps()
    out = divergence("neural_mirror", lp.bfloat16(), lr.bfloat16(), mirror=m, coef=0.2)
    assert out.dtype == torch.float32 and out.shape == lp.shape
    expected = 0.2 * m.bregman(lp.bfloat16().double().exp(), lr.bfloat16().double().exp())
    assert torch.allclose(out, expected.float(), rtol=1e-6, atol=0)
    assert (out >= 0).all() and (out > 0).any()


def test_needs_mirror_and_reference():
    lp, lr = _logps()
    with pytest.raises(ValueError, match="mirror"):
        divergence("neural_mirror", lp, lr, coef=1.0)
    with pytest.raises(ValueError, match="ref_logp"):
        divergence("kl", lp, None, beta=1.0)


def test_unknown_kind_did_you_mean():
    lp, lr = _logps()
    with pytest.raises(ValueError, match="did you mean 'neural_mirror'") as err:
        divergence("neural_mirorr", lp, lr)
    assert all(k in str(err.value) for k in DIVERGENCES)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence("wasserstein", lp, lr)


@pytest.mark.parametrize("kind", ["neural_mirror", "kl", "prob_l2"])
def test_gradient_flows_to_logp(kind):
    m = NeuralMirror(0.01)
    lp, lr = _logps(64)
    lp.requires_grad_()
    divergence(kind, lp, lr, mirror=m, coef=0.5, beta=0.5).sum().backward()
    lpd, lrd = lp.detach().double(), lr.double()
    p, pr = lpd.exp(), lrd.exp()
    expected = {  # d/d logp of each regulariser, by hand
        "neural_mirror": 0.5 * (m.phi_inv(p) - m.phi_inv(pr)) * p,
        "kl": 0.5 * (1 - torch.exp(lrd - lpd)),
        "prob_l2": 0.5 * 2 * (p - pr) * p,
    }[kind]
    assert torch.isfinite(lp.grad).all() and lp.grad.abs().sum() > 0
    assert torch.allclose(lp.grad.double(), expected.detach(), rtol=1e-5, atol=1e-9)


def test_a_file_that_is_not_a_mirror_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not safetensors")
    with pytest.raises(ValueError, match="is not a mirror file"):
        NeuralMirror.load(str(path))
