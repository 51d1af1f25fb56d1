"""The single list of NNX modules: one ``ModuleSpec`` per module (or per configuration worth testing).

Each module file in ``attnjax.nn`` calls ``register_module`` for its modules, with a tiny example:
constructor arguments, example inputs, and what the module promises (``causal``, ``decodes``). The
module conformance suite (``tests/test_module_conformance.py``) runs every spec through init,
forward, ``nnx.jit``, gradients, the Linen bridge, an orbax checkpoint round trip, causality and
decode == parallel. ``LAYERS`` and ``BLOCKS`` are live name -> class views of the registry.

Layers and blocks share ``MultiHeadAttention``'s call and cache signature, so one loop drives any of
them: ``layer(x, mask=masks.Causal())`` in parallel, or ``cache = layer.init_cache(batch, max_len)``
then ``y_t, cache = layer.decode(x_t, cache)`` token by token.

Example::

    for spec in modules():
        model = spec.build(nnx.Rngs(0))
        y = model(*spec.example_inputs(jax.random.key(0)), **spec.call_kwargs)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax import masks

KINDS = ("layer", "block", "image", "other")
"""``layer``: a token mixer ``[B, T, d] -> [B, T, d]``; ``block``: a residual block (mixer and channel
mixer) with the same interface; ``image``: a module on NHWC feature maps ``[B, H, W, C] -> [B, H, W, C]``
(conv-net attention modules, vision blocks), called ``module(x)``; ``other``: any other module (gates,
positional encodings, parts, modules with several inputs), returning an array or a pytree of arrays (a
``Bias`` rule over a learned table)."""

InputBuilder = Callable[[jax.Array], tuple]
"""``key -> (arg, ...)``: the positional inputs of a module that does not take a single ``x``."""


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """A registered module with a tiny example, the promises the conformance suite checks.

    Attributes:
      name: the module's name, unique within its ``kind`` (the key in ``LAYERS`` / ``BLOCKS``).
      module: the ``nnx.Module`` class.
      kwargs: constructor keyword arguments of a tiny example, ``rngs`` excluded.
      inputs: the example ``x`` shape, ``(B, T, d)`` (``(B, H, W, C)`` for kind "image"), drawn standard
        normal float32; or a function ``key -> (arg, ...)`` building the positional inputs (e.g. ``(q, k)``
        of ``AttnGate``), each with the sequence on axis 1.
      kind: one of ``KINDS``.
      paper: the reference the module implements.
      call_kwargs: keyword arguments of the example call, for kind "other" (e.g. ``{"mask": masks.Causal()}``
        for ``AttnGate``). Layers and blocks share ``MultiHeadAttention``'s call, so theirs is set here:
        ``{"mask": masks.Causal()}`` when ``causal``, else ``{}``.
      causal: as called with ``call_kwargs``, outputs at position ``t`` depend on inputs at positions
        ``<= t`` only (axis 1 of every input and of the output).
      decodes: ``init_cache(B, max_len)`` (any ``max_len >= T``) then ``decode(x[:, t:t+1], cache)`` for
        ``t = 0..T-1`` gives the parallel call's outputs, step by step. A causal layer or block only.
      takes_rngs: the constructor takes ``rngs`` (``False`` for parameter-only parts like ``LRPE``).
    """

    name: str
    module: type
    kwargs: Mapping[str, Any]
    inputs: Union[tuple[int, int, int], InputBuilder]
    kind: str
    paper: str
    call_kwargs: Optional[Mapping[str, Any]] = None
    causal: bool = False
    decodes: bool = False
    takes_rngs: bool = True

    def __post_init__(self):
        if not (isinstance(self.module, type) and issubclass(self.module, nnx.Module)):
            raise TypeError(f"ModuleSpec {self.name!r}: module must be an nnx.Module class, got {self.module!r}")
        if self.kind not in KINDS:
            raise ValueError(f"ModuleSpec {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        rank = 4 if self.kind == "image" else 3
        if not callable(self.inputs) and len(self.inputs) != rank:
            shape = "(B, H, W, C)" if self.kind == "image" else "(B, T, d)"
            raise ValueError(f"ModuleSpec {self.name!r}: inputs must be a shape {shape} or a function "
                             f"key -> inputs, got {self.inputs!r}")
        if self.kind == "image":
            if self.call_kwargs is not None or self.causal:
                raise ValueError(f"ModuleSpec {self.name!r}: an image module is called module(x), not causal; "
                                 "call_kwargs is for kind 'other'")
            object.__setattr__(self, "call_kwargs", {})
        elif self.kind != "other":
            if self.call_kwargs is not None:
                raise ValueError(f"ModuleSpec {self.name!r}: a {self.kind} is called like MultiHeadAttention "
                                 "(mask=masks.Causal() when causal); call_kwargs is for kind 'other'")
            object.__setattr__(self, "call_kwargs", {"mask": masks.Causal()} if self.causal else {})
        elif self.call_kwargs is None:
            object.__setattr__(self, "call_kwargs", {})
        if self.decodes and (self.kind == "other" or not self.causal or callable(self.inputs)):
            raise ValueError(f"ModuleSpec {self.name!r}: decodes needs a causal layer or block with a single x "
                             "(inputs as a shape (B, T, d))")
        if "rngs" in self.kwargs:
            raise ValueError(f"ModuleSpec {self.name!r}: kwargs must not hold rngs (build passes them)")

    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        """The example module: ``module(**kwargs, rngs=rngs)`` (``rngs`` unused without ``takes_rngs``)."""
        return self.module(**self.kwargs, rngs=rngs) if self.takes_rngs else self.module(**self.kwargs)

    def example_inputs(self, key: jax.Array) -> tuple:
        """The positional inputs of the example call: ``(x [B, T, d] or [B, H, W, C],)`` or ``inputs(key)``."""
        if callable(self.inputs):
            return tuple(self.inputs(key))
        return (jax.random.normal(key, self.inputs, jnp.float32),)


_MODULES: dict[tuple[str, str], ModuleSpec] = {}


def register_module(spec: ModuleSpec) -> ModuleSpec:
    """Add ``spec`` to the module registry; ``ValueError`` if its ``(kind, name)`` is taken by another spec."""
    key = (spec.kind, spec.name)
    if key in _MODULES and _MODULES[key] != spec:
        raise ValueError(f"module {spec.kind} {spec.name!r} is already registered "
                         f"({_MODULES[key].module.__name__})")
    _MODULES[key] = spec
    return spec


def modules(kind: Optional[str] = None) -> list[ModuleSpec]:
    """Every registered spec (of ``kind``, if given), in registration order."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return [spec for spec in _MODULES.values() if kind is None or spec.kind == kind]


class ModuleView(Mapping):
    """A live, read-only ``name -> module class`` view of the registered specs of one kind."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind

    def __getitem__(self, name: str) -> type:
        spec = _MODULES.get((self.kind, name))
        if spec is None:
            raise KeyError(f"no {self.kind} {name!r}; registered: {list(self)}")
        return spec.module

    def __iter__(self) -> Iterator[str]:
        return iter([spec.name for spec in modules(self.kind)])

    def __len__(self) -> int:
        return len(modules(self.kind))

    def __repr__(self) -> str:
        return f"ModuleView({self.kind!r}: {dict(self)})"


LAYERS = ModuleView("layer")
"""Token mixers by name: ``[B, T, d_model] -> [B, T, d_model]``; see each spec for ``decodes``."""

BLOCKS = ModuleView("block")
"""Residual blocks (token mixer + channel mixer) by name, with the same interface."""

IMAGES = ModuleView("image")
"""Modules on NHWC feature maps by name: ``[B, H, W, C] -> [B, H, W, C]`` (conv-net attention modules)."""
