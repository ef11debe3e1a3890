"""Full-gallery retrieval on smooth-Chamfer: the whole score matrix, exact streamed top-k, a saved
index of sets, and that index sharded over the ranks of torch.distributed.

- search: similarity_matrix, topk, stable_topk (ties to the lower gallery index);
- index: SetIndex, one gallery in one process, saved as one checked safetensors file;
- sharded: ShardedSetIndex, one SetIndex shard per rank, merged into the exact top-k.
"""
from .index import INDEX_FORMAT, SetIndex
from .search import (BLOCK_BYTES, SET_DTYPES, block_budget, check_sets, similarity_matrix,
                     stable_topk, topk)
from .sharded import ShardedSetIndex, merge_topk

__all__ = ["similarity_matrix", "topk", "stable_topk", "block_budget", "check_sets", "SetIndex",
           "ShardedSetIndex", "merge_topk", "INDEX_FORMAT", "SET_DTYPES", "BLOCK_BYTES"]
