"""The objectives themselves: each loss against its formula, each update's direction, EMA in closed form.

The other script tests compare a run with another run of the same code (resumed = straight,
two processes = one), which a wrong objective passes. These check the maths, each against an
oracle written here from the papers' formulas (or torch.distributions), on the functions the
scripts' loops call:

- formulas: DCGAN's D loss and both G losses, LSGAN's a/b/c targets, WGAN's critic loss, weight
  clipping and gradient penalty (on a linear critic, whose input gradient is its weight), the
  VAE's reparameterization, reconstruction term, KL and fitted scale; the EMA after k steps;
  D's raw output (a logit or a score, never a probability).
- directions, through main() itself: one more step of a run (resumed from its checkpoint, on a
  set that is one batch) raises D on the reals and lowers it on the fakes, then raises D(G(z))
  (or, for LSGAN and WGAN-GP, lowers the loss as the test computes it); the VAE's step lowers
  the batch's -ELBO; the checkpoint's G_ema is the EMA update of the two checkpoints' G.

tests/test_toy.py trains each script end to end on a set whose answer is known.
"""

import math
import os

import pytest
import torch
import torch.nn as nn

from ganlab import data
import dcgan
import lsgan
from ganlab import training
import vae
import wgan


def logits():
    """Fixed logits/scores over a wide range, both signs: (real, fake), 7 each."""
    real = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.4, 1.5, 4.0])
    fake = torch.tensor([-5.0, -2.0, -0.5, 0.1, 0.7, 2.0, 3.0])
    return real, fake


# -----------------------------------------------------------------------------
# formulas


def log_sigmoid(x):
    return torch.log(1 / (1 + torch.exp(-x.double())))


def test_dcgan_d_loss_is_the_log_likelihood_of_the_right_labels():
    real, fake = logits()
    # -[E log D(x) + E log(1 - D(G(z)))], D = sigmoid(logit), written out in float64
    expected = -(log_sigmoid(real).mean() + torch.log(1 - torch.sigmoid(fake.double())).mean())
    assert dcgan.d_loss(real, fake).item() == pytest.approx(expected.item(), rel=1e-6)
    # a D that calls reals real and fakes fake has a small loss, the reverse a large one
    assert dcgan.d_loss(torch.full((4,), 6.0), torch.full((4,), -6.0)) < 0.01
    assert dcgan.d_loss(torch.full((4,), -6.0), torch.full((4,), 6.0)) > 10


def test_dcgan_g_losses_match_their_flags():
    _, fake = logits()
    non_saturating = -log_sigmoid(fake).mean()                       # min -E log D(G(z))
    saturating = torch.log(1 - torch.sigmoid(fake.double())).mean()  # min E log(1 - D(G(z)))
    assert dcgan.g_loss(fake, "non-saturating").item() == pytest.approx(non_saturating.item(), rel=1e-6)
    assert dcgan.g_loss(fake, "saturating").item() == pytest.approx(saturating.item(), rel=1e-6)
    # what the flag is about: where D rejects a fake confidently (logit -8), the saturating
    # loss's gradient is about D(G(z)) = 3e-4, the non-saturating one's about 1
    for kind, low, high in [("saturating", 1e-4, 1e-3), ("non-saturating", 0.99, 1.0)]:
        x = torch.tensor([-8.0], requires_grad=True)
        dcgan.g_loss(x, kind).backward()
        assert low < -x.grad.item() < high, kind  # both lower the loss by raising D(G(z))


def test_dcgan_bce_is_exact_in_float32_under_bf16_inputs():
    x = torch.tensor([-20.0, -3.0, 0.0, 3.0, 20.0], dtype=torch.bfloat16)
    assert dcgan.bce(x, 1.0).dtype == torch.float32
    assert dcgan.bce(x, 1.0).item() == pytest.approx(-log_sigmoid(x.float()).mean().item(), rel=1e-6)


def test_lsgan_targets_are_a0_b1_c1():
    real, fake = logits()
    a, b, c = 0.0, 1.0, 1.0  # the 0-1 coding of Mao et al. 2017: fakes a = 0, reals b = 1, G wants c = 1
    expected_d = 0.5 * ((real - b) ** 2).mean() + 0.5 * ((fake - a) ** 2).mean()
    expected_g = 0.5 * ((fake - c) ** 2).mean()
    assert lsgan.d_loss(real, fake).item() == pytest.approx(expected_d.item(), rel=1e-6)
    assert lsgan.g_loss(fake).item() == pytest.approx(expected_g.item(), rel=1e-6)
    assert (lsgan.A, lsgan.B, lsgan.C) == (a, b, c)


