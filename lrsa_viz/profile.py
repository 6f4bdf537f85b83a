"""Run profiles for notebooks and scripts: ``quick`` (CPU, CI: small inputs) or ``full`` (GPU: real sizes)."""
from __future__ import annotations

import os

import torch

PROFILE_ENV = "LRSA_VIZ_PROFILE"
PROFILES = ("quick", "full")


def run_profile(override: str | None = None) -> str:
    """The profile to use: ``override``, else $LRSA_VIZ_PROFILE, else ``full`` with a CUDA GPU and ``quick`` without."""
    choice = override or os.environ.get(PROFILE_ENV) or ("full" if torch.cuda.is_available() else "quick")
    if choice not in PROFILES:
        raise ValueError(f"{PROFILE_ENV} / profile must be one of {PROFILES}, got {choice!r}")
    return choice


def environment_record() -> dict:
    """What a committed result file must say about where it was made: torch version, device name."""
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cuda": torch.version.cuda,
    }
