"""Write a tensor exactly as ``torch.save`` does, without running ``torch.save`` for it every save.

DCP stores every tensor of a shard file as its own ``torch.save`` record, so one checkpoint
runs ``torch.save`` hundreds of times (pickling, seven zip records, dozens of small writes).
With zip CRCs off (see ``storage``), the output for a plain CPU tensor is a fixed *frame*
around the raw storage bytes: zip headers, the pickle, alignment padding, the central
directory. The frame depends only on the tensor's layout, never on its values, and a layout
repeats every save. So the first save of each layout runs the real ``torch.save`` and records
its frame, and later saves write frame + storage bytes: byte for byte what ``torch.save`` would
have written, which is what keeps checkpoints readable by ``torch.load`` and stock DCP.

A tensor that is a view into a larger storage (a staging buffer in the shared arena, an
FSDP2 shard narrowed from its padded storage) is written as DCP's writer writes it: as
``torch.save`` of its clone, which holds only the tensor's own bytes. The frame comes from one
clone per layout; later saves write the view's bytes directly, with no copy.
"""

from __future__ import annotations

import io

import torch
from torch.serialization import get_crc32_options

from trainer.checkpoint.torch_compat import Frame, record_torch_save, storage_alignment


def framing_alignment() -> int | None:
    """The storage alignment ``torch.save`` pads to now, or None while its zip CRCs are on.

    A CRC depends on the values, so with CRCs on no frame is fixed and none is used. Read once
    per save: both settings are process-wide and slow to look up per tensor.
    """
    return None if get_crc32_options() else storage_alignment()


def frame_key(tensor: torch.Tensor, alignment: int) -> tuple | None:
    """Everything the frame depends on, or None for tensors that always take the real ``torch.save``.

    Only plain, dense, contiguous CPU tensors qualify; anything that adds to the pickle (grad,
    Python attributes, conj/neg bits) does not.
    """
    if (type(tensor) is not torch.Tensor or tensor.device.type != "cpu" or tensor.layout != torch.strided
            or tensor.requires_grad or tensor.is_quantized or tensor.is_conj() or tensor.is_neg()
            or tensor.__dict__ or not tensor.is_contiguous() or tensor.nbytes == 0):
        return None
    return tensor.dtype, tuple(tensor.shape), alignment


def owns_its_storage(tensor: torch.Tensor) -> bool:
    """Whether ``torch.save`` would write exactly this tensor's bytes (else DCP saves a clone)."""
    return tensor.untyped_storage().nbytes() == tensor.nbytes


class TorchSaveFrames:
    """Per-process cache of ``torch.save`` frames, one per tensor layout (a few hundred bytes each)."""

    def __init__(self) -> None:
        self._frames: dict[tuple, Frame] = {}

    def pieces(self, tensor: torch.Tensor, alignment: int | None) -> tuple[list[memoryview], bool]:
        """The bytes DCP's writer writes for ``tensor``, as byte views to write in order, and whether
        they are framed: ``torch.save(tensor)``, or of its clone when it is a view into a larger storage.

        Framed views are a cached frame around a view of the tensor's bytes (no copy): they
        stay valid, and keep showing the tensor's current values, as long as that storage does.
        ``alignment`` comes from ``framing_alignment``.
        """
        key = None if alignment is None else frame_key(tensor, alignment)
        frame = None if key is None else self._frames.get(key)
        if frame is None:
            own = tensor if owns_its_storage(tensor) else tensor.clone()
            if key is None:
                buffer = io.BytesIO()
                torch.save(own, buffer)
                return [buffer.getbuffer()], False
            frame, parts = record_torch_save(own)  # the first of its layout: the real torch.save
            if frame is None:
                return [memoryview(part) for part in parts], False
            self._frames[key] = frame
        head, tail = frame
        return [memoryview(head), memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), memoryview(tail)], True
