"""minunet: U-Net (Ronneberger et al., 2015) from scratch, on a small autograd engine."""
__version__ = "0.1.0"
