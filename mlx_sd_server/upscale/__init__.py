"""Upscalers: ESRGAN-family networks in MLX, and the library the server picks them from by name."""
