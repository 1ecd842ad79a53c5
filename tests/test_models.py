import pytest
import torch
from torch.func import functional_call, grad

from models import MODEL_NAMES, build_model, count_parameters

SHAPES = {"mlp": (1, 8, 8), "conv4": (1, 28, 28), "resnet8": (3, 32, 32), "resnet20": (1, 8, 8),
          "wrn-10-2": (3, 32, 32), "wrn": (3, 16, 16)}


@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_shape_and_functional_call(name):
    torch.manual_seed(0)
    model = build_model(name, SHAPES[name], 7)
    x = torch.randn(3, *SHAPES[name])
    out = model(x)
    assert out.shape == (3, 7)
    # No running statistics anywhere: functional_call with the module's own parameters
    # must reproduce the forward exactly, and leave no buffers to update.
    assert list(model.buffers()) == []
    params = dict(model.named_parameters())
    assert torch.allclose(functional_call(model, params, (x,)), out)


def test_functional_call_with_external_parameters_changes_output():
    model = build_model("conv4", (1, 28, 28), 5, channels=8)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.randn(2, 1, 28, 28)
    before = functional_call(model, params, (x,))
    params["head.bias"] = params["head.bias"] + 1.0
    assert torch.allclose(functional_call(model, params, (x,)), before + 1.0, atol=1e-6)


def test_grad_through_functional_call():
    model = build_model("mlp", (1, 8, 8), 10, hidden=[4])
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))

    def loss(p):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    g = grad(loss)(params)
    assert set(g) == set(params) and all(torch.isfinite(v).all() for v in g.values())


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="known: .*resnet56"):
        build_model("resnet9", (3, 32, 32), 10)


def test_resnet_depths_and_param_order():
    small = count_parameters(build_model("resnet8", (3, 32, 32), 10))
    large = count_parameters(build_model("resnet56", (3, 32, 32), 10))
    assert small < large
    assert "wrn-D-W" in MODEL_NAMES
    from models.resnet import CifarResNet

    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet((3, 32, 32), 10, depth=21)


def test_conv4_batch_norm_uses_the_batch_statistics_of_batchnorm2d():
    from models.conv4 import BatchStatNorm

    torch.manual_seed(0)
    norm, reference = BatchStatNorm(6), torch.nn.BatchNorm2d(6, track_running_stats=False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2), norm.bias.normal_()
        reference.weight.copy_(norm.weight), reference.bias.copy_(norm.bias)
    x = torch.randn(5, 6, 7, 7) * 3 + 1
    assert torch.allclose(norm(x), reference(x), atol=1e-5)
    model = build_model("conv4", (1, 28, 28), 5, channels=8, norm="batch")
    assert list(model.buffers()) == [] and model(torch.randn(4, 1, 28, 28)).shape == (4, 5)
    with pytest.raises(ValueError, match="'group', 'batch' or 'none'"):
        build_model("conv4", (1, 28, 28), 5, norm="layer")


def test_conv4_pooling_before_relu_gives_the_textbook_block_values_and_gradients():
    torch.manual_seed(0)
    model = build_model("conv4", (1, 28, 28), 5, channels=8)
    textbook = torch.nn.Sequential(*[torch.nn.Sequential(block[0], block[1], torch.nn.ReLU(), torch.nn.MaxPool2d(2))
                                     for block in model.features])
    x = torch.randn(6, 1, 28, 28)
    ours, reference = model(x), model.head(textbook(x).flatten(1))
    assert torch.equal(ours, reference)
    params = list(model.parameters())
    g_ours = torch.autograd.grad(ours.square().sum(), params)
    g_reference = torch.autograd.grad(reference.square().sum(), params)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_ours, g_reference))


def test_int8_mlp_is_a_smaller_torchscript_file_with_close_predictions():
    from models.normalize import Normalized
    from models.quantize import float_layers, quantize_int8, torchscript_bytes

    torch.manual_seed(0)
    model = Normalized(build_model("mlp", (1, 8, 8), 10), [0.3], [0.4]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    int8 = quantize_int8(model)
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        floats, ints = model(x), int8(x)
    assert (floats - ints).abs().max() < 0.05 * floats.abs().max()
    assert (floats.argmax(-1) == ints.argmax(-1)).float().mean() >= 0.9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the float model is untouched
    assert len(torchscript_bytes(int8, x[:2])) < 0.4 * len(torchscript_bytes(model, x[:2]))  # 4-byte -> 1-byte weights
    assert float_layers(model) == 0
    assert float_layers(build_model("conv4", (1, 28, 28), 5)) == 4  # dynamic quantization leaves convolutions float
