"""genfast.patch / unpatch: GroupNorm → SiLU pairs in Sequentials become GroupNormSiLU with the same Parameters,
state_dict and results, and come back exactly."""
import pytest
import torch
from torch import nn

import genfast
from genfast.nn import GroupNormSiLU

from tolerances import assert_all_grads_close, assert_close


class ShiftedGroupNorm(nn.GroupNorm):
    """A GroupNorm subclass with its own forward: patch must not fuse it."""

    def forward(self, x):
        return super().forward(x) + 1.0


def _model():
    """Fusable pairs at depth 1 and 2 (one with SiLU(inplace=True)), and pairs patch must leave alone."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.SiLU(inplace=True),                                  # fused with [1]
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8, eps=1e-6), nn.SiLU()),   # fused at depth 2
        nn.Sequential(nn.GroupNorm(2, 8), nn.ReLU()),          # another activation: left alone
        nn.Sequential(ShiftedGroupNorm(2, 8), nn.SiLU()),       # a GroupNorm subclass: left alone
        nn.Sequential(nn.GroupNorm(8, 8, affine=False), nn.SiLU(), nn.Conv2d(8, 2, 1)),  # fused, no parameters
    )


def _forward_backward(model, x):
    """model(x) and the gradients of x and every parameter for a random (fixed-seed) upstream gradient."""
    x = x.clone().requires_grad_()
    out = model(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(out, [x, *model.parameters()], grad)
    return out.detach(), grads


def test_patch_fuses_pairs_at_any_depth_and_leaves_the_rest():
    model = _model()
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    originals = {name: m for name, m in model.named_modules()}

    assert genfast.patch(model) is model
    fused = {name for name, m in model.named_modules() if isinstance(m, GroupNormSiLU)}
    assert fused == {"1", "3.1", "6.0"}
    assert all(isinstance(model.get_submodule(n), nn.Identity) for n in ("2", "3.2", "6.1"))
    for name in ("4.0", "4.1", "5.0", "5.1"):
        assert model.get_submodule(name) is originals[name]
    # the same Parameter objects (optimizers keep working) and the same state_dict
    assert dict(model.named_parameters()) == params
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model[1].weight is originals["1"].weight and model[1].eps == 1e-5 and model[3][1].eps == 1e-6
    assert model[6][0].weight is None and model[6][0].bias is None
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())


def test_patch_is_idempotent_and_unpatch_restores_the_original_objects():
    model = _model()
    originals = [m for m in model.modules()]
    genfast.patch(model)
    once = [m for m in model.modules()]
    assert genfast.patch(model) is model
    assert [m for m in model.modules()] == once and all(a is b for a, b in zip(model.modules(), once))
    assert genfast.unpatch(model) is model
    assert all(a is b for a, b in zip(model.modules(), originals))
    assert model[2].inplace
    assert genfast.unpatch(model) is model  # nothing left to undo
    assert all(a is b for a, b in zip(model.modules(), originals))


def test_unpatch_keeps_parameters_loaded_with_assign_and_the_training_flag():
    model = genfast.patch(_model())
    new_state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(new_state, assign=True)  # new Parameter objects in the fused modules
    model.eval()
    genfast.unpatch(model)
    assert isinstance(model[1], nn.GroupNorm) and not model[1].training
    assert torch.equal(model[1].weight, new_state["1.weight"]) and model[1].weight is model.get_parameter("1.weight")
    assert all(torch.equal(v, new_state[k]) for k, v in model.state_dict().items())


def test_patched_model_matches_outputs_and_gradients(backend):
    model = _model()
    x = torch.randn(2, 3, 5, 4)
    want_out, want_grads = _forward_backward(model, x)
    genfast.patch(model)
    out, grads = _forward_backward(model, x)
    assert_close(out, want_out)
    assert_all_grads_close(grads, want_grads)


def test_patch_loads_an_unpatched_state_dict_and_keeps_an_optimizer_training():
    model, reference = _model(), _model()
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    genfast.patch(model)
    model.load_state_dict(reference.state_dict())  # strict: same keys
    x = torch.randn(2, 3, 4, 4)
    model(x).square().mean().backward()
    optimizer.step()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference(x).square().mean().backward()
    ref_optimizer.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.detach(), q.detach(), msg=name)


def test_patch_leaves_hooked_modules_and_sequential_subclasses_alone():
    class Reversed(nn.Sequential):
        def forward(self, x):
            return x

    hooked_norm = nn.GroupNorm(2, 4)
    hooked_norm.register_forward_hook(lambda *args: None)
    hooked_act = nn.SiLU()
    hooked_act.register_forward_pre_hook(lambda *args: None)
    model = nn.Sequential(nn.Sequential(hooked_norm, nn.SiLU()), nn.Sequential(nn.GroupNorm(2, 4), hooked_act),
                          Reversed(nn.GroupNorm(2, 4), nn.SiLU()))
    before = list(model.modules())
    genfast.patch(model)
    assert all(a is b for a, b in zip(model.modules(), before))


def test_compiled_patched_model_matches():
    model = _model()
    x = torch.randn(2, 3, 4, 4)
    want = model(x)
    compiled = torch.compile(genfast.patch(model), fullgraph=True)
    assert_close(compiled(x), want)


def test_patch_rejects_a_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        genfast.patch(lambda x: x)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        genfast.unpatch([nn.GroupNorm(1, 1)])
