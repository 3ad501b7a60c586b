"""Pieces shared by the studies and the command line: argument types and image panels."""

from __future__ import annotations

import argparse

import torch


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def projection_dim(text: str) -> int | None:
    """argparse type: a projection size per layer, or 'none' for exact per-sample gradients."""
    if text.lower() == "none":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'none', got {text!r}") from None


def show_image(ax, image: torch.Tensor, shape: tuple[int, int], title: str, color: str) -> None:
    """Draw one grey-scale image with a coloured frame and title."""
    ax.imshow(image.reshape(shape).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=7, color=color)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(1.5)
