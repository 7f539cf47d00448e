"""Unit tests of RPO's formulas (Miao et al. 2024) on hand-computed values."""
import math

import pytest
import torch

from tinyrpo import dreambench
from tinyrpo.rpo import (RPOOptions, align_i, align_t, delta, hard_preference_probability, harmonic_reward, l_pref,
                         preference_probability, rpo_loss, sample_label)


def test_harmonic_reward_paper_example():
    # The paper's worked example (λ = 0.5): two images with the same arithmetic mean 0.455,
    # one that copies the reference but ignores the prompt, one balanced.
    a_i = torch.tensor([0.9, 0.7])
    a_t = torch.tensor([0.01, 0.21])
    h = harmonic_reward(a_i, a_t, 0.5)
    assert h[0].item() == pytest.approx(0.020, abs=5e-4)
    assert h[1].item() == pytest.approx(0.323, abs=5e-4)
    assert ((a_i + a_t) / 2).tolist() == pytest.approx([0.455, 0.455])


def test_harmonic_reward_limits():
    a_i, a_t = torch.tensor([0.8]), torch.tensor([0.3])
    assert harmonic_reward(a_i, a_t, 0.0).item() == pytest.approx(0.3)  # text only (training value)
    assert harmonic_reward(a_i, a_t, 1.0).item() == pytest.approx(0.8)  # image only


def test_harmonic_reward_asymmetric_lambda():
    """λ = 0.3 (the validation default) weighs ALIGN-I by 0.3 and ALIGN-T by 0.7; λ = 0.5 (the paper's example)
    cannot tell λ from 1 − λ, nor ALIGN-I from ALIGN-T."""
    h = harmonic_reward(torch.tensor([0.8]), torch.tensor([0.3]), 0.3).item()
    assert h == pytest.approx(1 / (0.3 / 0.8 + 0.7 / 0.3))  # 0.3692
    assert h != pytest.approx(1 / (0.7 / 0.8 + 0.3 / 0.3), abs=1e-3)  # 0.5333: λ and 1 − λ swapped


def test_alignments_map_cosine_to_unit_interval():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    refs = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # image 0: cos 1 with ref 0 -> 1, cos -1 with ref 1 -> 0; mean 0.5. image 1: cos 0 with both -> 0.5
    assert align_i(e, refs).tolist() == pytest.approx([0.5, 0.5])
    assert align_t(e, torch.tensor([[1.0, 0.0], [0.0, -1.0]])).tolist() == pytest.approx([1.0, 0.0])


def test_bradley_terry_frequencies():
    h_w = torch.full((200_000,), 0.9)
    h_l = torch.full((200_000,), 0.2)
    p = preference_probability(h_w[:1], h_l[:1]).item()
    assert p == pytest.approx(1 / (1 + math.exp(-0.7)))
    y = sample_label(h_w, h_l, generator=torch.Generator().manual_seed(0))
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    assert y.mean().item() == pytest.approx(p, abs=0.005)
    # equal rewards -> a fair coin
    y = sample_label(h_l, h_l, generator=torch.Generator().manual_seed(1))
    assert y.mean().item() == pytest.approx(0.5, abs=0.005)


def test_label_temperature_hand_computed():
    """p = σ((h(w) − h(l)) / τ), each value computed here with math.exp: τ = 1 is eq. (6), τ < 1 sharpens."""
    h_w = torch.tensor([0.9, 0.3, 0.5, 0.62], dtype=torch.float64)
    h_l = torch.tensor([0.2, 0.6, 0.5, 0.60], dtype=torch.float64)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expect = {1.0: [sig(0.7), sig(-0.3), 0.5, sig(0.02)],  # 0.668, 0.426, 0.5, 0.505
              0.1: [sig(7.0), sig(-3.0), 0.5, sig(0.2)],   # 0.99909, 0.0474, 0.5, 0.5498
              0.02: [sig(35.0), sig(-15.0), 0.5, sig(1.0)]}  # 1 − 6e-16, 3.06e-7, 0.5, 0.731
    for tau, want in expect.items():
        assert preference_probability(h_w, h_l, tau).tolist() == pytest.approx(want, rel=1e-9, abs=1e-12), tau
    assert preference_probability(h_w, h_l).tolist() == pytest.approx(expect[1.0], rel=1e-12)  # default: the paper
    assert preference_probability(h_w, h_l, 0.1)[3].item() == pytest.approx(0.549834, abs=1e-6)  # a literal too


