"""`benchmarks/moe_experts.py`, the side-by-side timing of transformers' experts implementations (docs/models.md):
it runs, and counts what the choice of default rests on, besides speed."""

from benchmarks.moe_experts import main


def test_grouped_matrix_products_read_the_host_once_where_the_eager_loop_reads_per_expert():
    result = main(["--rounds", "1", "--experts", "16", "--top-k", "2", "--tokens", "32"])
    # In each of the 4 layers' forward the eager loop finds the experts the batch reaches and then each one's
    # tokens, a host read each: 4 x 32 tokens choosing 2 experts each reach well over half of the 16 in a layer.
    # Grouped products sort the tokens on the device; the one read left is transformers' packed-sequence check.
    assert result["grouped_mm"]["host_reads"] == 1
    assert result["eager"]["host_reads"] > 4 * 8
    assert all(r["median_s"] > 0 for r in result.values())
