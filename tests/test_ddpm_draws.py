"""Issue 22's proof that the diffusion samplers draw: a tiny DDPM trained briefly on the faces samples images inside
[-1, 1] whose precision (genfast.evaluation's k-NN manifolds, in the tiny face-factor feature space of the
sample-quality tests) is far above that of the same model sampled without clipping x̂₀ — the sampler every diffusion
picture of the project used before."""
import torch

from genfast.data import make_faces
from genfast.evaluation import precision_recall
from genfast.models import DDPM, UNet
from genfast.training import EMA

from evaluation_fixtures import tiny_feature_net  # noqa: F401 (a fixture)

SIZE = 16  # faces made at 32×32 and area-averaged to 16×16: 4× cheaper steps than 32×32
STEPS, BATCH, LR = 400, 32, 2e-3  # Adam, the diffusion recipe's gradient clipping (norm 1), an EMA of the weights
NUM = 128  # samples, and reference faces
SAMPLE_STEPS = 20  # DDIM, eta 0: x_T → image is deterministic, so both samplers start from the same x_T
# Measured over training seeds 0–4 (the test runs seed 0): clipped precision 0.22–0.54, unclipped 0.00–0.02.
MARGIN = 0.15
UNCLIPPED_AT_MOST = 0.1


def _faces(num: int, seed: int) -> torch.Tensor:
    """``num`` faces in [0, 1] at SIZE×SIZE."""
    return torch.nn.functional.avg_pool2d(make_faces(num, seed=seed, image_size=32)[0], 32 // SIZE)


def test_a_briefly_trained_ddpm_draws_inside_the_image_range_and_beats_the_unclipped_sampler(tiny_feature_net):
    """400 steps of a 16-channel U-Net on 512 faces at 16×16, then 128 DDIM samples from the same x_T with x̂₀
    clipped (the default) and not. Seed 0 on the 2-core development machine, one thread: precision 0.50 clipped
    (values in [-0.87, 1]) against 0.00 unclipped (values in [-32, 35], 77% of them outside [-1, 1]); 27 s."""
    net, _ = tiny_feature_net
    torch.manual_seed(0)
    data = _faces(512, seed=1) * 2 - 1
    unet = UNet(image_size=SIZE, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                num_groups=8)
    model = DDPM(unet=unet)
    ema = EMA(model, decay=0.99)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        batch = data[torch.randint(0, len(data), (BATCH,), generator=generator)]
        loss = model.loss(batch, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update()
    model = ema.module.eval()
    x_T = torch.randn(NUM, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    clipped = model.sample(NUM, sampler="ddim", steps=SAMPLE_STEPS, noise=x_T)  # the default: clip_sample=True
    unclipped = model.sample(NUM, sampler="ddim", steps=SAMPLE_STEPS, noise=x_T, clip_sample=False)
    assert clipped.min() >= -1 and clipped.max() <= 1
    assert (unclipped.abs() > 1).float().mean() > 0.1  # x̂₀ unclipped runs off the image range

    with torch.no_grad():
        real = net(_faces(NUM, seed=2718))
        # the pictures as genfast shows them: (x + 1)/2 clamped to [0, 1]
        precision = {name: precision_recall(real, net(((x + 1) / 2).clamp(0, 1)), k=3)[0]
                     for name, x in (("clipped", clipped), ("unclipped", unclipped))}
    assert precision["clipped"] > precision["unclipped"] + MARGIN, precision
    assert precision["unclipped"] <= UNCLIPPED_AT_MOST, precision
