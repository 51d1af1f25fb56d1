"""Every registered NNX module (``attnjax.nn.registry.modules()``): init, forward, ``nnx.jit``, gradients,
the Linen bridge, an orbax checkpoint round trip, causality and decode == parallel.

Each test runs the spec's tiny example (``spec.build``, ``spec.example_inputs``, ``spec.call_kwargs``),
so registering a module brings its standard tests with it. Decoding runs one generation loop written
against ``MultiHeadAttention``'s API only, so every decoding layer swaps in for it unchanged (the
signatures themselves are checked in ``tests/nn/test_layer_signatures.py``).
"""

import importlib
import inspect
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.nnx import bridge

import attnjax.nn
from attnjax import masks
from attnjax.nn.registry import BLOCKS, LAYERS, ModuleSpec, modules, register_module
from tests.helpers import assert_close

SPECS = modules()
ONE_PER_CLASS = list({spec.module: spec for spec in reversed(SPECS)}.values())[::-1]
"""The first spec of each module class, for the Linen bridge check (traced only; the other specs of a class differ
in configuration only)."""
ONE_PER_FILE = list({spec.module.__module__: spec for spec in reversed(SPECS)}.values())[::-1]
"""The first spec of each module file, for the compiled check (forward and every parameter's gradient) and the
checkpoint round trip: the suite's time budget allows one compiled module per file, and each module's own tests
compare its output and every parameter's gradient with a plain reference (``check_module_against_reference``)."""
JITTED = {}


def parametrize(specs):
    return pytest.mark.parametrize("spec", specs, ids=lambda spec: f"{spec.kind}-{spec.name}")


def call(model, spec: ModuleSpec, inputs) -> jax.Array:
    """The example call, eager."""
    return model(*inputs, **spec.call_kwargs)


def jit_call(model, spec: ModuleSpec, inputs) -> jax.Array:
    """The example call under ``nnx.jit``, compiled once per spec (eager calls are slow: op by op)."""
    key = (spec.kind, spec.name)
    if key not in JITTED:
        JITTED[key] = nnx.jit(lambda m, *a: call(m, spec, a))
    return JITTED[key](model, *inputs)


def example(spec: ModuleSpec, seed: int = 0):
    """The spec's module (parameters from ``seed``) and example inputs."""
    return spec.build(nnx.Rngs(seed)), spec.example_inputs(jax.random.key(seed + 100))


@parametrize(SPECS[:1])
def test_jit_matches_eager(spec):
    """Once, on the first spec: an eager call runs op by op (about four times a compiled call's cost here), and
    every module's own tests run it eagerly against a plain reference."""
    model, inputs = example(spec)
    for leaf, jitted in zip(jax.tree.leaves(call(model, spec, inputs)), jax.tree.leaves(jit_call(model, spec, inputs))):
        assert_close(jitted, leaf, rtol=1e-5, name="jit")


@parametrize(ONE_PER_FILE)
def test_compiled_forward_is_finite_and_every_param_gets_a_finite_nonzero_gradient(spec):
    """One compile (``nnx.value_and_grad`` of ``Σ y·w`` under ``nnx.jit``, the output as aux): the example call gives
    finite arrays (pytrees of arrays for kind "other", e.g. a ``Bias`` rule over a learned table; a layer/block maps
    ``[B, T, d]`` to ``[B, T, d]``), and every parameter a finite, nonzero gradient."""
    model, inputs = example(spec)
    shapes = jax.tree.leaves(jax.eval_shape(lambda *a: call(model, spec, a), *inputs))
    ws = [jax.random.normal(jax.random.key(1 + i), s.shape) for i, s in enumerate(shapes)]

    def loss(m):
        y = call(m, spec, inputs)
        return sum(jnp.sum(leaf.astype(jnp.float32) * w) for leaf, w in zip(jax.tree.leaves(y), ws)), y

    (_, y), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    if not callable(spec.inputs):
        assert y.shape == inputs[0].shape, "a layer/block maps [B, T, d] to [B, T, d]"
    for leaf in jax.tree.leaves(y):
        assert np.all(np.isfinite(np.asarray(leaf)))
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(nnx.to_flat_state(nnx.state(model, nnx.Param))) > 0
    for path, g in flat:
        g = np.asarray(g[...])
        assert np.all(np.isfinite(g)) and np.any(g != 0), path


