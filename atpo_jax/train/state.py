"""The training state: the only holder of a run's weights, and what a checkpoint stores.

Everything that changes as a run trains is here and nowhere else: the policy parameters (float32
masters), the optimizer state, the frozen KL reference (only when ``loss.kl_coef > 0``), the step
and the data position. The engines keep the model's structure only and receive the parameters per
call; nothing mutates a module after start-up.

Step numbering: the state after k RL steps has ``step = k``; step 0 is the warm-started policy.
Randomness derives from (seed, step, tree, node) and the data order from (seed, epoch), so the
state needs no PRNG key to resume exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from atpo_jax.parallel import Placement


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Attributes:
    step: RL steps taken.
    params: the policy's parameters (``nnx.State``), in the placement's shardings.
    opt_state: the optimizer state, laid out like the parameters.
    ref_params: the frozen KL reference policy (the warm-started one), or None.
    data_position: training questions consumed (``step x train.prompts_per_step``).
    """

    step: int
    params: Any
    opt_state: Any
    ref_params: Any | None = None
    data_position: int = 0

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)

    @classmethod
    def create(
        cls,
        params: Any,
        optimizer: optax.GradientTransformation,
        placement: Placement,
        *,
        with_reference: bool,
    ) -> TrainState:
        """Step 0 from ``params`` (already placed): a fresh optimizer state (created in place,
        sharded like the parameters) and, ``with_reference``, a copy of the parameters as the KL
        reference."""
        return cls(
            step=0,
            params=params,
            opt_state=init_optimizer_state(optimizer, params, placement),
            ref_params=jax.tree.map(jnp.copy, params) if with_reference else None,
        )

    def checkpoint_items(self) -> dict[str, Any]:
        """The checkpoint's items (one orbax item each). Every checkpoint carries the KL
        reference when there is one: it is the warm-started policy, which only checkpoint 0
        holds, and keep-N deletes that."""
        items = {
            "params": self.params,
            "opt_state": self.opt_state,
            "step": self.step,
            "data_position": self.data_position,
        }
        if self.ref_params is not None:
            items["ref_params"] = self.ref_params
        return items

    def from_checkpoint_items(self, items: dict[str, Any]) -> TrainState:
        """A state from restored ``items`` (restored with ``checkpoint_items()`` as the target)."""
        return TrainState(
            step=int(items["step"]),
            params=items["params"],
            opt_state=items["opt_state"],
            ref_params=items.get("ref_params"),
            data_position=int(items["data_position"]),
        )


def init_optimizer_state(
    optimizer: optax.GradientTransformation, params: Any, placement: Placement
) -> Any:
    """``optimizer.init(params)``; on a mesh created directly in the parameters' layout."""
    if placement.train_mesh is None:
        return optimizer.init(params)
    abstract = jax.eval_shape(optimizer.init, params)
    return jax.jit(optimizer.init, out_shardings=placement.state_shardings(abstract))(params)