def test_sampled_labels_follow_the_temperature():
    """y ~ Bernoulli(σ(Δh / τ)): at Δh = 0.05 the paper's τ = 1 is nearly a coin (0.512), τ = 0.1 is not (0.622)."""
    h_w, h_l = torch.full((200_000,), 0.55), torch.full((200_000,), 0.5)
    for tau, p in ((1.0, 1 / (1 + math.exp(-0.05))), (0.1, 1 / (1 + math.exp(-0.5))), (0.02, 1 / (1 + math.exp(-2.5)))):
        y = sample_label(h_w, h_l, generator=torch.Generator().manual_seed(0), temperature=tau)
        assert y.mean().item() == pytest.approx(p, abs=0.004), tau
    y = sample_label(h_l, h_w, generator=torch.Generator().manual_seed(0), temperature=0.1)  # l better: w rarely wins
    assert y.mean().item() == pytest.approx(1 / (1 + math.exp(0.5)), abs=0.004)


def test_hard_labels_are_the_reward_ranking_and_a_coin_at_a_tie():
    h_w = torch.tensor([0.9, 0.3, 0.5, 0.500001])
    h_l = torch.tensor([0.2, 0.6, 0.5, 0.5])
    assert hard_preference_probability(h_w, h_l).tolist() == [1.0, 0.0, 0.5, 1.0]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # outright 1.0 / 0.0 wherever the rewards differ, however little
        y = sample_label(h_w[[0, 1, 3]], h_l[[0, 1, 3]], generator=g, hard=True)
        assert y.tolist() == [1.0, 0.0, 1.0]
    ties = sample_label(torch.full((200_000,), 0.5), torch.full((200_000,), 0.5), generator=g, hard=True)
    assert set(ties.unique().tolist()) == {0.0, 1.0} and ties.mean().item() == pytest.approx(0.5, abs=0.004)
    # the soft label of a near-tie stays a coin; the hard one does not
    near = sample_label(torch.full((200_000,), 0.501), torch.full((200_000,), 0.5), generator=g)
    assert near.mean().item() == pytest.approx(0.5, abs=0.004)


def test_soft_and_hard_labels_draw_the_same_stream():
    """Both kinds take one uniform per pair, so the rest of a run's draws do not depend on --labels."""
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sample_label(torch.rand(7), torch.rand(7), generator=a, temperature=0.1)
    sample_label(torch.rand(7), torch.rand(7), generator=b, hard=True)
    assert torch.equal(a.get_state(), b.get_state())


@pytest.mark.parametrize("options, message", [
    ({"label_temperature": 0.0}, "--label-temperature must be positive (got 0.0)"),
    ({"label_temperature": -0.1}, "--label-temperature must be positive (got -0.1)"),
    ({"labels": "sharp"}, "--labels must be soft or hard (got 'sharp')"),
    ({"labels": "hard", "label_temperature": 0.1}, "--label-temperature sets soft labels' sharpness and hard labels "
                                                   "have none; drop one of them"),
    ({"refresh_negatives": -1}, "--refresh-negatives must be a number of steps, or 0 for never (got -1)"),
    ({"refresh_negatives": 5, "pref": False}, "--refresh-negatives with --no-pref would remake negatives"),
])
def test_options_beyond_the_paper_refuse_bad_values(options, message):
    from tinyrpo.errors import UserError, need
    with pytest.raises(UserError) as e:
        RPOOptions(**options).validate(need)
    assert str(e.value).startswith(message)
    RPOOptions(labels="hard").validate(need)  # the defaults, and hard labels at the default τ, are fine
    RPOOptions(label_temperature=0.02, refresh_negatives=50).validate(need)
    assert (RPOOptions().label_temperature, RPOOptions().labels, RPOOptions().refresh_negatives) == (1.0, "soft", 0)


def test_l_pref_and_gradient_hand_computed():
    d = torch.tensor([0.3, -0.2], requires_grad=True)
    y = torch.tensor([1.0, 0.0])
    beta = 2.0
    loss = l_pref(d, y, beta)
    # y=1: -log σ(0.6); y=0: -log σ(-β·(-0.2)) = -log σ(0.4)
    expect = [-math.log(1 / (1 + math.exp(-0.6))), -math.log(1 / (1 + math.exp(-0.4)))]
    assert loss.tolist() == pytest.approx(expect)
    loss.sum().backward()
    # d/dΔ of BCE(βΔ, y) = β(σ(βΔ) − y)
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert d.grad.tolist() == pytest.approx([beta * (sig(0.6) - 1), beta * (sig(-0.4) - 0)])


