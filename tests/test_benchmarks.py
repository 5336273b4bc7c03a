import json

from benchmarks import step_time


def test_step_time_benchmark_runs_and_writes_results(tmp_path):
    result = step_time.main(["--device", "cpu", "--steps", "1", "--warmup", "0", "--backends", "reference", "auto",
                             "--out", str(tmp_path)])
    names = [r["name"] for r in result["rows"]]
    assert names[0] == "asam-reference" and names[1].startswith("asam-auto (= ")
    assert result["rows"][0]["speedup_vs_reference"] == 1.0
    (js,) = tmp_path.glob("*.json")
    data = json.loads(js.read_text())
    assert data["environment"]["torch"] and data["elements"] == 25_557_032
    assert (tmp_path / js.name.replace(".json", ".md")).read_text().count("| asam-") == 2
