"""Grouped LoRA for decoding steps: each row's LoRAs applied where the adapters keep them.

The composer's batched-matmul path gives every row its own copy of its factors (its k LoRAs side by
side), so a decoding step reads ``rows x k`` adapters' weights even when rows share adapters; on a
CPU, where one token per row makes that path memory-bound, this is most of the LoRA cost. The
kernel here (``grouped_lora.c``, Punica's BGMV shrink and expand, as vLLM and S-LoRA use on GPUs)
takes, per layer and row, pointers to the row's adapters' own ``A`` and ``B^T``, so a shared
adapter is read from memory once and from cache after that.

It is compiled once per machine with the C compiler (``$CC``, else ``cc`` or ``gcc``) into
``$LORARETRIEVER_HOME/kernels/`` and used for float32 CPU decoding steps of mixture and single rows;
everything else (prefill, other devices and dtypes, fusion and gated rows, autograd) takes the
batched-matmul path, which is also the fallback when no compiler is found. Set
``LORARETRIEVER_GROUPED_KERNEL=0`` to turn it off.

Example:
    >>> pairs = decode_pairs([[(lora_q, 0.5), (lora_q2, 0.5)], []], ["mixture", "mixture"])  # doctest: +SKIP
    >>> grouped_lora_decode(x, out, pairs)  # out += each row's weighted LoRA updates  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loraretriever.engine.adapter import LoraWeights
from loraretriever.engine.home import loraretriever_home

__all__ = [
    "KERNEL_ENV",
    "PAIRED_MODES",
    "DecodePairs",
    "c_compiler",
    "decode_kernel",
    "decode_pairs",
    "grouped_lora_decode",
]

logger = logging.getLogger(__name__)

KERNEL_ENV = "LORARETRIEVER_GROUPED_KERNEL"
PAIRED_MODES = ("mixture", "single")  # rows whose update is a fixed weighted sum of whole LoRAs
MAX_RANK = 256  # as in grouped_lora.c
_SOURCE = Path(__file__).with_name("grouped_lora.c")
_lock = threading.Lock()
_kernel: ctypes._CFuncPtr | None = None
_tried = False


@dataclass(frozen=True)
class DecodePairs:
    """One layer's LoRAs of each row for the kernel: ``k`` slots per row (rank 0: empty).

    The pointers are into the adapters' own tensors; whoever holds a DecodePairs must hold the
    adapters too (the plans keep the rows' held adapters).
    """

    a: torch.Tensor  # (rows, k) int64: address of A (rank x in), contiguous float32
    b: torch.Tensor  # (rows, k) int64: address of B^T (rank x out), contiguous float32
    rank: torch.Tensor  # (rows, k) int64
    weight: torch.Tensor  # (rows, k) float32: routing weight x the LoRA's scaling

    def select(self, index: torch.Tensor) -> DecodePairs:
        """The pairs of some rows only (``index`` a long tensor on the CPU)."""
        return DecodePairs(*(t.index_select(0, index) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.a, self.b, self.rank, self.weight


def decode_pairs(parts: Sequence[Sequence[tuple[LoraWeights, float]]], modes: Sequence[str]) -> DecodePairs | None:
    """The kernel's pairs for one layer, rows given as ``(weights, weight)`` pairs; rows of other
    modes than :data:`PAIRED_MODES` get empty slots. None when the kernel cannot serve these
    weights (not float32 on the CPU, a rank over 256, ``B`` not stored transposed)."""
    k = max((len(p) for p in parts), default=0) or 1
    a = torch.zeros(len(parts), k, dtype=torch.long)
    b = torch.zeros(len(parts), k, dtype=torch.long)
    rank = torch.zeros(len(parts), k, dtype=torch.long)
    weight = torch.zeros(len(parts), k, dtype=torch.float32)
    for row, (pairs, mode) in enumerate(zip(parts, modes, strict=True)):
        if mode not in PAIRED_MODES:
            continue
        for slot, (lora, w) in enumerate(pairs):
            A, BT = lora.A, lora.B.T
            if not _servable(A) or not _servable(BT) or lora.rank > MAX_RANK:
                return None
            a[row, slot], b[row, slot] = A.data_ptr(), BT.data_ptr()
            rank[row, slot], weight[row, slot] = lora.rank, w * lora.scaling
    return DecodePairs(a, b, rank, weight)


def _servable(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def grouped_lora_decode(x: torch.Tensor, out: torch.Tensor, pairs: DecodePairs) -> bool:
    """Adds each row's LoRA updates to ``out`` in place, for ``x`` ``(rows, in)`` and ``out``
    ``(rows, out)``; returns False (and changes nothing) where the kernel cannot run: no kernel,
    tensors not contiguous float32 on the CPU, or autograd recording."""
    kernel = decode_kernel()
    if kernel is None or torch.is_grad_enabled() or not (_servable(x) and _servable(out)):
        return False
    rows, k = pairs.rank.shape
    if x.shape[0] != rows or out.shape[0] != rows:
        raise RuntimeError(f"the grouped LoRA kernel got {x.shape[0]} rows for a plan of {rows}.")
    kernel(
        x.data_ptr(),
        out.data_ptr(),
        rows,
        k,
        x.shape[1],
        out.shape[1],
        pairs.a.data_ptr(),
        pairs.b.data_ptr(),
        pairs.rank.data_ptr(),
        pairs.weight.data_ptr(),
        torch.get_num_threads(),
    )
    return True


def decode_kernel() -> ctypes._CFuncPtr | None:
    """The compiled kernel, built on first use (None if it is turned off or cannot be built)."""
    global _kernel, _tried
    if os.environ.get(KERNEL_ENV, "1") == "0":
        return None
    if _tried:
        return _kernel
    with _lock:
        if not _tried:
            try:
                _kernel = _load(_build())
            except (OSError, subprocess.SubprocessError, RuntimeError) as error:
                logger.warning("the grouped LoRA kernel is not available (%s); decoding uses batched matmuls", error)
            _tried = True
    return _kernel


def _build() -> Path:
    """Compiles grouped_lora.c for this machine's CPU (-march=native), once per source and CPU."""
    compiler = c_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + _cpu_signature().encode() + compiler.encode()).hexdigest()[:16]
    directory = loraretriever_home() / "kernels"
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"grouped_lora-{key}.so"
    if library.is_file():
        return library
    fd, partial = tempfile.mkstemp(prefix=".grouped_lora-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        command = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(_SOURCE), "-o", partial]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
        os.replace(partial, library)  # atomic: concurrent builders each leave a whole file
    finally:
        Path(partial).unlink(missing_ok=True)
    return library


def c_compiler() -> str | None:
    """The C compiler the kernel is built with: ``$CC``, else ``cc`` or ``gcc`` on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_signature() -> str:
    """The CPU the library is built for: -march=native code may not run on another one."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _load(library: Path) -> ctypes._CFuncPtr:
    function = ctypes.CDLL(str(library)).grouped_lora_decode
    function.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    function.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
    return function
