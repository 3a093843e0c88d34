"""Deep Compression's storage accounting against hand-computed examples: Huffman code lengths,
relative indices with filler zeros, and the per-stage bytes of a layer and of a model."""

import pytest
import torch
from torch import nn

from kd.compression.deep_compression import huffman_bits, huffman_lengths, layer_storage, storage_metrics, storage_report, write_report


def test_huffman_matches_the_textbook_example():
    counts = {0: 45, 1: 13, 2: 12, 3: 16, 4: 9, 5: 5}  # CLRS 16.3: 224 bits, 'a' alone gets 1 bit
    assert huffman_bits(counts) == 224
    lengths = huffman_lengths(counts)
    assert lengths[0] == 1 and sum(2.0 ** -n for n in lengths.values()) == 1.0  # Kraft: a full prefix code


def test_a_single_symbol_still_costs_a_bit_each():
    assert huffman_bits({7: 10}) == 10


def test_relative_indices_bridge_long_gaps_with_filler_zeros():
    w = torch.zeros(20)
    w[[0, 3, 15]] = torch.tensor([1.0, 2.0, 1.0])
    row = layer_storage(w, index_bits=3)  # span 8: distances 1, 3, 12 -> 12 = filler (8) + 4
    assert row["entries"] == 4 and row["nonzero"] == 3 and row["value_bits"] == 2  # codebook {0, 1, 2}
    assert row["dense"] == 80
    assert row["pruned"] == (4 * 32 + 4 * 3) / 8  # 17.5: values at 32 bits + 3-bit indices
    assert row["quantized"] == (4 * 2 + 4 * 3) / 8 + 3 * 4  # 2-bit codes + indices + codebook
    # values {1: 2, 2: 1, 0: 1} -> lengths 1, 2, 2 = 6 bits; indices {1, 3, 4, 8} once each -> 8 bits;
    # codebook 12 bytes; code tables 3 + 4 bytes
    assert row["huffman"] == (6 + 8) / 8 + 12 + 7


def test_an_unpruned_layer_is_stored_without_indices():
    w = torch.tensor([0.5, -0.5, 0.5, 0.5])
    row = layer_storage(w, index_bits=5)
    assert row["entries"] == 4 and row["pruned"] == row["dense"] == 16
    assert row["quantized"] == 4 * 1 / 8 + 2 * 4  # 1-bit codes + two codebook values
    assert row["huffman"] == 4 / 8 + 8 + 2


def test_model_totals_add_the_other_parameters_at_32_bits(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.0, 0.25]).repeat(9).view(2, 1, 3, 3))  # half zeros, one value
        model[2].weight.zero_()[:, 0] = 1.0
    rows, totals = storage_report(model, index_bits_conv=8, index_bits_fc=5)
    assert [r["layer"] for r in rows] == ["0", "2"] and rows[1]["index_bits"] == 5
    biases = 4 * (2 + 4)
    for stage in ("dense", "pruned", "quantized", "huffman"):
        assert totals[stage] == pytest.approx(rows[0][stage] + rows[1][stage] + biases)
    metrics = storage_metrics(rows, totals)
    assert metrics["dc/ratio_huffman"] == pytest.approx(totals["dense"] / totals["huffman"])
    assert metrics["dc/ratio/2"] == pytest.approx(rows[1]["dense"] / rows[1]["huffman"])
    lines = write_report(rows, totals, tmp_path / "dc.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("total")


def test_a_layer_with_no_weights_left_stores_nothing():
    # global magnitude pruning at 90% of a small MLP can empty a layer; the accounting used to hit log2(0)
    row = layer_storage(torch.zeros(3, 4), 5)
    assert (row["params"], row["nonzero"], row["entries"]) == (12, 0, 0)
    assert row["pruned"] == row["quantized"] == row["huffman"] == 0.0 and row["dense"] == 48.0


def test_gaps_of_exactly_one_and_two_spans_need_zero_and_one_filler():
    # span 8 (3-bit indices): gap 8 is stored as it is, gap 16 as a filler (8) + 8
    w = torch.zeros(24)
    w[[7, 23]] = torch.tensor([1.0, 2.0])  # gaps from the start (-1): 8, then 16
    row = layer_storage(w, index_bits=3)
    assert row["entries"] == 3 and row["value_bits"] == 2
    assert row["pruned"] == (3 * 32 + 3 * 3) / 8
    assert row["quantized"] == (3 * 2 + 3 * 3) / 8 + 3 * 4
    # values {1, 2, 0} once each: lengths 1, 2, 2 = 5 bits; the index 8 three times: 1 bit each;
    # codebook 12 bytes; code tables 3 + 1 bytes
    assert row["huffman"] == (5 + 3) / 8 + 12 + 4
    assert row["bits_per_weight_huffman"] == 8 * row["huffman"] / 24


def test_an_emptied_layer_reports_zero_for_every_coded_quantity():
    row = layer_storage(torch.zeros(3, 4), 5)
    assert row == {"params": 12, "nonzero": 0, "distinct_values": 1, "index_bits": 5, "dense": 48.0, "entries": 0,
                   "value_bits": 0, "pruned": 0.0, "quantized": 0.0, "huffman": 0.0, "bits_per_weight_huffman": 0.0}


def test_the_report_csv_and_metrics_hold_every_stage_and_ratio(tmp_path):
    import csv

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.0, 0.25]).repeat(9).view(2, 1, 3, 3))
        model[2].weight.zero_()[:, 0] = 1.0
    rows, totals = storage_report(model, index_bits_conv=8, index_bits_fc=5)
    assert [r["index_bits"] for r in rows] == [8, 5]  # conv and linear layers get their own index width
    assert [r["index_bits"] for r in storage_report(model)[0]] == [8, 5]  # Han et al.'s widths are the defaults
    path = write_report(rows, totals, tmp_path / "new" / "folder" / "dc.csv")  # folders are made
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["layer", "params", "nonzero", "entries", "distinct_values", "value_bits", "index_bits",
                                     "dense", "pruned", "quantized", "huffman", "ratio_pruned", "ratio_quantized",
                                     "ratio_huffman", "bits_per_weight_huffman"]  # fmt: skip
        read = list(reader)
    for line, source in zip(read, [*rows, totals]):
        for stage in ("pruned", "quantized", "huffman"):
            assert float(line[f"ratio_{stage}"]) == pytest.approx(source["dense"] / source[stage])
    assert float(read[0]["bits_per_weight_huffman"]) == pytest.approx(rows[0]["bits_per_weight_huffman"])
    metrics = storage_metrics(rows, totals)
    assert {k for k in metrics if k.startswith("dc/size_bytes_")} == {f"dc/size_bytes_{s}" for s in ("dense", "pruned", "quantized", "huffman")}
    for stage in ("pruned", "quantized", "huffman"):
        assert metrics[f"dc/ratio_{stage}"] == pytest.approx(totals["dense"] / totals[stage])
    assert metrics["dc/bits_per_weight/0"] == rows[0]["bits_per_weight_huffman"]
