"""Host-side staging buffers for the per-step copies to the device (token slots, token scales, L2S
rows, monitored rows).

On CUDA they are pinned, and the copies are issued with ``non_blocking=True``: the host does not wait
for the device. Reusing one pinned buffer every step is safe because the copies are enqueued while
vLLM's model runner prepares the step's inputs, and the runner waits, before it prepares the next
step, for the event it recorded after this step's input copies (``prepare_inputs_event``): the same
guarantee its own pinned input buffers rely on. On CPU, pinning does not apply and a copy is a copy.
"""

from __future__ import annotations

import torch


def staging_buffer(size: int, dtype: torch.dtype, device: torch.device | str, fill: float = 0) -> torch.Tensor:
    """A host tensor of ``size`` elements for copies to ``device``: pinned when ``device`` is CUDA."""
    pin = torch.device(device).type == "cuda"
    return torch.full((size,), fill, dtype=dtype, pin_memory=pin)
