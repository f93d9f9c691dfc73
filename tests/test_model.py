import io

import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench import NotebookNet
from mnist_lit.lessons import FullyConnected
from mnist_lit.model import ConvNet, MNISTClassifier

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "NCHW"])
def test_convnet_computes_exactly_what_the_notebooks_layer_order_does(device, channels_last, deterministic):
    # ConvNet pools before each ReLU; the notebook rectifies first. Same weights, same batch: the
    # logits, every gradient and BatchNorm's running statistics must be equal bit for bit, in training
    # and in evaluation. The batch has blank and flat images too, so pooling windows hold ties.
    # (Deterministic algorithms: cuDNN's weight gradients otherwise differ from run to run in any order.)
    torch.manual_seed(0)
    ours = ConvNet()
    notebook = NotebookNet()
    notebook.load_state_dict(ours.state_dict())
    images = torch.randn(100, 1, 28, 28)
    images[:10] = 0.0
    images[10:20] = images[10:20, :, :1, :1]  # each a constant image
    labels = torch.randint(0, 10, (100,))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device).contiguous(memory_format=memory_format)
    labels = labels.to(device)
    for net in (ours, notebook):
        net.to(device, memory_format=memory_format)

    logits = [net(images) for net in (ours, notebook)]
    assert torch.equal(logits[0], logits[1])
    for out in logits:
        F.cross_entropy(out, labels).backward()
    for (name, ours_p), notebook_p in zip(ours.named_parameters(), notebook.parameters(), strict=True):
        assert torch.equal(ours_p.grad, notebook_p.grad), name
    for ours_b, notebook_b in zip(ours.buffers(), notebook.buffers(), strict=True):
        assert torch.equal(ours_b, notebook_b)
    ours.eval()
    notebook.eval()
    with torch.no_grad():
        assert torch.equal(ours(images), notebook(images))


def trained_looking(net: ConvNet) -> ConvNet:
    """``net`` with BatchNorm statistics and affine parameters far from their initial 0s and 1s."""
    for norm in (m for m in net.features if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_mean.uniform_(-2.0, 2.0)
        norm.running_var.uniform_(0.1, 4.0)
        with torch.no_grad():
            norm.weight.uniform_(-2.0, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    return net


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "NCHW"])
def test_folded_network_computes_the_same_logits_without_batchnorm(device, channels_last):
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = trained_looking(ConvNet()).to(device, memory_format=memory_format).eval()
    images = torch.randn(200, 1, 28, 28, device=device).contiguous(memory_format=memory_format)
    folded = net.folded()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.inference_mode():
        expected, got = net(images), folded(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))
    # Its own convolution weights: the network it came from is untouched.
    assert folded[0].weight.data_ptr() != net.features[0].weight.data_ptr()


def test_evaluation_steps_run_the_folded_network():
    torch.manual_seed(0)
    model = MNISTClassifier()
    trained_looking(model.net).eval()
    ran_batchnorm = []
    model.net.features[1].register_forward_hook(lambda *_: ran_batchnorm.append(True))
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with torch.inference_mode():
        logits = model.test_step([images, labels], 0)
        probs = model.predict_step([images, labels], 0)["probs"]
        assert not ran_batchnorm
        expected = model(images)  # forward: the network as trained, BatchNorm and all
    assert ran_batchnorm
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(probs, expected.softmax(dim=1), rtol=1e-4, atol=1e-4)


@pytest.fixture
def deterministic(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


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


def test_the_network_is_an_argument_and_the_seeds_hyperparameters_do_not_change():
    seed = MNISTClassifier()
    assert type(seed.net) is ConvNet and "net" not in seed.hparams and "net" not in seed.hparams_initial
    assert sorted(seed.hparams) == [
        "channels_last", "compile", "label_smoothing", "lr", "lr_schedule", "weight_decay"
    ]  # fmt: skip
    # A network object built in Python is used, but not recorded: a checkpoint must load weights-only.
    net = FullyConnected(hidden=8)
    model = MNISTClassifier(net=net, channels_last=False)
    assert model.net is net and "net" not in model.hparams and "net" not in model.hparams_initial
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": dict(model.hparams)}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["hyper_parameters"] == dict(model.hparams)


def test_evaluation_runs_a_network_without_folded_as_it_is():
    torch.manual_seed(0)
    model = MNISTClassifier(net=FullyConnected()).eval()
    images, labels = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    with torch.inference_mode():
        torch.testing.assert_close(model.test_step([images, labels], 0), model(images), rtol=0, atol=0)
