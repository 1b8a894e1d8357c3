"""CUDA C sources of minunet, installed as package data (see minunet.backends.sources)."""
