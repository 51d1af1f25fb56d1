"""Modules for positional schemes: learned tables that become ``Bias`` rules, and layers whose attention
reads positions (relative embeddings, post-softmax position weights, complex rotations)."""

__all__: list[str] = []
