"""One-line acceleration of existing PyTorch models: :func:`patch` swaps ``nn.GroupNorm`` → ``nn.SiLU`` pairs for
the fused :class:`genfast.nn.GroupNormSiLU`, :func:`unpatch` puts the original modules back.

A fused pair keeps its slots: the GroupNorm's slot gets a ``GroupNormSiLU`` holding the *same* Parameter objects
(so optimizers, ``state_dict`` keys such as ``0.weight`` / ``0.bias`` and checkpoints are unchanged) and the SiLU's
slot gets an ``nn.Identity``. Both remember the modules they replaced, which :func:`unpatch` restores.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .nn import GroupNormSiLU

# Set on the modules a patch put in place: the tuple of the two modules the pair replaced. A tuple attribute is a
# plain attribute (nn.Module registers only Modules, Parameters and buffers), so state_dict and children() are
# unchanged.
_ORIGINAL = "_genfast_original"


def _plain(module: nn.Module) -> bool:
    """No hooks on ``module``: running a fused replacement would skip them."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def fusable_pair(norm: Optional[nn.Module], act: Optional[nn.Module]) -> bool:
    """``norm`` is exactly ``nn.GroupNorm`` (not a subclass with its own forward) and ``act`` exactly ``nn.SiLU``
    (``inplace`` or not: the fused output is a fresh tensor either way), neither with hooks."""
    return (type(norm) is nn.GroupNorm and type(act) is nn.SiLU and _plain(norm) and _plain(act))


def fuse_pair(parent: nn.Module, norm_name: str, act_name: str) -> None:
    """Replace ``parent.<norm_name>`` (a GroupNorm) by a GroupNormSiLU sharing its Parameters and
    ``parent.<act_name>`` (a SiLU) by an Identity; the caller checked :func:`fusable_pair`."""
    norm, act = getattr(parent, norm_name), getattr(parent, act_name)
    fused = GroupNormSiLU(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta")
    fused.weight = norm.weight
    fused.bias = norm.bias
    fused.train(norm.training)
    identity = nn.Identity()
    identity.train(act.training)
    originals = (norm, act)
    for module in (fused, identity):
        setattr(module, _ORIGINAL, originals)
    setattr(parent, norm_name, fused)
    setattr(parent, act_name, identity)


def _fused_pair_originals(parent: nn.Module, norm_name: str, act_name: str):
    """The (GroupNorm, SiLU) a :func:`fuse_pair` replaced at these two slots, or None."""
    fused, identity = parent._modules.get(norm_name), parent._modules.get(act_name)
    originals = getattr(fused, _ORIGINAL, None)
    if originals is None or getattr(identity, _ORIGINAL, None) is not originals:
        return None
    return originals


def unfuse_pair(parent: nn.Module, norm_name: str, act_name: str) -> bool:
    """Undo :func:`fuse_pair` at these slots (True), or leave them alone when it did not put them there (False).
    The GroupNorm gets the fused module's current Parameters back (they are the same objects unless something
    reassigned them, e.g. ``load_state_dict(assign=True)``) and its training flag."""
    originals = _fused_pair_originals(parent, norm_name, act_name)
    if originals is None:
        return False
    fused, identity = parent._modules[norm_name], parent._modules[act_name]
    norm, act = originals
    norm.weight = fused.weight
    norm.bias = fused.bias
    norm.train(fused.training)
    act.train(identity.training)
    setattr(parent, norm_name, norm)
    setattr(parent, act_name, act)
    return True


def _sequentials(model: nn.Module):
    """Every ``nn.Sequential`` in ``model`` (itself included) that runs nn.Sequential's own forward."""
    for module in model.modules():
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            yield module


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def patch(model: nn.Module) -> nn.Module:
    """Fuse every ``nn.GroupNorm`` directly followed by an ``nn.SiLU`` inside an ``nn.Sequential`` (at any depth)
    into :class:`genfast.nn.GroupNormSiLU` — y = silu(GroupNorm(x)) in one op, on the current genfast backend —
    in place, and return ``model``.

    Parameters stay the same objects and ``state_dict`` keys stay the same; results are unchanged up to kernel
    rounding. Left alone: GroupNorm subclasses, activations other than exactly ``nn.SiLU``, modules with hooks,
    a GroupNorm followed by anything else, and Sequential subclasses with their own forward. Patching twice is a
    no-op. For diffusers models (whose blocks are not Sequentials) use
    :func:`genfast.integrations.diffusers.apply_genfast`."""
    _check_model(model)
    for seq in list(_sequentials(model)):
        names = list(seq._modules)
        for norm_name, act_name in zip(names, names[1:]):
            if fusable_pair(seq._modules[norm_name], seq._modules[act_name]):
                fuse_pair(seq, norm_name, act_name)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: put the original GroupNorm and SiLU module objects back in place; returns ``model``.
    Modules that :func:`patch` did not put there are left alone."""
    _check_model(model)
    for seq in list(_sequentials(model)):
        names = list(seq._modules)
        for norm_name, act_name in zip(names, names[1:]):
            unfuse_pair(seq, norm_name, act_name)
    return model
