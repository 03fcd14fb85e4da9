"""`ats-vit ablate`: every variant at matched measured GMACs, one table, JSON/CSV and a plot."""
import csv
import json

import pytest

from conftest import run


@pytest.mark.slow  # over 10 s on the 2-core CPU
def test_ablate_matches_every_variant_to_the_target_gmacs(tmp_path, capsys):
    code, out, err = run(["ablate", "--limit", "64", "--calib-images", "64", "--batch-size", "64",
                          "--reductions", "0.5", "--timing-repeats", "1", "--workers", "0", "--out", str(tmp_path)],
                         capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "results.json").read_text())
    rows = report["rows"]
    dense, released = rows[:2]
    assert dense["method"] == "dense" and len(rows) == 2 + 9
    assert released["method"] == "ATS 3-11 released (K=all)" and released["num_tokens"] is None
    assert {r["reducer"] for r in rows[1:]} == {"ats", "evit", "tome"}
    assert {r["sampler"] for r in rows[1:] if r["reducer"] == "ats"} == {"inverse_transform", "topk", "random"}
    assert {r["scorer"] for r in rows[1:] if r["reducer"] == "ats"} == {"cls_value", "cls", "all_queries", "random"}
    for r in rows[2:]:
        # calibration and evaluation images are the same 64 here, so the search's result shows
        assert abs(r["gmacs"] - r["target_gmacs"]) <= 0.02 * r["target_gmacs"], r
        assert r["target_gmacs"] == 0.5 * report["meta"]["dense_gmacs"]
    by_label = {r["method"]: r for r in rows}
    for r in rows:  # 95% intervals; each variant's paired difference to ATS at its budget, ATS's to dense
        assert r["top1_low"] <= r["top1"] <= r["top1_high"]
        if r is not dense:
            assert r["vs"] == ("dense" if r["family"] == "ATS 3-11" else "ATS 3-11 -50%")
            assert r["top1_diff"] == pytest.approx(r["top1"] - by_label[r["vs"]]["top1"], abs=0.011)
            assert r["top1_diff_low"] <= r["top1_diff"] <= r["top1_diff_high"]
            if r["vs"] != "dense":  # a rival is compared with dense too
                assert r["top1_diff_dense"] == pytest.approx(r["top1"] - dense["top1"], abs=0.011)
        assert r["top1_diff_low" if r is not dense else "top1_low"] is not None
        assert r["agreement_low"] <= r["agreement"] <= r["agreement_high"] <= 100
    assert dense["agreement"] == 100 and min(r["agreement"] for r in rows) < 100
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 11
    assert (tmp_path / "accuracy_vs_gmacs.png").stat().st_size > 0
    assert "ToMe 3-11 -50%" in out and "EViT 3-11 -50%" in out
