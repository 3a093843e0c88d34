"""Storage accounting of Deep Compression (Han, Mao & Dally 2016): what a pruned, clustered
model takes on disk after each of the paper's three stages, per layer and in total.

Per conv/linear weight tensor (flattened row-major), the stages are:

- ``dense``: every weight at 32 bits.
- ``pruned`` (section 2): the non-zeros in a sparse format with *relative* indices: each entry
  stores its distance to the previous entry in ``index_bits`` (8 for conv, 5 for fc layers in the
  paper), so a distance is 1..2**index_bits; a longer gap is bridged by filler entries holding a
  zero, which are stored like weights. Values at 32 bits.
- ``quantized`` (section 3): each entry's value as a fixed-length index into the layer's codebook
  of distinct values (``ceil(log2(#values))`` bits: 2**bits centroids, plus the zero when filler
  entries need it), plus the codebook at 32 bits per value.
- ``huffman`` (section 4): the value indices and the relative indices Huffman-coded separately
  (code lengths from their frequencies in this layer), plus the codebook, plus the code tables
  (one byte per symbol: a canonical Huffman code is rebuilt from its lengths). The paper does not
  say whether it counts code tables; they are a few hundred bytes here.

A layer with no zeros is stored without indices (dense values, then codes, then Huffman codes of
the values). Biases and every other parameter stay at 32 bits in every stage. The values of a
clustered model *are* its codebook (``callbacks/clustering.py`` keeps 2**bits values per layer),
so everything is computed from the final weights; on an unclustered model the ``quantized`` and
``huffman`` stages just code its distinct float values, which can cost more than it saves.
"""

from __future__ import annotations

import csv
import heapq
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

STAGES = ("dense", "pruned", "quantized", "huffman")


def huffman_lengths(counts: Mapping[int, int]) -> dict[int, int]:
    """Code length in bits of each symbol of an optimal prefix code for ``counts`` (symbol ->
    frequency > 0). A single symbol gets length 1 (a code needs at least one bit)."""
    if len(counts) == 1:
        return {next(iter(counts)): 1}
    # heap of (frequency, tie-breaker, symbols under this node); merging two nodes adds one bit to each symbol
    heap = [(n, i, [s]) for i, (s, n) in enumerate(sorted(counts.items()))]
    heapq.heapify(heap)
    lengths = dict.fromkeys(counts, 0)
    tie = len(heap)
    while len(heap) > 1:
        n1, _, left = heapq.heappop(heap)
        n2, _, right = heapq.heappop(heap)
        for s in left + right:
            lengths[s] += 1
        heapq.heappush(heap, (n1 + n2, tie, left + right))
        tie += 1
    return lengths


def huffman_bits(counts: Mapping[int, int]) -> int:
    """Bits of the Huffman-coded message with these symbol frequencies."""
    return sum(counts[s] * length for s, length in huffman_lengths(counts).items())


def _counts(values: Tensor) -> dict[int, int]:
    symbols, counts = torch.unique(values, return_counts=True)
    return {int(s): int(n) for s, n in zip(symbols, counts)}


def layer_storage(weight: Tensor, index_bits: int) -> dict[str, float]:
    """Bytes of one weight tensor at each stage (module docstring), with what they are made of."""
    w = weight.detach().flatten().cpu()
    n = w.numel()
    codebook, codes = torch.unique(w, return_inverse=True)  # (k,), (n,): each weight's value index
    positions = (w != 0).nonzero().flatten()
    nnz = int(positions.numel())
    row = {"params": n, "nonzero": nnz, "distinct_values": int(codebook.numel()), "index_bits": index_bits}
    row["dense"] = 4.0 * n
    if nnz == 0:  # every weight pruned (global pruning can empty a small layer): nothing to store
        row.update(entries=0, value_bits=0, pruned=0.0, quantized=0.0, huffman=0.0, bits_per_weight_huffman=0.0)
        return row
    if nnz == n:  # nothing pruned: dense values, no indices
        entries, value_codes, index_counts = n, codes, {}
    else:
        span = 2**index_bits
        gaps = torch.diff(positions, prepend=torch.tensor([-1]))  # distance to the previous entry, >= 1
        fillers = (gaps - 1) // span  # zero entries bridging a gap longer than the span
        last = gaps - fillers * span  # the distance the non-zero entry itself stores, 1..span
        index_counts = _counts(last)
        if int(fillers.sum()):
            index_counts[span] = index_counts.get(span, 0) + int(fillers.sum())
        zero = int((codebook == 0).nonzero()[0])  # present: the weight has zeros
        value_codes = torch.cat([codes[positions], torch.full((int(fillers.sum()),), zero)])
        entries = int(value_codes.numel())
    distinct = int(torch.unique(value_codes).numel())
    value_bits = max(1, math.ceil(math.log2(distinct)))
    index_total = entries * index_bits if index_counts else 0
    codebook_bytes = 4.0 * distinct
    row.update(entries=entries, value_bits=value_bits)
    row["pruned"] = (entries * 32 + index_total) / 8
    row["quantized"] = (entries * value_bits + index_total) / 8 + codebook_bytes
    value_huffman = huffman_bits(_counts(value_codes))
    index_huffman = huffman_bits(index_counts) if index_counts else 0
    tables = len(_counts(value_codes)) + len(index_counts)  # one byte per code length
    row["huffman"] = (value_huffman + index_huffman) / 8 + codebook_bytes + tables
    row["bits_per_weight_huffman"] = 8 * row["huffman"] / n
    return row


def storage_report(model: nn.Module, index_bits_conv: int = 8, index_bits_fc: int = 5) -> tuple[list[dict], dict[str, float]]:
    """Per-layer rows (conv and linear weights) and model totals ``{stage: bytes}`` (every other
    parameter at 32 bits in each stage)."""
    rows, coded = [], set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            bits = index_bits_fc if isinstance(module, nn.Linear) else index_bits_conv
            rows.append({"layer": name, **layer_storage(module.weight, bits)})
            coded.add(id(module.weight))
    rest = sum(4.0 * p.numel() for p in model.parameters() if id(p) not in coded)
    totals = {stage: sum(r[stage] for r in rows) + rest for stage in STAGES}
    return rows, totals


def storage_metrics(rows: list[dict], totals: dict[str, float]) -> dict[str, float]:
    """``dc/size_bytes_<stage>``, ``dc/ratio_<stage>`` (dense / stage) and per layer
    ``dc/ratio/<layer>`` (dense / huffman) and ``dc/bits_per_weight/<layer>``."""
    metrics = {f"dc/size_bytes_{s}": totals[s] for s in STAGES}
    metrics |= {f"dc/ratio_{s}": totals["dense"] / totals[s] for s in STAGES[1:]}
    for r in rows:
        metrics[f"dc/ratio/{r['layer']}"] = r["dense"] / r["huffman"]
        metrics[f"dc/bits_per_weight/{r['layer']}"] = r["bits_per_weight_huffman"]
    return metrics


def write_report(rows: list[dict], totals: dict[str, float], path: Path) -> Path:
    """The per-layer table and a total line as CSV (bytes per stage and the ratios to dense)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["layer", "params", "nonzero", "entries", "distinct_values", "value_bits", "index_bits", *STAGES,
               "ratio_pruned", "ratio_quantized", "ratio_huffman", "bits_per_weight_huffman"]  # fmt: skip
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for r in [*rows, {"layer": "total (all parameters)", **totals}]:
            writer.writerow(r | {f"ratio_{s}": r["dense"] / r[s] for s in STAGES[1:]})
    return path
