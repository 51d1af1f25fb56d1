"""A small convnet that takes any registered image attention module, the synthetic task it learns, and what
each module costs (parameters, XLA FLOPs) and buys (held-out accuracy).

The net (``ConvNet``): a 3×3 stem, then one stage per width, each a 3×3 convolution (stride 2 from the second
stage on), GroupNorm and ReLU followed by the attention module at that width, then global average pooling and a
linear classifier. The module is any ``attnjax.nn.registry.IMAGES`` entry, built from its registry spec with the
channel argument set to the stage's width (``attention_kwargs``), or ``"none"``, the identity baseline.

The task (``make_dataset``, "find the plus"): each ``16×16×4`` image holds a few 3×3 glyphs on Gaussian noise,
each drawn in one channel, in its own cell of a 4×4 grid. Exactly one glyph is a plus; the others are crosses,
rings and bars, in any channel. The label is the plus's channel (4) times the half of the image it lies in
(left/right): the net has to bind a shape to its channel (channel reasoning) and tell where it is (spatial
reasoning) among distractors of the same channels and brightness. Labels are balanced, and a dataset is a
deterministic function of its seed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from attnjax.nn.registry import IMAGES, ModuleSpec, modules
from attnjax.testing.modules import parameter_count
from experiments.lib.measure import compile_fn
from experiments.lib.outcomes import error_text
from experiments.lib.training import TrainConfig, evaluate, make_optimizer, token_loss

NONE = "none"
"""The baseline: no attention module (the identity after each stage)."""

CHANNEL_ARGUMENT = "channels"
"""The constructor argument of an image module's width, as registry specs name it."""

KwargsFn = Callable[[ModuleSpec, int], dict]
"""``(spec, channels) -> constructor kwargs`` (``rngs`` excluded) for a module at width ``channels``."""

OVERRIDES: Mapping[str, KwargsFn] = {}
"""Modules whose constructor does not take the width as ``CHANNEL_ARGUMENT``: registry name -> ``KwargsFn``.
Every module registered so far does, so the table is empty; a module that does not fails
``tests/experiments/test_conv_attention.py`` until it gets an entry here."""

GLYPHS = {
    "plus": ((0, 1, 0), (1, 1, 1), (0, 1, 0)),
    "cross": ((1, 0, 1), (0, 1, 0), (1, 0, 1)),
    "ring": ((1, 1, 1), (1, 0, 1), (1, 1, 1)),
    "bar": ((0, 0, 0), (1, 1, 1), (0, 0, 0)),
    "column": ((0, 1, 0), (0, 1, 0), (0, 1, 0)),
}
"""The 3×3 glyphs: the target ``plus`` and the distractors (every other one)."""
TARGET = "plus"


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The "find the plus" images (see the module docstring).

    Attributes:
      size: image height and width; a multiple of ``grid`` with cells of at least 3 pixels.
      channels: input channels; the plus is in one of them.
      grid: the image is a ``grid × grid`` array of cells, at most one glyph per cell (``grid`` even).
      glyphs: glyphs per image: the plus and ``glyphs - 1`` distractors.
      noise: standard deviation of the Gaussian background; glyph pixels add 1.
    """

    size: int = 16
    channels: int = 4
    grid: int = 4
    glyphs: int = 5
    noise: float = 0.3

    def __post_init__(self):
        if self.grid % 2 or self.size % self.grid or self.size // self.grid < 3:
            raise ValueError(f"TaskConfig: size must be a multiple of an even grid with cells of at least 3 "
                             f"pixels, got size={self.size}, grid={self.grid}")
        if not 1 <= self.glyphs <= self.grid ** 2:
            raise ValueError(f"TaskConfig: glyphs must be in [1, grid²], got {self.glyphs}")

    @property
    def num_classes(self) -> int:
        """``channels × 2``: the plus's channel and the half it lies in."""
        return 2 * self.channels


