"""Orbax checkpoints of a model's state and its optax state, under the step number."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


def _manager(directory: Union[str, Path], max_to_keep: Optional[int] = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(directory).resolve(), options=options)


def save_checkpoint(directory: Union[str, Path], step: int, model: nnx.Module, opt_state=None) -> None:
    """Save the model's state (and the optax state) as checkpoint ``step`` under ``directory``."""
    items = {"model": ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model)))}
    if opt_state is not None:
        items["optimizer"] = ocp.args.StandardSave(opt_state)
    with _manager(directory) as manager:
        manager.save(step, args=ocp.args.Composite(**items))
        manager.wait_until_finished()


def latest_step(directory: Union[str, Path]) -> Optional[int]:
    """The newest checkpoint step under ``directory``, or ``None`` if it holds none."""
    if not Path(directory).exists():
        return None
    with _manager(directory) as manager:
        return manager.latest_step()


def restore_checkpoint(directory: Union[str, Path], model: nnx.Module, opt_state=None,
                       step: Optional[int] = None):
    """Load checkpoint ``step`` (default: the newest) into ``model`` in place.

    ``model`` may be freshly built with any seed: only its structure is used. Returns the step, or
    ``(step, restored optax state)`` when ``opt_state`` (a template, e.g. ``training.init_opt_state``)
    is given.
    """
    with _manager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        state = nnx.state(model)
        args = {"model": ocp.args.StandardRestore(nnx.to_pure_dict(state))}
        if opt_state is not None:
            args["optimizer"] = ocp.args.StandardRestore(opt_state)
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    # Orbax returns arrays committed to a device; fresh ones are not, and jit would compile twice.
    restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), dict(restored))
    nnx.replace_by_pure_dict(state, restored["model"])
    nnx.update(model, state)
    return step if opt_state is None else (step, restored["optimizer"])
