"""A plain ``pip install .`` (non-editable, pip's isolated build, which cannot import torch and so builds no
extension) from a copy of the checkout, into a fresh virtual environment: the installed package carries the C++
sources, compiles them on first use, and ends with the cpp backend available and agreeing with the reference."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import torch, genfast
from genfast._backend import why_not
assert genfast.__file__.startswith(sys.prefix), genfast.__file__  # the installed copy, not the checkout
assert why_not("cpp", "cpu") is None, why_not("cpp", "cpu")
x = torch.randn(2, 8, 5, 5)
with genfast.use_backend("cpp"):
    y = genfast.group_norm_silu(x, 4)
with genfast.use_backend("reference"):
    torch.testing.assert_close(y, genfast.group_norm_silu(x, 4))
print(genfast.cpp._load())
"""


def _copy_checkout(dest: Path) -> None:
    """The checkout's files as git sees them (tracked and untracked, not ignored): what a fresh clone holds."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_plain_pip_install_has_the_cpp_backend(tmp_path):
    source, venv = tmp_path / "src", tmp_path / "venv"
    _copy_checkout(source)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # torch and the other dependencies come from this environment's site-packages, added as a plain path: its
    # .pth files (the editable install of the checkout among them) are not processed there.
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                              "."], cwd=source, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")  # a first use: nothing cached
    run = subprocess.run([str(python), "-c", "import sys\n" + CHECK], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "compiling the C++ CPU kernels" in run.stderr and "No CUDA runtime" not in run.stderr
    assert str(tmp_path / "torch_extensions") in run.stdout