def make_dataset(config: TaskConfig, n: int, seed: Union[int, Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of the "find the plus" task: ``(images [n, size, size, channels] float32, labels [n] int32)``.

    Label ``l``: the plus is in channel ``l % channels`` and in the left (``l < channels``) or right half. Every
    class has ``n // num_classes`` or one more examples; the same ``(config, n, seed)`` gives the same arrays.
    """
    rng = np.random.default_rng(seed)
    k, g, cell = config.num_classes, config.grid, config.size // config.grid
    labels = rng.permutation(np.arange(n) % k).astype(np.int32)
    images = (config.noise * rng.standard_normal((n, config.size, config.size, config.channels))).astype(np.float32)
    # The plus's cell lies in its label's half (columns [0, g/2) or [g/2, g)); the distractors take other cells.
    half = labels // config.channels
    target_cell = rng.integers(0, g, n) * g + half * (g // 2) + rng.integers(0, g // 2, n)
    keys = rng.random((n, g * g))
    keys[np.arange(n), target_cell] = -1.0
    cells = np.argsort(keys, axis=1)[:, :config.glyphs]
    distractors = [name for name in GLYPHS if name != TARGET]
    kinds = np.concatenate([np.full((n, 1), -1), rng.integers(0, len(distractors), (n, config.glyphs - 1))], axis=1)
    colors = np.concatenate([labels[:, None] % config.channels,
                             rng.integers(0, config.channels, (n, config.glyphs - 1))], axis=1)
    offsets = rng.integers(0, cell - 2, (n, config.glyphs, 2))
    rows = np.arange(n)
    for slot in range(config.glyphs):
        top = cells[:, slot] // g * cell + offsets[:, slot, 0]
        left = cells[:, slot] % g * cell + offsets[:, slot, 1]
        for kind in np.unique(kinds[:, slot]):
            glyph = np.asarray(GLYPHS[TARGET if kind < 0 else distractors[kind]], np.float32)
            sel = kinds[:, slot] == kind
            for dy, dx in zip(*np.nonzero(glyph)):
                images[rows[sel], top[sel] + dy, left[sel] + dx, colors[sel, slot]] += 1.0
    return images, labels


class Identity(nnx.Module):
    """The ``"none"`` baseline: ``y = x``, no parameters."""

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> x``."""
        return x


def image_specs(names: Optional[Sequence[str]] = None) -> list[ModuleSpec]:
    """The registered image specs (kind ``"image"``), all or those named, in registry order."""
    specs = modules("image")
    if names is None:
        return specs
    unknown = set(names) - {s.name for s in specs}
    if unknown:
        raise ValueError(f"unknown image modules {sorted(unknown)}; registered: {list(IMAGES)}")
    return [s for s in specs if s.name in names]


def attention_kwargs(spec: ModuleSpec, channels: int) -> dict:
    """The constructor kwargs of ``spec``'s module at width ``channels``: the spec's tiny example with its
    ``CHANNEL_ARGUMENT`` replaced, or ``OVERRIDES[spec.name]``. ``ValueError`` if neither applies."""
    if spec.name in OVERRIDES:
        return OVERRIDES[spec.name](spec, channels)
    if CHANNEL_ARGUMENT not in spec.kwargs:
        raise ValueError(f"image module {spec.name!r} ({spec.module.__name__}) takes no {CHANNEL_ARGUMENT!r} "
                         f"argument (example kwargs {sorted(spec.kwargs)}); add it to "
                         "experiments.lib.convnet.OVERRIDES")
    return {**spec.kwargs, CHANNEL_ARGUMENT: channels}


def build_attention(name: str, channels: int, rngs: nnx.Rngs) -> nnx.Module:
    """The image module ``name`` (or ``"none"``: ``Identity``) at width ``channels``."""
    if name == NONE:
        return Identity()
    spec = image_specs([name])[0]
    return spec.module(**attention_kwargs(spec, channels), rngs=rngs)


class ConvNet(nnx.Module):
    """A small image classifier with an attention module after each stage.

    ``stem: conv3×3 → GN → ReLU``; per width ``w_i``: ``conv3×3 (stride 2 for i > 0) → GN → ReLU → attention``;
    then ``mean_{h,w}`` and a linear layer to ``num_classes`` logits. ``[B, H, W, in_channels] -> [B, classes]``.

    Args:
      attention: an ``IMAGES`` name or ``"none"``.
      in_channels: input channels; num_classes: logits.
      widths: channels of the stages (the stem has ``widths[0]``).
      groups: GroupNorm groups (Wu & He 2018), at most the width.
      rngs: initializes every layer.
    """

    def __init__(self, attention: str, *, in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64),
                 groups: int = 8, rngs: nnx.Rngs):
        def norm(width: int) -> nnx.GroupNorm:
            return nnx.GroupNorm(width, num_groups=min(groups, width), rngs=rngs)

        self.stem = nnx.Conv(in_channels, widths[0], (3, 3), rngs=rngs)
        self.stem_norm = norm(widths[0])
        self.convs = nnx.List([nnx.Conv(c_in, c_out, (3, 3), strides=1 if i == 0 else 2, rngs=rngs)
                               for i, (c_in, c_out) in enumerate(zip([widths[0], *widths[:-1]], widths))])
        self.norms = nnx.List([norm(w) for w in widths])
        self.attentions = nnx.List([build_attention(attention, w, rngs) for w in widths])
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, in_channels] -> logits [B, num_classes]``."""
        x = jax.nn.relu(self.stem_norm(self.stem(x)))
        for conv, norm, attention in zip(self.convs, self.norms, self.attentions):
            x = attention(jax.nn.relu(norm(conv(x))))
        return self.head(x.mean(axis=(1, 2)))


def attention_parameters(model: ConvNet) -> int:
    """Parameters of the model's attention modules (what it adds to the ``"none"`` net)."""
    return sum(parameter_count(a) for a in model.attentions)


