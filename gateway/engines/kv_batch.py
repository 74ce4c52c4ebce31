"""The live sequences' KV caches as one left-padded batch, so that one forward pass decodes them all.

A row joins once its prompt has been prefilled alone (at batch 1, so its prompt's cache is exactly the one
transformers' `generate` builds) and leaves when it finishes or is cancelled. Rows of different lengths are
padded on the left: the attention mask hides the padding, and each row's position ids count only its own
tokens, so its rotary positions and the keys it attends to are those it would have alone. Columns that are
padding in every row are trimmed when rows leave. Joining and leaving copy the cache, as
`DynamicCache.update` already does at every step (`torch.cat`), so batching adds no copy per step.

Only full-attention caches (transformers' plain `DynamicLayer`) can be padded this way; `batchable()` says
whether a model's cache is one.
"""

from __future__ import annotations

from typing import Any


def batchable(config: Any) -> bool:
    """Whether a model with this config keeps a plain, full-attention dynamic cache in every layer."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = DynamicCache(config=config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class PaddedKVBatch:
    """Rows of KV cache padded on the left to one length, with the mask that hides the padding."""

    def __init__(self) -> None:
        self.cache: Any = None  # a DynamicCache of [rows, kv heads, length, head dim] per layer
        self.mask: Any = None  # [rows, length], 1 where a row has a token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    def decode_inputs(self) -> tuple[Any, Any]:
        """Attention mask and position ids for one new token in every row."""
        import torch

        positions = self.mask.sum(dim=1, keepdim=True)
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return mask, positions

    def decoded(self, cache: Any, mask: Any) -> None:
        """Take the cache and mask of a decode step (one more column in every row)."""
        self.cache, self.mask = cache, mask

    def join(self, prefills: list[tuple[Any, int]]) -> None:
        """Append rows: each prefill is a batch-1 prompt cache and how many rows (choices) start from it."""
        import torch
        from transformers.cache_utils import DynamicCache

        parts: list[tuple[list[tuple[Any, Any]], Any]] = []
        if self.cache is not None:
            parts.append((_layers(self.cache), self.mask))
        for cache, copies in prefills:
            layers = [(k.expand(copies, -1, -1, -1), v.expand(copies, -1, -1, -1)) for k, v in _layers(cache)]
            parts.append((layers, torch.ones(copies, layers[0][0].shape[-2], dtype=torch.long)))
        length = max(mask.shape[1] for _, mask in parts)
        padded = [([(_pad(k, length), _pad(v, length)) for k, v in layers], _pad(mask, length))
                  for layers, mask in parts]
        depth = len(padded[0][0])
        self.cache = DynamicCache(ddp_cache_data=[
            (torch.cat([layers[i][0] for layers, _ in padded]), torch.cat([layers[i][1] for layers, _ in padded]))
            for i in range(depth)])
        self.mask = torch.cat([mask for _, mask in padded])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then drop the columns that are padding in all of them."""
        import torch

        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows)
        mask = self.mask[index]
        start = int(torch.nonzero(mask.sum(dim=0))[0])
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self.mask = mask[:, start:]


def _layers(cache: Any) -> list[tuple[Any, Any]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad(tensor: Any, length: int) -> Any:
    """Zeros on the left of the sequence dimension (the last of a mask, the one before last of keys/values)."""
    import torch.nn.functional as F

    missing = length - tensor.shape[-1 if tensor.dim() == 2 else -2]
    if missing == 0:
        return tensor
    return F.pad(tensor, (missing, 0) if tensor.dim() == 2 else (0, 0, missing, 0))
