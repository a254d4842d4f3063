"""Custom-gradient ops of the low-memory path and the declaration of what they keep.

- `kept`: `Kept`, one tensor a backward pass reads (role, elements, bits).
"""

from larq_prox.ops.kept import Kept

__all__ = ["Kept"]