def forward_flops(model: ConvNet, input_shape: Sequence[int]) -> float:
    """FLOPs of the compiled forward pass at ``input_shape``, from XLA's cost analysis (``flops``).

    ``Compiled.cost_analysis()`` returns a dict on current jax, a list of one dict per computation on older ones.
    """
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    cost = compile_fn(lambda s, x: nnx.merge(graphdef, s)(x), state, x).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


@nnx.jit
def _train_step(model: nnx.Module, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array) -> dict:
    """One optimizer step on the model's ``nnx.Param`` state, in place; other state (e.g. the BatchNorm
    statistics a module keeps) is updated by the forward pass."""
    def loss_fn(model):
        total, correct, count = token_loss(model(images), labels)
        return total / count, correct / count

    (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return {"loss": loss, "accuracy": accuracy}


def train_classifier(model: nnx.Module, batch_fn: Callable[[int], tuple[np.ndarray, np.ndarray]],
                     config: TrainConfig, *, desc: str = "train", progress: bool = True) -> list[dict]:
    """Train ``model`` (images -> logits) in place on ``batch_fn(step)`` with ``make_optimizer(config)``.

    The model is in training mode (``model.train()``) during the steps and in evaluation mode after. Unlike
    ``experiments.lib.training.train`` (parameters only), the step is an ``nnx`` transform, so state a module
    updates in its forward pass (BatchNorm statistics) is kept. Returns one ``{step, loss, accuracy}`` per
    ``config.log_every`` steps and the last.
    """
    model.train()
    optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)
    history = []
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        images, labels = batch_fn(step)
        metrics = _train_step(model, optimizer, jnp.asarray(images), jnp.asarray(labels))
        if (step + 1) % max(config.log_every, 1) == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, **{k: float(v) for k, v in metrics.items()}})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    model.eval()
    return history