def test_wgan_critic_and_generator_losses():
    real, fake = logits()
    assert wgan.d_loss(real, fake).item() == pytest.approx((fake.mean() - real.mean()).item(), rel=1e-6)
    assert wgan.g_loss(fake).item() == pytest.approx(-fake.mean().item(), rel=1e-6)


@pytest.mark.parametrize("weight_norm", [0.3, 1.0, 2.5])
def test_wgan_gradient_penalty_of_a_linear_critic_is_closed_form(weight_norm):
    """D(x) = <w, x> + b has the input gradient w everywhere: the penalty is (||w|| - 1)^2
    wherever x^ falls, and its gradient with respect to w is 2 (||w|| - 1) w / ||w||."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 1), nn.Flatten(0))
    with torch.no_grad():
        critic[1].weight.mul_(weight_norm / critic[1].weight.norm())
    real, fake = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    e = torch.rand(6, 1, 1, 1)
    penalty = wgan.gradient_penalty(critic, real, fake, e, torch.autocast("cpu", enabled=False))
    assert penalty.item() == pytest.approx((weight_norm - 1) ** 2, rel=1e-5, abs=1e-7)
    penalty.backward()  # create_graph: the penalty trains the critic
    w = critic[1].weight.detach()
    assert torch.allclose(critic[1].weight.grad, 2 * (weight_norm - 1) * w / weight_norm, atol=1e-6)


def test_wgan_gradient_penalty_is_taken_between_real_and_fake():
    """A critic whose slope is 1 on one side of a plane and 3 on the other: the penalty is 0 for
    points x^ = e x + (1 - e) G(z) that fall on the slope-1 side, 4 on the other."""
    critic = lambda x: torch.where(x[:, 0, 0, 0] < 0, x[:, 0, 0, 0], 3 * x[:, 0, 0, 0])  # noqa: E731
    real, fake = torch.zeros(4, 1, 1, 1), torch.zeros(4, 1, 1, 1)
    real[:, 0, 0, 0] = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    fake[:, 0, 0, 0] = torch.tensor([-3.0, 1.0, 3.0, -1.0])
    e = torch.tensor([0.5, 0.9, 0.5, 0.1]).view(4, 1, 1, 1)  # x^ = -2, -0.8, 2, -0.8
    penalty = wgan.gradient_penalty(critic, real, fake, e, torch.autocast("cpu", enabled=False))
    assert penalty.item() == pytest.approx((0 + 0 + 4 + 0) / 4)


def test_wgan_clip_weights_clips_every_parameter_of_d():
    torch.manual_seed(0)
    D = wgan.Discriminator(16, 8)
    before = {name: p.detach().clone() for name, p in D.named_parameters()}
    wgan.clip_weights(D, 0.01)
    for name, p in D.named_parameters():
        assert torch.equal(p, before[name].clamp(-0.01, 0.01)), name
    assert any((b.abs() > 0.01).any() for b in before.values())  # there was something to clip


@pytest.mark.parametrize("module", [dcgan, lsgan, wgan], ids=["dcgan", "lsgan", "wgan"])
def test_d_outputs_raw_scores_not_probabilities(module):
    """DCGAN's D outputs a logit (the sigmoid lives in the loss), LSGAN's a raw score (the paper:
    no sigmoid), WGAN's critic a raw score: with large weights they leave [0, 1] on both sides."""
    torch.manual_seed(0)
    D = module.Discriminator(16, 8)
    with torch.no_grad():
        D.net[-1].weight.mul_(1000)
    scores = D(torch.rand(64, 3, 16, 16) * 2 - 1)
    assert scores.shape == (64,)
    assert scores.min() < -1 and scores.max() > 2


def test_vae_reparameterization_draws_with_std_exp_half_logvar():
    mu = torch.tensor([[0.5, -2.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(4.0), math.log(0.01)]])  # variances 1, 4, 0.01: std 1, 2, 0.1
    eps = torch.tensor([[1.0, -1.5, 2.0]])
    assert torch.allclose(vae.reparameterize(mu, logvar, eps), torch.tensor([[1.5, -5.0, 0.2]]))
    # statistically, through the model's own forward: z ~ N(mu, exp(logvar))
    torch.manual_seed(0)
    model = vae.VAE(16, 3, 8)
    seen = []
    model.decoder.forward = lambda z: seen.append(z) or torch.zeros(len(z), 3, 16, 16)
    model.encoder.forward = lambda x: (mu.expand(len(x), 3), logvar.expand(len(x), 3))
    model(torch.zeros(20000, 3, 16, 16), torch.randn(20000, 3))
    z = seen[0]
    assert torch.allclose(z.mean(0), mu[0], atol=0.05)
    assert torch.allclose(z.std(0), torch.tensor([1.0, 2.0, 0.1]), rtol=0.03)


