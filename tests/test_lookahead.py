"""training/lookahead.py: the decay's schedule, the pull every k steps, the run's end on the
slow weights, buffers, the saved state, and the step's use of it."""

import io

import pytest
import torch
from torch import nn

from cifarlab.step import TrainStep
from cifarlab.training.lookahead import PAPER_DECAY, Lookahead, lookahead_decay


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def floats(net):
    return {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()}


def test_decay_grows_as_the_cube_of_the_run_done():
    assert lookahead_decay(0.8, 0, 100) == 0.0
    assert lookahead_decay(0.8, 50, 100) == pytest.approx(0.1)
    assert lookahead_decay(0.8, 100, 100) == pytest.approx(0.8)
    assert lookahead_decay(0.8, 150, 100) == pytest.approx(0.8)  # never past decay_end
    assert pytest.approx(0.7737809375) == PAPER_DECAY


def test_pulls_every_k_steps_and_the_model_goes_on_from_the_slow_weights():
    net = model()
    start = floats(net)
    look = Lookahead(net, every=2, decay_end=0.8, total_steps=4)
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.add_(2.0)
    moved = floats(net)
    look.update(1)  # not a pull: the model keeps its own weights
    assert torch.equal(net[0].weight, moved["0.weight"])
    look.update(2)  # decay 0.8 * (2/4)^3 = 0.1
    for k, v in floats(net).items():
        assert torch.allclose(v, 0.1 * start[k] + 0.9 * moved[k]), k
    pulled = floats(net)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    look.update(3)
    look.update(4)  # decay 0.8 at the end: slow = 0.8 * pulled + 0.2 * model
    assert torch.allclose(net[0].weight, 0.8 * pulled["0.weight"]
                          + 0.2 * (pulled["0.weight"] + 1.0))
    assert net[1].num_batches_tracked.item() == 0  # integer buffers are the model's


def test_the_run_ends_on_the_slow_weights_between_pulls():
    net = model()
    look = Lookahead(net, every=5, decay_end=0.5, total_steps=7)
    start = floats(net)
    with torch.no_grad():
        net[0].bias.add_(3.0)
    look.update(6)
    assert not torch.equal(net[0].bias, start["0.bias"])
    look.update(7)  # the last step, no pull: the model takes the slow weights (step 0's)
    assert torch.equal(net[0].bias, start["0.bias"])


def test_state_round_trips_through_a_weights_only_checkpoint():
    net = model()
    look = Lookahead(net, every=1, decay_end=0.5, total_steps=10)
    with torch.no_grad():
        net[0].weight.mul_(3)
    look.update(5)
    buffer = io.BytesIO()
    torch.save(look.state_dict(), buffer)
    buffer.seek(0)
    other_net = model()
    other = Lookahead(other_net, every=1, decay_end=0.5, total_steps=10)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(other._slow, look._slow, strict=True))
    assert not torch.equal(other._slow[0], floats(other_net)["0.weight"])


def linear(dtype, like=None):
    net = nn.Linear(3, 4).to(dtype)
    if like is not None:
        with torch.no_grad():
            for p, q in zip(net.parameters(), like.parameters(), strict=True):
                p.copy_(q)
    return net


def stepped(net, every):
    """`net` after 8 TrainSteps of momentum SGD on one batch, with lookahead every `every`
    steps (decay up to 0.9) or without (None)."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 3).to(net.weight.dtype), torch.randint(0, 4, (16,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    look = Lookahead(net, every, 0.9, total_steps=8) if every else None
    step = TrainStep(net, nn.CrossEntropyLoss(), optimizer,
                     torch.amp.GradScaler("cpu", enabled=False), scheduler, None,
                     lookahead=look)
    step.cpu_layout = torch.contiguous_format  # a 2-D batch has no channels-last layout
    for _ in range(8):
        step(x, y)
    return net


def test_the_step_pulls_by_the_runs_step_count_as_a_float64_reference_does():
    torch.manual_seed(0)
    start = nn.Linear(3, 4)
    # The reference, in float64: plain SGD steps, the pulls written out at steps 3 and 6,
    # and the end (step 8) on the slow weights.
    ref = linear(torch.float64, start)
    torch.manual_seed(1)
    x, y = torch.randn(16, 3).double(), torch.randint(0, 4, (16,))
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    slow = [p.detach().clone() for p in ref.parameters()]
    for t in range(1, 9):
        optimizer.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        optimizer.step()
        with torch.no_grad():
            decay = 0.9 * (t / 8) ** 3 if t % 3 == 0 else 1.0 if t == 8 else None
            for s, p in zip(slow, ref.parameters(), strict=True):
                if decay is not None:
                    s.mul_(decay).add_(p, alpha=1 - decay)
                    p.copy_(s)
    for dtype in (torch.float32, torch.float64):
        net = stepped(linear(dtype, start), every=3)
        for p, q in zip(net.parameters(), ref.parameters(), strict=True):
            assert torch.allclose(p.double(), q, atol=1e-5), (dtype, p, q)
    plain = stepped(linear(torch.float64, start), every=0)
    assert not torch.allclose(plain.weight, ref.weight, atol=1e-3)  # the pulls mattered