@parametrize(ONE_PER_CLASS)
def test_linen_bridge(spec):
    """``to_linen`` inits the module's parameters and applies to the module's output shape (traced only)."""
    model, inputs = example(spec)
    linen = bridge.to_linen(spec.module, **spec.kwargs, skip_rng=not spec.takes_rngs)
    variables = jax.eval_shape(lambda key: linen.init(key, *inputs, **spec.call_kwargs), jax.random.key(0))
    params = nnx.state(model, nnx.Param)
    assert jax.tree.map(lambda p: p.shape, variables["params"]) == jax.tree.map(lambda p: p.shape,
                                                                                 nnx.to_pure_dict(params))
    y = jax.eval_shape(lambda v, *a: linen.apply(v, *a, **spec.call_kwargs), variables, *inputs)
    expected = jax.eval_shape(lambda *a: call(model, spec, a), *inputs)
    assert layout(y) == layout(expected)


def test_orbax_checkpoint_round_trip(tmp_path):
    """One orbax checkpoint holding the state of the first spec of each module file (one save and restore: each
    costs about half a second whatever its size), restored into abstract modules: the same graphs and every state
    leaf bit for bit (parameters, batch statistics, RNG state), hence the same calls."""
    models = {f"{spec.kind}-{spec.name}": example(spec, seed=1)[0] for spec in ONE_PER_FILE}
    abstract = {name: nnx.split(nnx.eval_shape(lambda: spec.build(nnx.Rngs(0))))
                for name, spec in zip(models, ONE_PER_FILE)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "checkpoint", {name: nnx.state(m) for name, m in models.items()})
        checkpointer.wait_until_finished()
        states = checkpointer.restore(tmp_path / "checkpoint", {name: a[1] for name, a in abstract.items()})
    for name, model in models.items():
        restored = nnx.merge(abstract[name][0], states[name])
        assert nnx.graphdef(restored) == nnx.graphdef(model), name
        saved, loaded = nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(restored))
        assert [p for p, _ in saved] == [p for p, _ in loaded], name
        for (path, a), (_, b) in zip(saved, loaded):
            a, b = a[...], b[...]
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=f"{name}: {path}")


@parametrize([spec for spec in SPECS if spec.causal])
def test_causal(spec):
    model, inputs = example(spec)
    t = inputs[0].shape[1] // 2
    fresh = spec.example_inputs(jax.random.key(7))
    changed = tuple(x.at[:, t + 1:].set(f[:, t + 1:]) for x, f in zip(inputs, fresh))
    y, y_changed = jit_call(model, spec, inputs), jit_call(model, spec, changed)
    np.testing.assert_array_equal(np.asarray(y[:, :t + 1]), np.asarray(y_changed[:, :t + 1]))
    assert not np.allclose(y[:, t + 1:], y_changed[:, t + 1:]), "the change after t must reach the output"


def layout(tree) -> tuple:
    """A pytree's structure and its leaves' shapes and dtypes."""
    return jax.tree.structure(tree), [(a.shape, a.dtype) for a in jax.tree.leaves(tree)]


def generate(layer, x: jax.Array, max_len: int) -> jax.Array:
    """``layer``'s outputs on ``x [B, T, d]`` token by token, using ``MultiHeadAttention``'s API only:
    ``init_cache(batch, max_len)``, then ``decode(x_t, cache) -> (y_t, cache)``. Each step's cache has
    the structure, shapes and dtypes of the one before (so the loop also runs under ``lax.scan``)."""
    step = nnx.jit(lambda m, x_t, cache: m.decode(x_t, cache))
    cache, steps = layer.init_cache(x.shape[0], max_len), []
    for t in range(x.shape[1]):
        y_t, new = step(layer, x[:, t:t + 1], cache)
        assert layout(new) == layout(cache)
        steps.append(y_t)
        cache = new
    return jnp.concatenate(steps, axis=1)


