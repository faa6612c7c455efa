"""Reference models built on genfast's fused ops: a convolutional β-VAE, a WGAN-GP generator and critic, and a
DDPM U-Net. They call only the public ops, so they run on every backend (``genfast.use_backend``)."""
from .ddpm import DDPM
from .unet import UNet
from .vae import ConvVAE
from .wgan import Critic, Generator

__all__ = ["ConvVAE", "Generator", "Critic", "UNet", "DDPM"]
