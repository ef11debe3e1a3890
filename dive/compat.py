"""Drop-in for the DivE reference code's `SetwiseSimilarity` (swap one import).

The reference takes flattened (N * set_size, D) embeddings, already L2-normalised, and returns an
(N_img, N_txt) matrix. Smooth-Chamfer runs through the fused `dive.ops.smooth_chamfer` (stable
in fp16/bf16 and at large temperatures, where the reference's plain exp overflows); Chamfer and
max similarity have no fused kernel and are computed in plain PyTorch, chunked over images.
"""
import torch
from torch import Tensor, nn

from .ops import smooth_chamfer

_CHUNK_BYTES = 64 << 20


class SetwiseSimilarity(nn.Module):
    def __init__(self, img_set_size: int, txt_set_size: int, denominator: float,
                 temperature: float = 1.0, backend: str = "auto"):
        super().__init__()
        for name, size in (("img_set_size", img_set_size), ("txt_set_size", txt_set_size)):
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive int, got {size!r}")
        self.img_set_size = img_set_size
        self.txt_set_size = txt_set_size
        self.denominator = denominator
        self.temperature = temperature
        self.backend = backend

    def _sets(self, img_embs: Tensor, txt_embs: Tensor):
        for name, embs, k in (("img_embs", img_embs, self.img_set_size),
                              ("txt_embs", txt_embs, self.txt_set_size)):
            if not isinstance(embs, Tensor) or embs.dim() != 2:
                raise ValueError(f"{name} must be a (N * set_size, D) tensor, got "
                                 f"{getattr(embs, 'shape', type(embs).__name__)}")
            if embs.shape[0] % k:
                raise ValueError(f"{name} has {embs.shape[0]} rows, not a multiple of its set "
                                 f"size {k}")
        return (img_embs.reshape(-1, self.img_set_size, img_embs.shape[1]),
                txt_embs.reshape(-1, self.txt_set_size, txt_embs.shape[1]))

    def smooth_chamfer_similarity(self, img_embs: Tensor, txt_embs: Tensor) -> Tensor:
        x, y = self._sets(img_embs, txt_embs)
        return smooth_chamfer(x, y, temperature=self.temperature, denominator=self.denominator,
                              backend=self.backend)

    def _pair_blocks(self, img_embs, txt_embs):
        """Yields (image offset, cosine blocks (ni, m, NT, n)) without the whole grid at once."""
        x, y = self._sets(img_embs, txt_embs)
        if x.shape[2] != y.shape[2]:
            raise ValueError(f"img_embs and txt_embs must have the same D, got {x.shape[2]} and "
                             f"{y.shape[2]}")
        per_image = max(1, y.shape[0] * self.img_set_size * self.txt_set_size * 4)
        step = max(1, _CHUNK_BYTES // per_image)
        for a0 in range(0, x.shape[0], step):
            yield torch.einsum("amd,bnd->ambn", x[a0:a0 + step], y)

    def chamfer_similarity(self, img_embs: Tensor, txt_embs: Tensor) -> Tensor:
        parts = [(c.amax(3).sum(1) / self.img_set_size + c.amax(1).sum(2) / self.txt_set_size)
                 / self.denominator for c in self._pair_blocks(img_embs, txt_embs)]
        return torch.cat(parts) if parts else img_embs.new_zeros(0, len(txt_embs) // self.txt_set_size)

    def max_similarity(self, img_embs: Tensor, txt_embs: Tensor) -> Tensor:
        parts = [c.amax(dim=(1, 3)) for c in self._pair_blocks(img_embs, txt_embs)]
        return torch.cat(parts) if parts else img_embs.new_zeros(0, len(txt_embs) // self.txt_set_size)

    # The reference code's explicit names for the cosine variants.
    smooth_chamfer_similarity_cosine = smooth_chamfer_similarity
    chamfer_similarity_cosine = chamfer_similarity
    max_similarity_cosine = max_similarity
