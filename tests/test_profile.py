from cifarlab.profile import profile_model


def test_resnet18_profile_numbers():
    p = profile_model("resnet18", classes=10, width=64)
    assert p.params == p.trainable_params == 11_173_962
    assert 0.55e9 < p.macs < 0.56e9
    assert abs(p.flops_forward - 2 * p.macs) / p.flops_forward < 0.001  # FLOPs = 2 x MACs
    assert 1.10e9 < p.flops_forward < 1.12e9
    # A training step costs about three forwards (backward: gradients of inputs and weights).
    assert 3.30e9 < p.flops_train_step < 3.36e9
    assert abs(p.weights_mb - 44.73) < 0.01
    assert "Conv2d" in p.table and "11,173,962" in p.table
    assert "Total mult-adds (M): 555.43" in p.table and "Units." not in p.table
