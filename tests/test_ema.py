"""training/ema.py: the moving average's decay, update, buffers and saved state."""

import io

import pytest
import torch
from torch import nn

from cifarlab.training.ema import ModelEma, ema_decay


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_decay_warms_up_as_one_plus_n_over_ten_plus_n():
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 90) == pytest.approx(0.91)
    assert ema_decay(0.999, 8990) == pytest.approx(0.999)
    assert ema_decay(0.999, 10**6) == 0.999
    assert ema_decay(0.5, 1) == pytest.approx(2 / 11) and ema_decay(0.5, 10) == 0.5


def test_update_averages_weights_and_float_buffers_and_copies_counters():
    net = model()
    ema = ModelEma(net, decay=0.5)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.train()(torch.randn(8, 3))  # moves BatchNorm's running stats, counts a batch
    ema.update()  # update 1: decay min(0.5, 2/11)
    d = 2 / 11
    theirs, ours = net.state_dict(), ema.module.state_dict()
    for k, v in ours.items():
        if v.is_floating_point():
            assert torch.allclose(v, d * start[k] + (1 - d) * theirs[k]), k
        else:
            assert torch.equal(v, theirs[k]), k
    assert ours["1.num_batches_tracked"].item() == 1
    averaged = ours["0.bias"].clone()
    ema.update()  # update 2: decay min(0.5, 3/12) = 0.25, from the averaged values
    assert torch.allclose(ema.module.state_dict()["0.bias"],
                          0.25 * averaged + 0.75 * theirs["0.bias"])


def test_the_copy_is_in_eval_mode_without_gradients_and_leaves_the_model_alone():
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ema = ModelEma(net, decay=0.9)
    ema.update()
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_state_round_trips_through_a_weights_only_checkpoint():
    net = model()
    ema = ModelEma(net, decay=0.9)
    with torch.no_grad():
        net[0].weight.mul_(3)
    for _ in range(5):
        ema.update()
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = ModelEma(model(), decay=0.9)
    other.load_state_dict(state)
    assert other.updates == 5
    assert all(torch.equal(a, b) for a, b in zip(
        other.module.state_dict().values(), ema.module.state_dict().values(), strict=True))
