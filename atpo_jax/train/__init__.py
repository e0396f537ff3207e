"""RL step, optimizer, checkpoints, metrics, evaluation, mesh/sharding."""
