"""Retrievers, the retrieval server, the python sandbox and tool-call parsing (no JAX needed)."""
