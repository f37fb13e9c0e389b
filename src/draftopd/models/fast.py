"""The target's fast CPU path: every ``nn.Linear`` weight packed once, at load, into the layout oneDNN's matmul
kernels read, so that a forward reads each weight once at memory speed instead of going through ``F.linear`` (the
default target's 211 linears ran at 7-10 GB/s that way against a 31.7 GB/s read rate on a 2-core Zen 4; in bf16
``F.linear`` re-lays each weight out for oneDNN on every call; an AVX2-only CPU paid +88 ms going from 1 to 4 new
tokens, the shape of a per-call weight repack).

``pack_linears`` turns each ``nn.Linear`` of a model into a ``PackedLinear`` in place (the same module, its class
swapped): its ``weight`` and ``bias`` stay as they were (state dicts, tied embeddings, ``Target.logits(vocab=...)``
slicing the head's rows and drafters reading the head all see the plain tensors), and it holds besides ``packed``,
an opaque oneDNN tensor of the same values laid out for the kernel. Its forward runs
``torch.ops.mkldnn._linear_pointwise(x, packed, bias)`` and falls back to ``F.linear`` whenever the packed copy
cannot serve: input off the CPU or in another dtype, an autograd graph to build (a drafter's states reaching the
target's head during training), or no rows. The price is memory: the packed copy doubles what the linears hold
(the default target: +540 MB in fp32, +270 MB in bf16), and a one-off ``_reorder_linear_weight`` per linear at
load.

One packing serves every width: oneDNN picks the same weight layout for 1 to 64 rows (fp32: plain ``ab``, also
with oneDNN capped at AVX2 or AMX by ``ONEDNN_MAX_CPU_ISA``; bf16: ``AB16b64a2b``; checked with ``ONEDNN_VERBOSE=1``
on an AVX512-BF16 CPU: no reorder at run time), so verify blocks of any width, batched rows, any cache length and
4-D float attention masks go through unchanged (attention is not touched). MKL's own packed GEMM
(``torch.ops.mkl._mkl_linear``, what inductor uses for fp32) is not used: its packed buffers take 4.3x the weight's
memory for this model's shapes. fp16 is not packed (oneDNN's fp16 kernels need AVX512-FP16; ``auto`` leaves it
plain).

Values: in fp32 oneDNN's kernels sum in another order than MKL's, so logits differ from the plain path by float
rounding (the default target: max 8e-5 on logits up to 31, ~3e-6 relative, at widths 1, 4 and 17); in bf16
``F.linear`` already runs oneDNN (re-laying the weight out on every call), and the two paths give bit-identical
logits on an AVX512-BF16 CPU. Batch invariance (what data provenance assumes of greedy fp32): a packed fp32 row
comes out bit-identical for any row count >= 2 (1 row takes another kernel), where MKL's rows also differ at 2
and 3; bf16 rows are identical at every count on both paths. tests/test_target_fast.py states the tolerance per
width and dtype and checks that greedy output still equals transformers' own ``generate`` of the unpacked model in
fp32.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import shutil

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from draftopd import DraftopdError
from draftopd.config import FAST_MODES  # auto | plain | packed: TargetConfig.fast's comment says what each means

log = logging.getLogger(__name__)

PACKED_DTYPES = (torch.float32, torch.bfloat16)
PACK_HINT = 1  # the row count oneDNN is told to expect; on AVX512 the layout is the same for 1..64 rows (docstring)


def _ops():
    """(pack, run) oneDNN ops, or None where this torch build has none (CUDA-only or mkldnn-less builds)."""
    try:
        ops = torch.ops.mkldnn
        return ops._reorder_linear_weight, ops._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def packing_available(dtype: torch.dtype, device: str = "cpu") -> bool:
    """Whether linears of this dtype on this device can be packed here: a CPU, oneDNN in this build (and, for bf16,
    a CPU oneDNN runs bf16 on), and a 2x2 weight that packs and multiplies to ``F.linear``'s answer."""
    if torch.device(device).type != "cpu" or dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    ops = _ops()
    if ops is None:
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        w, x = torch.eye(2, dtype=dtype), torch.tensor([[1.0, 2.0]], dtype=dtype)
        return torch.equal(ops[1](x, ops[0](w, PACK_HINT), None, "none", [], ""), x)
    except RuntimeError:
        return False


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that also holds its weight packed for oneDNN (``packed``) and multiplies with that when it
    can. Made by ``pack_linears`` from an existing ``nn.Linear`` (class swapped), undone by ``unpack_linears``."""

    packed: Tensor  # (out, in) values of ``weight`` in oneDNN's blocked layout: an opaque tensor (no strides)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if x.device.type != "cpu" or x.dtype != w.dtype or not x.numel() or w.device.type != "cpu":
            return F.linear(x, w, self.bias)
        if self.packed.dtype != w.dtype:  # the module was cast (.to) after packing: the packed copy is stale
            return F.linear(x, w, self.bias)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):  # the packed op has no backward
            return F.linear(x, w, self.bias)
        if torch.is_autocast_enabled("cpu"):  # F.linear casts under autocast; the packed op would not
            return F.linear(x, w, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def __deepcopy__(self, memo: dict) -> nn.Linear:
        """A copy is a plain ``nn.Linear`` (the opaque packed tensor cannot be copied): pack the copy's model again
        (``set_fast``) after any cast."""
        out = nn.Linear.__new__(nn.Linear)
        memo[id(self)] = out
        state = {k: v for k, v in self.__dict__.items() if k != "packed"}
        out.__dict__.update(copy.deepcopy(state, memo))
        return out


def pack_linears(model: nn.Module) -> int:
    """Pack every ``nn.Linear`` of ``model`` in place (the LM head included); returns how many. Assumes
    ``packing_available`` for their dtype; a linear already packed is packed again (its weight may have changed)."""
    pack = _ops()[0]
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                packed = pack(m.weight.detach().contiguous(), PACK_HINT)
            m.__class__ = PackedLinear
            m.packed = packed  # a plain attribute, not a buffer: not in state dicts, not moved by .to()
            n += 1
    return n


def unpack_linears(model: nn.Module) -> int:
    """Undo ``pack_linears``: plain ``nn.Linear`` modules again, the packed copies freed; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            del m.packed
            m.__class__ = nn.Linear
            n += 1
    return n


