"""atpo_jax: AT²PO (Agentic Turn-based Policy Optimization via Tree Search) in JAX/Flax.

Layers (each imports only the ones listed before it): ``kernels`` -> ``models`` -> ``rollout``;
``tools``/``rewards``/``data`` need no JAX; ``train`` and ``launch`` use everything.
"""

__version__ = "0.1.0"