def test_rpo_loss_by_hand():
    """Two pairs with different labels, β = 0.5, a non-zero ε, two elements per image: every term of eqs. 7-9
    and its gradient computed by hand. Each image's two elements are equal, so e = (pred - ε)^2 (a sum instead of
    the mean would double it)."""
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    beta = 0.5
    # rows: w1, w2 (reference images), l1, l2 (generated images); pair k = (w_k, l_k) shares ε_k
    eps = [0.2, -0.1, 0.2, -0.1]
    pred = [0.7, 0.1, -0.6, 0.5]
    ref = [1.2, 0.3, 0.0, -0.2]
    y = torch.tensor([0.0, 1.0])

    def images(values):
        return torch.tensor(values, dtype=torch.float64).view(4, 1, 1, 1).expand(4, 1, 1, 2).contiguous()

    model = images(pred).requires_grad_()
    out = rpo_loss(model, images(ref), images(eps), y, beta=beta)
    e_theta = [(p - n) ** 2 for p, n in zip(pred, eps)]  # 0.25, 0.04, 0.64, 0.36
    e_ref = [(r - n) ** 2 for r, n in zip(ref, eps)]  # 1.0, 0.16, 0.04, 0.01
    d = [(e_ref[k] - e_theta[k]) - (e_ref[k + 2] - e_theta[k + 2]) for k in range(2)]  # Δ, eq. 8: 1.35, 0.47
    assert out.delta.tolist() == pytest.approx(d)
    assert out.l_sim.item() == pytest.approx((e_theta[0] + e_theta[1]) / 2)  # eq. 7, on the winners only
    pref = [-math.log(sig(-beta * d[0])), -math.log(sig(beta * d[1]))]  # y = 0 and y = 1
    assert out.l_pref.item() == pytest.approx(sum(pref) / 2)
    assert out.loss.item() == pytest.approx(out.l_sim.item() + out.l_pref.item())  # eq. 9
    out.loss.backward()
    # dL/dΔ_k = β (σ(βΔ_k) − y_k) / 2; dΔ/de_θ(w) = −1, dΔ/de_θ(l) = +1; dL_sim/de_θ(w_k) = 1/2;
    # de/dpred per element = 2 (pred − ε) / 2 (mean over the two elements).
    g_delta = [beta * (sig(beta * d[k]) - y[k].item()) / 2 for k in range(2)]
    want = [(0.5 - g_delta[0]) * (pred[0] - eps[0]), (0.5 - g_delta[1]) * (pred[1] - eps[1]),
            g_delta[0] * (pred[2] - eps[2]), g_delta[1] * (pred[3] - eps[3])]
    assert model.grad[:, 0, 0, 0].tolist() == pytest.approx(want)
    assert torch.equal(model.grad[..., 0], model.grad[..., 1])


def test_delta_sign_convention():
    # the policy got better than the base on w and worse on l -> Δ > 0
    assert delta(torch.tensor(0.1), torch.tensor(0.9), torch.tensor(0.5), torch.tensor(0.5)).item() > 0


def test_token_removed_before_scoring():
    assert dreambench.remove_token("a sks dog on the beach", "sks") == "a dog on the beach"
    assert dreambench.remove_token("a red sks backpack", "sks") == "a red backpack"
    # only the whole word goes
    assert dreambench.remove_token("a sks dog in sksland", "sks") == "a dog in sksland"


def _official_prompts():
    text = open(__file__.replace("test_rpo.py", "data/dreambench_prompts_and_classes.txt")).read()
    lists = [[line.split("'")[1] for line in block.splitlines() if line.startswith("'")]
             for block in text.split("prompt_list = [")[1:]]
    classes = dict(line.split(",") for line in text.split("Prompts")[0].splitlines()[3:] if "," in line)
    return lists, classes


def test_dreambench_prompts_and_classes_equal_official_list():
    (objects, live), classes = _official_prompts()
    assert dreambench.OBJECT_PROMPTS == objects and len(objects) == 25
    assert dreambench.LIVE_PROMPTS == live and len(live) == 25
    assert dreambench.SUBJECT_CLASSES == classes and len(classes) == 30