def resolve_fast(mode: str, dtype: torch.dtype, device: str | torch.device) -> str:
    """``auto`` -> ``packed`` where ``packing_available``, else ``plain``; ``packed`` where it is not available is
    a one-line error (so a benchmark never times the plain path by mistake), and so is ``compiled`` on a CPU
    without a C++ compiler (inductor builds its CPU kernels with one: ``$CXX``, else g++, c++ or clang++)."""
    if mode not in FAST_MODES:
        raise DraftopdError(f"target.fast must be one of {', '.join(FAST_MODES)}, not {mode!r}")
    if mode == "compiled":
        cxx = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if torch.device(device).type == "cpu" and not any(shutil.which(c) for c in cxx):
            raise DraftopdError(
                f"target.fast=compiled: torch.compile needs a C++ compiler on a CPU ({' or '.join(cxx)} not found); "
                "install one (e.g. g++) or use target.fast=auto"
            )
        return mode
    ok = packing_available(dtype, str(torch.device(device)))
    if mode == "auto":
        return "packed" if ok else "plain"
    if mode == "packed" and not ok:
        raise DraftopdError(
            f"target.fast=packed: this torch build cannot pack {str(dtype).removeprefix('torch.')} linears on "
            f"{device} with oneDNN (CPU only; fp32, or bf16 on a CPU with AVX512/AMX); use target.fast=auto or plain"
        )
    return mode


def set_fast(model: nn.Module, mode: str, dtype: torch.dtype, device: str | torch.device) -> str:
    """Put ``model``'s linears on the path ``mode`` resolves to (``resolve_fast``); returns it (plain, packed, or
    compiled: plain linears, which ``Target.set_fast`` then compiles; the packed op is opaque to torch.compile)."""
    mode = resolve_fast(mode, dtype, device)
    if mode == "packed":
        n = pack_linears(model)
        log.debug("target: %d linears packed for oneDNN", n)
    else:
        unpack_linears(model)
    return mode
