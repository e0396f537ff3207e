"""The JAX generation engine (KV-cache slots) and the host-side tree search loop."""
