"""Two processes under torchrun on the CPU (gloo): the run finishes, rank 0 writes the checkpoint and both ranks end
with the same parameters (DistributedDataParallel averaged their gradients)."""
import os
import socket
import subprocess
import sys

import torch

from genfast.checkpoint import load_checkpoint

# Runs the CLI in each process and saves that process's final VAE parameters as rank<N>.pt.
RUNNER = """
import sys, torch
import genfast.training.loop as loop
from genfast.cli import main

train = loop._train

def train_and_save(config, world):
    result = train(config, world)
    torch.save(result.task.model.state_dict(), f"{config.out}/rank{world.rank}.pt")
    return result

loop._train = train_and_save
sys.exit(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_gloo(tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(runner), "train", "vae", "--num-samples", "48",
               "--image-size", "32", "--latent-dim", "4", "--base-channels", "8", "--batch-size", "8",
               "--max-steps", "3", "--backend", "reference", "--device", "cpu", "--quiet", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["step"] == 3 and len(saved["rng"]) == 2
    rank0, rank1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    for name, value in saved["task"]["modules"]["model"].items():
        assert torch.equal(rank0[name], value), name
        assert torch.equal(rank1[name], value), name
    # the ranks drew their own noise streams, yet their parameters agree: DDP averaged the gradients
    streams = [state["generators"]["noise"] for state in saved["rng"]]
    assert not torch.equal(streams[0], streams[1])
