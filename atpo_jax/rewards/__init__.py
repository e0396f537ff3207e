"""QA rewards: answer extraction, SQuAD normalisation, EM/F1, the paper's format check (no JAX)."""
