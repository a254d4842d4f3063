"""What a layer keeps between its forward and its backward pass: the declaration.

Every low-memory layer of larq-prox declares, per tensor its backward pass
reads, the tensor's role, its element count and its bits per element
(`Kept`). One declaration, three readers: the ops' tests check the traced
graph against it, `larq_prox.memory` counts it (`scheme="from_model"`), and
users read it (`layer.kept_tensors()`).

```python
from larq_prox.ops.kept import Kept

kept = [Kept("input signs", 32 * 32 * 128, 1), Kept("kernel signs", 3 * 3 * 128 * 128, 1,
                                                     per_sample=False)]
sum(k.bytes(batch_size=100) for k in kept)      # 1,656,432 bytes
```
"""

from __future__ import annotations

import dataclasses

__all__ = ["Kept", "total_bytes"]


@dataclasses.dataclass(frozen=True)
class Kept:
    """One tensor kept from the forward pass for the backward pass.

    # Arguments
        role: what it is, e.g. "input signs", "input mask", "input B'",
            "input (float16)", "kernel signs", "argmax".
        elements: element count, per sample when `per_sample` (activations),
            else in total (kernel bits, per-channel vectors).
        bits: bits per element (1 for packed bits, 8, 16, 32).
        per_sample: whether `elements` scales with the batch size.
        shared: a key for tensors that several layers' backward passes read
            and that are kept once: declarations with the same key and the
            same source tensor (e.g. "input:float16" of two layers fed by one
            tensor) count once. None: owned by this layer alone.
    """

    role: str
    elements: int
    bits: int
    per_sample: bool = True
    shared: str | None = None

    def bytes(self, batch_size: int = 1) -> int:
        """Bytes of this tensor at `batch_size` (bits packed 8 per byte)."""
        count = self.elements * (batch_size if self.per_sample else 1)
        return (count * self.bits + 7) // 8


def total_bytes(kept: list[Kept], batch_size: int = 1) -> int:
    """Bytes of a list of declarations at `batch_size`."""
    return sum(k.bytes(batch_size) for k in kept)
