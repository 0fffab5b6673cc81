"""Deterministic test inputs shared by the optimizer tests: mixed shapes and gradient sequences.

Shapes cover 1-D, 1-element, non-square 2-D in both orientations, a 4-D conv kernel and a tie-heavy 2-D
tensor whose gradients are mostly exact zeros (so MGUP's top-k cut lands inside a block of ±0 ties).
"""
import torch

OPTIMIZER_NAMES = (
    "adamw", "lion", "muon", "mars_adamw", "mgup_adamw", "cmgup_adamw", "mgup_lion", "mgup_muon",
    "alpha_adam", "mars_m",
)
MIXED_SHAPES = ((7,), (1,), (5, 3), (3, 5), (4, 2, 3, 3), (6, 8))
# Per-tensor gradient scale: (5, 3) stays below MARS's unit-norm clip, the others trigger it.
GRAD_SCALES = (1.0, 1.0, 0.05, 1.0, 1.0, 1.0)
TIE_HEAVY = 5
TIE_HEAVY_ZERO_FRACTION = 0.7


def initial_params(shapes=MIXED_SHAPES, seed: int = 1) -> list[torch.Tensor]:
    """Float64 starting parameters, one per shape."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def gradient_sequence(steps: int, shapes=MIXED_SHAPES, scales=GRAD_SCALES, seed: int = 2) -> list[list[torch.Tensor]]:
    """`steps` lists of float64 gradients; tensor TIE_HEAVY gets a fresh ~70% exact-zero pattern each step."""
    generator = torch.Generator().manual_seed(seed)
    sequence = []
    for _ in range(steps):
        grads = []
        for i, (shape, scale) in enumerate(zip(shapes, scales)):
            g = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
            if i == TIE_HEAVY:
                g[torch.rand(shape, generator=generator) < TIE_HEAVY_ZERO_FRACTION] = 0.0
            grads.append(g)
        sequence.append(grads)
    return sequence
