"""Reference models built on genfast's fused ops: a convolutional β-VAE (flat or spatial latent), a WGAN-GP
generator and critic, a DDPM U-Net, and latent diffusion (a DDPM on a frozen VAE's latents). They call only the public ops, so they run on every backend (``genfast.use_backend``)."""
from .ddpm import DDPM
from .ldm import LatentDiffusion
from .unet import UNet
from .vae import ConvVAE
from .wgan import Critic, Generator

__all__ = ["ConvVAE", "Generator", "Critic", "UNet", "DDPM", "LatentDiffusion"]
