import torch

from mnist_lit.model import ConvNet, MNISTClassifier


def test_convnet_is_the_seed_network():
    net = ConvNet()
    assert sum(p.numel() for p in net.parameters()) == 29_034
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 16, (5, 5), (2, 2)),
        (16, 32, (5, 5), (2, 2)),
    ]
    images = torch.randn(3, 1, 28, 28)
    assert net.features(images).shape == (3, 32, 7, 7)
    assert net(images).shape == (3, 10)


def test_predict_step_returns_probabilities_and_digit():
    model = MNISTClassifier().eval()
    images = torch.randn(5, 1, 28, 28)
    out = model.predict_step([images, torch.zeros(5, dtype=torch.long)], 0)
    assert out["probs"].shape == (5, 10)
    torch.testing.assert_close(out["probs"].sum(dim=1), torch.ones(5))
    assert torch.equal(out["digit"], model(images).argmax(dim=1))


def test_hyperparameters_are_saved_for_checkpoints():
    model = MNISTClassifier(lr=3e-3, lr_schedule="onecycle")
    assert model.hparams.lr == 3e-3
    assert model.hparams.lr_schedule == "onecycle"
