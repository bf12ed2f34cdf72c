"""Committed demo assets (the frozen demo VAE) and the scripts that made them."""