@parametrize([spec for spec in SPECS if spec.decodes])
def test_generation_loop_for_multi_head_attention_equals_parallel_causal_call(spec):
    """Swap-in: the loop written for ``MultiHeadAttention`` gives ``layer(x, mask=masks.Causal())``."""
    model, (x,) = example(spec)
    assert spec.call_kwargs == {"mask": masks.Causal()}  # so jit_call is layer(x, mask=masks.Causal())
    y = jit_call(model, spec, (x,))
    assert_close(generate(model, x, max_len=x.shape[1] + 3), y, atol=2e-5, rtol=2e-5, name="decode")


def test_every_nnx_module_in_attnjax_nn_is_registered():
    registered = {spec.module for spec in SPECS}
    submodules = [importlib.import_module(info.name)
                  for info in pkgutil.walk_packages(attnjax.nn.__path__, prefix="attnjax.nn.")]
    defined = {cls for submodule in submodules for cls in vars(submodule).values()
               if inspect.isclass(cls) and issubclass(cls, nnx.Module) and cls.__module__ == submodule.__name__}
    assert defined and not defined - registered, sorted(c.__name__ for c in defined - registered)


def test_layer_and_block_views():
    assert {"transnormer", "based", "sliding_window", "aaren"} <= set(LAYERS)
    assert {"transnormer", "based", "graph_moe"} <= set(BLOCKS) and "aaren" not in set(BLOCKS)
    assert LAYERS["aaren"] is attnjax.nn.Aaren and BLOCKS["based"] is attnjax.nn.BasedBlock
    assert all(spec.kind == "layer" for spec in modules("layer")) and len(LAYERS) == len(modules("layer"))
    with pytest.raises(KeyError, match="no block 'aaren'"):
        BLOCKS["aaren"]


def test_register_module_refuses_a_taken_name_and_bad_specs():
    spec = modules("layer")[0]
    assert register_module(spec) is spec  # registering the same spec again is a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_module(ModuleSpec(spec.name, spec.module, {**spec.kwargs, "d_model": 32}, spec.inputs,
                                   kind=spec.kind, paper=spec.paper))
    with pytest.raises(ValueError, match="kind must be one of"):
        ModuleSpec("x", spec.module, {}, (1, 2, 3), kind="mixer", paper="")
    with pytest.raises(TypeError, match="nnx.Module class"):
        ModuleSpec("x", dict, {}, (1, 2, 3), kind="layer", paper="")
    with pytest.raises(ValueError, match="decodes needs a causal layer or block with a single x"):
        ModuleSpec("x", spec.module, {}, lambda key: (), kind="layer", paper="", causal=True, decodes=True)
    with pytest.raises(ValueError, match="decodes needs a causal layer"):
        ModuleSpec("x", spec.module, {}, (1, 2, 3), kind="layer", paper="", decodes=True)
    with pytest.raises(ValueError, match="call_kwargs is for kind 'other'"):
        ModuleSpec("x", spec.module, {}, (1, 2, 3), kind="layer", paper="", call_kwargs={"mask": None})
    causal, other = (ModuleSpec("x", spec.module, {}, (1, 2, 3), kind=kind, paper="", causal=True)
                     for kind in ("block", "other"))
    assert causal.call_kwargs == {"mask": masks.Causal()} and other.call_kwargs == {}
    with pytest.raises(ValueError, match=r"inputs must be a shape \(B, H, W, C\)"):
        ModuleSpec("x", spec.module, {}, (1, 2, 3), kind="image", paper="")
    with pytest.raises(ValueError, match="an image module is called module"):
        ModuleSpec("x", spec.module, {}, (1, 2, 3, 4), kind="image", paper="", causal=True)
    assert ModuleSpec("x", spec.module, {}, (1, 2, 3, 4), kind="image", paper="").call_kwargs == {}
