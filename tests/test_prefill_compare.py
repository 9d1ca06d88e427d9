"""scripts/prefill_compare.py on a small made-up bench log and table."""

import importlib.util
import json
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "prefill_compare.py"
spec = importlib.util.spec_from_file_location("prefill_compare", SCRIPT)
prefill_compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prefill_compare)

LOG = """\
     K      N     M group  var    us/call  TFLOP/s
  4096   4096   256   128  mar      10.00    100.0
  4096   4096   256   128  p41      12.00     80.0
  4096   4096   256   128  p21      11.00     90.0
  4096   4096   512   128  mar      20.00    100.0
  4096   4096   512   128  p41      15.00    130.0
  4096   4096  1024   128  mar      40.00    100.0
  4096   4096  1024   128  p41      25.00    160.0
"""
# The same with a K split's rows at M = 128 and pick_prefill_shape's lines.
LOG_WITH_PICKS = LOG + """\
pick 4096 4096 256 128 p21
pick 4096 4096 1024 128 p41
  4096   4096   128   128  mar      10.00    100.0
  4096   4096   128   128  p21s2    8.00    120.0
  4096   4096   128   128  q41s4    9.00    110.0
pick 4096 4096 128 128 q41s4
"""


def test_best_variant_and_first_winning_m(tmp_path):
    log = tmp_path / "pf_bench.log"
    log.write_text(LOG)
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"entries": [
        {"K": 4096, "N": 4096, "dtype": "float16", "min_m": 512,
         "us": {"256": {"kernel": 10.0, "dense": 30.0}, "512": {"kernel": 20.0, "dense": 18.0},
                "1024": {"kernel": 40.0, "dense": 30.0}}},
        {"K": 4096, "N": 4096, "dtype": "bfloat16", "min_m": None, "us": {"256": {"kernel": 1.0, "dense": 1.0}}},
    ]}))
    rows = prefill_compare.parse(str(log))
    assert rows[(4096, 4096, 256, "128")] == {"mar": 10.0, "p41": 12.0, "p21": 11.0}
    dense = prefill_compare.dense_times(str(table))
    assert dense[(4096, 4096, 512)] == 18.0  # fp16 only
    lines, first = prefill_compare.compare(rows, dense)
    # M = 256: best p21 11.0 against min(10, 30): slower; 512: 15 vs 18; 1024: 25 vs 30.
    assert "p21" in lines[1] and lines[1].split()[-1] == "0.91"
    assert lines[2].split()[-1] == "1.20" and lines[3].split()[-1] == "1.20"
    assert first == {(4096, 4096, "128"): 512}


def test_picks_against_the_fastest_row(tmp_path):
    log = tmp_path / "pf_bench.log"
    log.write_text(LOG_WITH_PICKS)
    rows = prefill_compare.parse(str(log))
    chosen = prefill_compare.picks(str(log))
    assert chosen == {(4096, 4096, 256, "128"): "p21", (4096, 4096, 1024, "128"): "p41",
                      (4096, 4096, 128, "128"): "q41s4"}
    lines = prefill_compare.pick_report(rows, chosen)
    # M = 128: q41s4 9.0 against p21s2 8.0; 256: p21 11.0 against mar 10.0; 1024: p41 is the fastest.
    assert [line.split()[-1] for line in lines[1:]] == ["1.12", "1.10", "1.00"]
    assert lines[1].split()[6] == "p21s2"