def test_vae_elbo_terms_match_torch_distributions():
    torch.manual_seed(0)
    x, x_hat = torch.rand(5, 3, 4, 4) * 2 - 1, torch.rand(5, 3, 4, 4) * 2 - 1
    log_scale = torch.tensor(-1.3)
    normal = torch.distributions.Normal(x_hat.double(), log_scale.double().exp())
    expected = -normal.log_prob(x.double()).flatten(1).sum(1)  # summed over pixels, one per image
    assert torch.allclose(vae.reconstruction_nll(x, x_hat, log_scale).double(), expected, rtol=1e-5)
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    q = torch.distributions.Normal(mu.double(), (0.5 * logvar.double()).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu).double(), torch.ones_like(mu).double())
    expected_kl = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(vae.kl_divergence(mu, logvar).double(), expected_kl, rtol=1e-5)


def test_vae_fitted_scale_maximizes_the_batchs_likelihood():
    torch.manual_seed(0)
    x, x_hat = torch.rand(8, 3, 4, 4), torch.rand(8, 3, 4, 4)
    best = vae.best_log_scale(x, x_hat)
    assert best.item() == pytest.approx(0.5 * math.log(((x - x_hat) ** 2).mean().item()), rel=1e-6)
    nll = lambda s: vae.reconstruction_nll(x, x_hat, torch.tensor(s)).sum().item()  # noqa: E731
    for delta in [-0.05, 0.05]:
        assert nll(best.item() + delta) > nll(best.item())
    # a perfect reconstruction: s stops at the 8-bit grid's rounding noise
    assert vae.best_log_scale(x, x).exp().item() ** 2 == pytest.approx(vae.MIN_SCALE_SQ, rel=1e-5)


def test_ema_after_k_steps_in_closed_form():
    """With G held at p, each update moves ema toward p by the factor (1 - d_t), so after k
    updates from e_0: ema_k = p + (e_0 - p) prod_t d_t, d_t = min(decay, (1 + t) / (10 + t))."""
    decay, steps = 0.8, range(30, 50)  # the warm-up (1 + t) / (10 + t) reaches 0.8 at t = 35
    G, G_ema = nn.Linear(3, 2), nn.Linear(3, 2)
    start = [q.detach().clone() for q in G_ema.parameters()]
    for t in steps:
        training.ema_update(G_ema, G, decay, t)
    factor = math.prod(min(decay, (1 + t) / (10 + t)) for t in steps)
    assert 0.005 < factor < 0.02
    for e, e0, p in zip(G_ema.parameters(), start, G.parameters()):
        assert torch.allclose(e, p + (e0 - p) * factor, atol=1e-6)
    # one update late in training: ema <- decay ema + (1 - decay) G
    before = [q.detach().clone() for q in G_ema.parameters()]
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
    training.ema_update(G_ema, G, decay, 1000)
    for e, e0, p in zip(G_ema.parameters(), before, G.parameters()):
        assert torch.allclose(e, decay * e0 + (1 - decay) * p, atol=1e-6)


# -----------------------------------------------------------------------------
# directions: one step of the scripts' own loop


SIZE, BATCH = 16, 16
COLOURS = torch.tensor([[220, 40, 40], [40, 80, 220]], dtype=torch.uint8)


def two_colour_images(n, size=SIZE, seed=0):
    """n flat images, alternately red and blue, each colour jittered a little: uint8 (n, 3, size, size)."""
    jitter = torch.randint(-10, 11, (n, 3), generator=torch.Generator().manual_seed(seed))
    colours = (COLOURS[torch.arange(n) % 2].int() + jitter).clamp(0, 255).to(torch.uint8)
    return colours[:, :, None, None].expand(n, 3, size, size).contiguous()


@pytest.fixture
def one_batch_set(monkeypatch):
    """The data every script sees here: one batch of BATCH two-colour images."""
    torch.set_num_threads(1)
    bank = two_colour_images(BATCH)
    monkeypatch.setattr(data, "load_images", lambda *args, **kwargs: bank)
    return bank.float() / 127.5 - 1


