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
