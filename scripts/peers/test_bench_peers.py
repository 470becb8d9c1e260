"""Unit tests of bench_peers.py's roofs (run by scripts/test with pytest)."""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_peers  # noqa: E402


def test_the_roof_is_the_flops_over_the_peak():
    # 3·10⁹ multiply-adds = 6 GFLOP at 200 GFLOP/s: 30 ms.
    assert math.isclose(bench_peers.roof_ms(3_000_000_000, 200.0), 30.0)
    for macs, peak in [(None, 200.0), (0, 200.0), (10, None), (10, 0.0), (10, -1.0), (10, math.inf), (10, math.nan)]:
        assert bench_peers.roof_ms(macs, peak) is None, (macs, peak)


def test_the_roofs_table_has_a_row_per_packed_result_with_a_roof():
    def result(engine, macs, peak, median, ds=None):
        r = {"model": "resnet18", "batch": 64, "variant": "group", "engine": engine, "macs": macs,
             "fma_peak_gflops": peak, "median_ms": median, "winograd_layers": 2}
        r["roof_ms"] = bench_peers.roof_ms(macs, peak)
        r["roof_vs_deepsparse_same_weights"] = r["roof_ms"] / ds if r["roof_ms"] and ds else None
        return r

    rows = bench_peers.roof_rows([
        result("coarsen-packed", 3_000_000_000, 200.0, 40.0, ds=50.0),
        result("coarsen-dense", 3_000_000_000, 200.0, 40.0),
        result("deepsparse", None, None, 50.0),
        result("coarsen-packed", None, None, 40.0),
    ])
    assert len(rows) == 2, rows
    row = rows[1]
    assert row[3] == "3.000" and row[4] == "200.0"
    # 30 ms roof, 40 ms pass: 75% of the roof's rate; 30 / 50 against DeepSparse.
    assert row[7] == "75%" and row[8] == "0.60" and row[9] == "2", row
