"""Hugging Face weights -> this server's MLX model folders (see convert/model.py, docs/model-format.md)."""