@dataclasses.dataclass(frozen=True)
class ConvSettings:
    """One study: which modules, the net, the task and the training.

    Attributes:
      modules: ``IMAGES`` names and/or ``"none"`` (``None``: ``"none"`` then every registered module).
      widths, groups: the ``ConvNet``.
      task: the images.
      steps, batch_size, lr, warmup_steps, weight_decay: AdamW on fresh batches every step (warmup, cosine).
      test_examples: held-out images (another seed than every training batch).
      seeds: one run per seed and module (model initialization and training data; the test set is the same).
      progress: progress bars.
    """

    modules: Optional[Sequence[str]] = None
    widths: Sequence[int] = (16, 32, 64)
    groups: int = 8
    task: TaskConfig = TaskConfig()
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    test_examples: int = 2048
    seeds: Sequence[int] = (0,)
    progress: bool = True

    def module_names(self) -> list[str]:
        """The modules to run: ``modules`` as given (checked), or ``"none"`` then every registered one."""
        if self.modules is None:
            return [NONE] + [s.name for s in image_specs()]
        image_specs([m for m in self.modules if m != NONE])
        return list(self.modules)


TEST_SEED = 10_000
"""The held-out images' seed (training batches use ``(seed, step)``)."""


def build_model(settings: ConvSettings, name: str, seed: int = 0) -> ConvNet:
    """The ``ConvNet`` of ``settings`` with module ``name``, initialized from ``seed``."""
    return ConvNet(name, in_channels=settings.task.channels, num_classes=settings.task.num_classes,
                   widths=tuple(settings.widths), groups=settings.groups, rngs=nnx.Rngs(seed))


def input_shape(task: TaskConfig, batch: int = 1) -> tuple[int, int, int, int]:
    """``(batch, size, size, channels)``."""
    return batch, task.size, task.size, task.channels


def run_one(settings: ConvSettings, name: str, seed: int) -> dict:
    """Train the ``ConvNet`` with module ``name`` from ``seed`` and score it: accuracy on the held-out images,
    parameters (the attention modules' apart), forward FLOPs per image."""
    task = settings.task
    model = build_model(settings, name, seed)
    config = TrainConfig(steps=settings.steps, learning_rate=settings.lr, warmup_steps=settings.warmup_steps,
                         weight_decay=settings.weight_decay, log_every=max(settings.steps // 10, 1))
    start = time.perf_counter()
    history = train_classifier(model, lambda step: make_dataset(task, settings.batch_size, (seed, step)),
                               config, desc=f"{name} seed {seed}", progress=settings.progress)
    seconds = time.perf_counter() - start
    images, labels = make_dataset(task, settings.test_examples, TEST_SEED)
    chunk = 512
    result = evaluate(model, [(images[i:i + chunk], labels[i:i + chunk]) for i in range(0, len(labels), chunk)])
    return {"module": name, "seed": seed, "params": parameter_count(model),
            "attention_params": attention_parameters(model), "flops": forward_flops(model, input_shape(task)),
            "accuracy": result["accuracy"], "test_loss": result["loss"], "train_seconds": seconds,
            "final_train_loss": history[-1]["loss"], "history": history}


def sweep(settings: ConvSettings) -> list[dict]:
    """``run_one`` for each module of ``settings.module_names()`` and each seed; a run that raises gets a row
    with its ``error`` instead, so one broken module does not lose the others' results."""
    rows = []
    runs = [(name, seed) for name in settings.module_names() for seed in settings.seeds]
    for name, seed in tqdm(runs, desc="conv attention", disable=not settings.progress, dynamic_ncols=True):
        try:
            rows.append(run_one(settings, name, seed))
        except Exception as e:  # noqa: BLE001 - recorded in the table, see the docstring
            rows.append({"module": name, "seed": seed, "error": error_text(e)})
        if settings.progress:
            row = rows[-1]
            tqdm.write(f"{name} seed {seed}: {row['error']}" if "error" in row
                       else f"{name} seed {seed}: accuracy {row['accuracy']:.3f} ({row['train_seconds']:.0f} s)")
    return rows


def baseline_costs(settings: ConvSettings) -> dict:
    """Parameters and forward FLOPs per image of the ``"none"`` net of ``settings`` (no training)."""
    model = build_model(settings, NONE)
    return {"params": parameter_count(model), "flops": forward_flops(model, input_shape(settings.task))}
