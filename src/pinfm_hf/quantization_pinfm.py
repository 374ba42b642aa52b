"""Row-wise int8 / int4 quantised embedding tables for serving, on the FBGEMM ops of torch's CPU build.

Each row is stored as its quantised values followed by its own scale and bias (`value = q * scale + bias`, with
`bias` the row minimum): int8 rows hold `dim` bytes and an fp32 scale and bias (`dim + 8` bytes), int4 rows two
values per byte and an fp16 scale and bias (`dim / 2 + 4` bytes). The packed table is a persistent `uint8` buffer,
so `save_pretrained` writes it and `from_pretrained` loads it as it is.

Copied next to `modeling_pinfm.py` into saved model folders for `trust_remote_code`: it imports only torch.
"""

import torch
from torch import nn


# Quantisation name -> (pack, lookup, unpack) ops. The `embedding_bag_*_rowwise_offsets` lookups take the packed
# table as a plain tensor (a buffer); `quantized::embedding_byte`/`embedding_4bit` need a packed-params object instead.
_OPS = {
    "int8": ("embedding_bag_byte_prepack", "embedding_bag_byte_rowwise_offsets", "embedding_bag_byte_unpack"),
    "int4": ("embedding_bag_4bit_prepack", "embedding_bag_4bit_rowwise_offsets", "embedding_bag_4bit_unpack"),
}
QUANTIZATION_TYPES = tuple(_OPS)


def packed_row_bytes(embedding_dim: int, bits: str) -> int:
    """Bytes of one packed row: values, then the row's scale and bias (fp32 for int8, fp16 for int4)."""
    if bits == "int8":
        return embedding_dim + 2 * 4
    return embedding_dim // 2 + 2 * 2


class PinFMQuantizedEmbedding(nn.Module):
    """
    An embedding table quantised row-wise to int8 or int4 (per-row scale and bias), looked up with torch's FBGEMM ops.
    For serving only: it has no trainable parameters and refuses training mode.

    Args:
        num_embeddings (`int`):
            Number of rows.
        embedding_dim (`int`):
            Width of a row; must be even for `"int4"`.
        bits (`str`, *optional*, defaults to `"int8"`):
            `"int8"` or `"int4"`.

    Built empty (zeros, to be loaded from a checkpoint), or from a trained table with [`~PinFMQuantizedEmbedding.from_float`].
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: str = "int8"):
        super().__init__()
        if bits not in _OPS:
            raise ValueError(f"`bits` must be one of {QUANTIZATION_TYPES}, got {bits!r}.")
        if bits == "int4" and embedding_dim % 2 != 0:
            raise ValueError(f"int4 quantisation packs two values per byte: `embedding_dim` ({embedding_dim}) must be even.")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.bits = bits
        self.training = False
        # Persistent, so it is saved and loaded; nothing else is computed here (models are built on the meta device).
        self.register_buffer("packed", torch.zeros(num_embeddings, packed_row_bytes(embedding_dim, bits), dtype=torch.uint8))

    @classmethod
    @torch.no_grad()
    def from_float(cls, embedding: nn.Embedding, bits: str = "int8") -> "PinFMQuantizedEmbedding":
        """Quantise a trained `nn.Embedding` row-wise (each row's min/max range, rounded to nearest)."""
        num_embeddings, embedding_dim = embedding.weight.shape
        module = cls(num_embeddings, embedding_dim, bits)
        weight = embedding.weight.detach().to(torch.float32).contiguous()
        packed = getattr(torch.ops.quantized, _OPS[bits][0])(weight)
        assert packed.shape == module.packed.shape, (packed.shape, module.packed.shape)
        module.packed = packed
        return module

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """`(...)` ids -> `(..., embedding_dim)` float32 rows."""
        flat = input_ids.reshape(-1).to(self.packed.device)  # (N,)
        offsets = torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device)  # one id per bag: a plain lookup
        rows = getattr(torch.ops.quantized, _OPS[self.bits][1])(self.packed, flat, offsets)  # (N, D)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def dequantize(self) -> torch.Tensor:
        """The whole table as float32, `(num_embeddings, embedding_dim)`."""
        return getattr(torch.ops.quantized, _OPS[self.bits][2])(self.packed)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed table (values, scales and biases)."""
        return self.packed.nbytes

    def train(self, mode: bool = True) -> "PinFMQuantizedEmbedding":
        if mode:
            raise RuntimeError(
                f"This {self.bits} quantised embedding table is for serving and cannot be trained: load the unquantised "
                "checkpoint to fine-tune, and quantise afterwards."
            )
        return super().train(False)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits!r}"


def quantized_table_bytes(module: nn.Module) -> int:
    """Bytes of all the quantised tables in `module` (0 when it has none)."""
    return sum(m.nbytes for m in module.modules() if isinstance(m, PinFMQuantizedEmbedding))


__all__ = ["PinFMQuantizedEmbedding", "QUANTIZATION_TYPES", "packed_row_bytes", "quantized_table_bytes"]
