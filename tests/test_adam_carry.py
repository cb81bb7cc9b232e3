"""AdamW moments carried across a LoRA rank change: the first-moment map is the chain rule (exact for a
pure rotation), and grown entries do not take the bias-correction-free jump that zero padding gives."""

from __future__ import annotations

import torch

from leantune.methods._adam_carry import carry, factor_maps


def _grads(a, b, x, y):
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    loss = ((x @ (b @ a).T - y) ** 2).mean()
    loss.backward()
    return a.grad, b.grad


def _state(grad):
    return {"step": torch.tensor(1.0), "exp_avg": 0.1 * grad, "exp_avg_sq": 0.001 * grad.square()}


def test_first_moments_map_by_the_chain_rule_under_a_rotation():
    from leantune.methods._lora_ranks import svd_truncate

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 12, generator=gen), torch.randn(10, 4, generator=gen)
    x, y = torch.randn(32, 12, generator=gen), torch.randn(32, 10, generator=gen)
    new_a, new_b, discarded = svd_truncate(a, b, 4)  # k = r: same product, other basis and scale
    assert discarded.numel() == 0 and torch.allclose(new_b @ new_a, b @ a, atol=1e-5)
    ga, gb = _grads(a, b, x, y)
    carried_a, carried_b = carry(_state(ga), _state(gb), factor_maps(a, b, new_a, new_b, "shrink"))
    true_a, true_b = _grads(new_a, new_b, x, y)  # the gradients the new factors really get
    assert torch.allclose(carried_a["exp_avg"], 0.1 * true_a, rtol=1e-4, atol=1e-6)
    assert torch.allclose(carried_b["exp_avg"], 0.1 * true_b, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(true_a, ga, atol=1e-3)  # the basis did change: the map is not identity
    assert carried_a["step"] == 1.0 and torch.all(carried_a["exp_avg_sq"] > 0)


def _batch(gen):
    """A fresh minibatch of a noisy linear regression: gradients stay noisy, as in real training."""
    x = torch.randn(32, 12, generator=gen)
    target = torch.ones(10, 12) / 4
    return x, x @ target.T + 0.5 * torch.randn(32, 10, generator=gen)


def _trained_lora(steps: int, lr: float):
    """A rank-4 factor pair trained with torch's AdamW on minibatches, with its optimizer."""
    gen = torch.Generator().manual_seed(1)
    a = torch.nn.Parameter(torch.randn(4, 12, generator=gen) / 4)
    b = torch.nn.Parameter(torch.zeros(10, 4))
    opt = torch.optim.AdamW([a, b], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        x, y = _batch(gen)
        opt.zero_grad()
        ((x @ (b @ a).T - y) ** 2).mean().backward()
        opt.step()
    x, y = _batch(gen)
    return a, b, opt, x, y


def _step_after_grow(states, lr, x, y, a, b, new_a, new_b):
    a2, b2 = torch.nn.Parameter(new_a.clone()), torch.nn.Parameter(new_b.clone())
    opt = torch.optim.AdamW([a2, b2], lr=lr, weight_decay=0.0)
    opt.state[a2], opt.state[b2] = states
    ((x @ (b2 @ a2).T - y) ** 2).mean().backward()
    opt.step()
    return (b2.detach() - new_b)[:, 4:].abs().max().item()


def test_grown_entries_start_with_small_steps_where_zero_padding_jumps():
    from leantune.methods._lora_ranks import grow_zero

    lr = 1e-2
    a, b, opt, x, y = _trained_lora(2000, lr)  # bias correction ~0.86: a long run's regime
    new_a, new_b = grow_zero(a.detach(), b.detach(), 8, torch.Generator().manual_seed(2))
    carried = carry(opt.state[a], opt.state[b], factor_maps(a, b, new_a, new_b, "grow"))
    # old entries keep their moments exactly
    assert torch.equal(carried[0]["exp_avg"][:4], opt.state[a]["exp_avg"])
    assert torch.equal(carried[1]["exp_avg_sq"][:, :4], opt.state[b]["exp_avg_sq"])
    moved = _step_after_grow(carried, lr, x, y, a, b, new_a, new_b)

    def padded(state, shape, dim):
        pad = {k: v for k, v in state.items()}
        for key in ("exp_avg", "exp_avg_sq"):
            extra = list(shape)
            extra[dim] = shape[dim] - state[key].shape[dim]
            pad[key] = torch.cat([state[key], torch.zeros(extra)], dim)
        return pad

    naive = (padded(opt.state[a], new_a.shape, 0), padded(opt.state[b], new_b.shape, 1))
    jumped = _step_after_grow(naive, lr, x, y, a, b, new_a, new_b)
    # zero moments under step 2000's bias correction: (1 - b1) / sqrt((1 - b2) / (1 - b2^2001)) ~ 2.9 lr
    assert jumped > 2.5 * lr
    assert moved < 1.0 * lr