def step_twice(module, tmp_path, flags):
    """Train one step (an epoch of the one-batch set), then one more by resuming: returns the two
    checkpoints. The second step starts exactly from the first checkpoint's networks."""
    folder = str(tmp_path / "run")
    argv = ["--batch-size", BATCH, "--augment", "none", "--diffaug", "none", "--log-every", 1, "--device", "cpu",
            "--out", folder]
    module.main([str(a) for a in argv + ["--epochs", 1] + flags])
    first = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)
    module.main(["--resume", os.path.join(folder, "checkpoint.pt"), "--epochs", "2"])
    second = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)
    assert (first["step"], second["step"]) == (1, 2)
    return first, second


def networks(module, checkpoint, **kwargs):
    args = checkpoint["args"]
    G = module.Generator(args["image_size"], args["nz"], args["ngf"])
    D = module.Discriminator(args["image_size"], args["ndf"], **kwargs)
    G.load_state_dict(checkpoint["G"])
    D.load_state_dict(checkpoint["D"])
    return G.train(), D.train()  # as the training steps use them: batch statistics


@torch.no_grad()
def scores(D, G, real, nz, batches=16):
    """D's outputs on the reals, and on G's images of `batches` batches of fresh noise, each
    scored as a batch of BATCH as in training: (BATCH,), (batches * BATCH,)."""
    noise = torch.Generator().manual_seed(123)
    on_fakes = [D(G(torch.randn(BATCH, nz, 1, 1, generator=noise))) for _ in range(batches)]
    return D(real), torch.cat(on_fakes)


def log_d(logit):
    return torch.log(torch.sigmoid(logit.double()))


def log_1_minus_d(logit):
    return torch.log(1 - torch.sigmoid(logit.double()))


def dcgan_d(r, f):
    return -log_d(r).mean() - log_1_minus_d(f).mean()  # -[E log D(x) + E log(1 - D(G(z)))]


OBJECTIVES = {  # (D's loss of (D's outputs on reals, on fakes), G's loss of D's outputs on G's images)
    ("dcgan", "non-saturating"): (dcgan_d, lambda g: -log_d(g).mean()),
    ("dcgan", "saturating"): (dcgan_d, lambda g: log_1_minus_d(g).mean()),
    ("lsgan", None): (lambda r, f: 0.5 * ((r - 1) ** 2).mean() + 0.5 * (f ** 2).mean(),
                      lambda g: 0.5 * ((g - 1) ** 2).mean()),
    ("wgan", None): (lambda r, f: f.mean() - r.mean(), lambda g: -g.mean()),
}

GAN_CASES = [(dcgan, ["--g-loss", "non-saturating"]), (dcgan, ["--g-loss", "saturating"]), (lsgan, []),
             (lsgan, ["--d-norm", "none"]),
             (wgan, ["--d-steps", "1", "--gp", "0", "--lr-d", "1e-3", "--lr-g", "1e-3"]),
             (wgan, ["--d-steps", "1", "--gp", "10", "--lr-d", "1e-3", "--lr-g", "1e-3"])]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("module,flags", GAN_CASES,
                         ids=["dcgan-non-saturating", "dcgan-saturating", "lsgan", "lsgan-no-norm", "wgan-clip",
                              "wgan-gp"])
