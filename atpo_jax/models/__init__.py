"""Flax NNX decoder LMs (Qwen3, Qwen2/2.5, Llama 3), Hugging Face checkpoint I/O, log-probs."""
