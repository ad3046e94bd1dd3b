"""The pure-PyTorch reference backend (any device, any float dtype)."""
from ..reference import anchor_losses  # noqa: F401

NATIVE_HALF = False


def is_available():
    return True, ""


def supports(device) -> bool:
    return True