def test_one_d_step_and_one_g_step_move_the_right_way(module, flags, seed, one_batch_set, tmp_path):
    real = one_batch_set
    common = ["--ngf", 8, "--ndf", 8, "--nz", 16, "--ema", 0.9, "--seed", seed] + (
        ["--lr-d", 1e-3, "--lr-g", 1e-3] if module is not wgan else [])
    first, second = step_twice(module, tmp_path, [str(f) for f in common] + flags)
    kwargs = ({"batchnorm": not first["args"]["gp"]} if module is wgan else
              {"batchnorm": first["args"]["d_norm"] == "batch"} if module is lsgan else {})
    G1, D1 = networks(module, first, **kwargs)
    G2, D2 = networks(module, second, **kwargs)
    nz = first["args"]["nz"]
    real1, fake1 = scores(D1, G1, real, nz)  # before the step
    real2, fake2 = scores(D2, G1, real, nz)  # after the D step, on the same G
    _, gen2 = scores(D2, G2, real, nz)       # after the G step, scored by the D it was trained against
    d_objective, g_objective = OBJECTIVES[module.__name__, first["args"].get("g_loss")]
    # the D step lowers D's loss (as written here from the paper) and widens D's gap between the reals
    # and the fakes (the loss of either alone may rise: the step lowers their sum)
    if module is wgan and first["args"]["gp"]:
        assert gp_loss(D2, G1, real) < gp_loss(D1, G1, real)  # the critic's loss, penalty included
    else:
        assert d_objective(real2, fake2) < d_objective(real1, fake1)
    assert real2.mean() - fake2.mean() > real1.mean() - fake1.mean()
    if module is wgan and not first["args"]["gp"]:  # the loop clips the critic (and only the critic)
        clip = first["args"]["clip"]
        assert all(p.abs().max() <= clip for p in D2.parameters())
        assert any(p.abs().max() > clip for p in G2.parameters())
    # the G step lowers G's loss against the D it was trained against, and raises D(G(z))
    assert g_objective(gen2) < g_objective(fake2)
    assert gen2.mean() > fake2.mean()
    # the samples' network is the EMA of G: G_ema <- d G_ema + (1 - d) G, d = min(0.9, 2 / 11) at step 1
    d = min(0.9, (1 + 1) / (10 + 1))
    for name, value in second["G_ema"].items():
        assert torch.allclose(value, d * first["G_ema"][name] + (1 - d) * second["G"][name], atol=1e-6), name


def gp_loss(D, G, real, gp=10.0, batches=16):
    """WGAN-GP's critic loss, E D(G(z)) - E D(x) + gp E (||grad D(x^)|| - 1)^2, averaged over fresh
    noise and interpolation points; the input gradient by autograd, per image."""
    noise = torch.Generator().manual_seed(7)
    total = 0.0
    for _ in range(batches):
        fake = G(torch.randn(BATCH, 16, 1, 1, generator=noise)).detach()
        e = torch.rand(BATCH, 1, 1, 1, generator=noise)
        x_hat = (e * real + (1 - e) * fake).requires_grad_(True)
        grad, = torch.autograd.grad(D(x_hat).sum(), x_hat)
        penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
        total += (D(fake).mean() - D(real).mean() + gp * penalty).item()
    return total / batches


def test_dcgan_loop_passes_the_g_loss_flag(one_batch_set, tmp_path, monkeypatch):
    kinds = []
    real_g_loss = dcgan.g_loss
    monkeypatch.setattr(dcgan, "g_loss", lambda d_gen, kind: kinds.append(kind) or real_g_loss(d_gen, kind))
    flags = ["--ngf", "8", "--ndf", "8", "--epochs", "2", "--g-loss", "saturating", "--batch-size", str(BATCH),
             "--diffaug", "none",
             "--device", "cpu", "--out", str(tmp_path / "run")]
    dcgan.main(flags)
    assert kinds == ["saturating", "saturating"]


def test_vae_step_lowers_the_batchs_negative_elbo(one_batch_set, tmp_path, monkeypatch):
    """One more VAE step (its training split is 15 of the 16 images, one batch of 15) lowers the
    -ELBO of those images, computed here with torch.distributions and the batch's fitted scale."""
    torch.set_num_threads(1)
    folder = str(tmp_path / "run")
    argv = ["--batch-size", 15, "--holdout", 0.05, "--latent", 4, "--width", 8, "--augment", "none",
            "--lr", 3e-3, "--device", "cpu", "--out", folder]
    vae.main([str(a) for a in argv + ["--epochs", 1]])
    first = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)
    vae.main(["--resume", os.path.join(folder, "checkpoint.pt"), "--epochs", "2"])
    second = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)
    assert (first["step"], second["step"]) == (1, 2)
    n = len(one_batch_set)
    train = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:-1]  # vae.py's split
    x = one_batch_set[train]

    def neg_elbo(checkpoint):
        model = vae.VAE(SIZE, 4, 8)
        model.load_state_dict(checkpoint["model"])
        noise, total = torch.Generator().manual_seed(5), 0.0
        with torch.no_grad():
            for _ in range(32):
                mu, logvar = model.encoder(x)
                std = (0.5 * logvar).exp()
                q = torch.distributions.Normal(mu, std)
                z = mu + std * torch.randn(mu.shape, generator=noise)
                x_hat = model.decoder(z)
                scale = ((x - x_hat) ** 2).mean().sqrt()
                recon = -torch.distributions.Normal(x_hat, scale).log_prob(x).flatten(1).sum(1)
                kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
                total += (recon + kl).mean().item()
        return total / 32

    assert neg_elbo(second) < neg_elbo(first)
