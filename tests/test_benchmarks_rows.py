"""The benchmark harness's measured-quantity rows, and the mask-loss workload at a small scale (fast)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import rows  # noqa: E402
import run  # noqa: E402


def test_a_metric_row_reports_its_metric_without_warm_up_and_appends_its_summary(monkeypatch):
    calls = []

    def setup(tmp: Path) -> rows.Row:
        def side(value: float):
            def measure() -> dict[str, float]:
                calls.append(value)
                return {"peak": value}

            return measure

        return rows.Row(side(10.0), side(40.0), lambda mine, theirs: None, unit="MiB", note="stub",
                        metric=lambda report: report["peak"], summary=lambda o, r: f"{o:.0f} vs {r:.0f}")

    monkeypatch.setitem(run.ROWS, "stub", setup)
    result = run.run_row("stub", repeat=1)
    assert calls == [10.0, 40.0]  # one measurement per side, no warm-up call
    assert (result["ours"], result["reference"], result["ratio"]) == (10.0, 40.0, 4.0)
    assert result["note"] == "stub; 10 vs 40"


def test_mask_loss_sides_agree_on_a_small_canvas(monkeypatch):
    monkeypatch.setattr(rows, "MASK_CANVAS", (96, 128))
    monkeypatch.setattr(rows, "MASK_HEAD_SIZE", (24, 32))
    monkeypatch.setattr(rows, "MASK_QUERIES", 10)
    monkeypatch.setattr(rows, "MASK_TARGETS", 4)
    monkeypatch.setattr(rows, "MASK_LOGIT_RAMP", 5)
    ours, reference = rows.mask_loss_workload("ours")(), rows.mask_loss_workload("reference")()
    for term in rows.MASK_TERMS:
        assert ours[term] == pytest.approx(reference[term], rel=0.1), term
    with pytest.raises(ValueError, match="side"):
        rows.mask_loss_workload("theirs")


def test_stage2_step_sides_agree_on_the_mask_terms(tmp_path: Path):
    row = rows.stage2_step_time(tmp_path, batch_size=2, image_size=96)
    ours, reference = row.ours(), row.reference()
    row.check(ours, reference)  # same matching, mask terms within rows.STAGE2_TOLERANCE
    assert {*rows.MASK_TERMS, "loss"} <= ours.keys() & reference.keys()
    assert "same matching" in row.check.note


def test_a_row_caps_its_repetitions_and_may_skip_the_full_size_warm_up(monkeypatch):
    calls = []

    def setup(tmp: Path) -> rows.Row:
        return rows.Row(lambda: calls.append("ours"), lambda: calls.append("reference"), lambda mine, theirs: None,
                        repeat=2, warmed=True)

    monkeypatch.setitem(run.ROWS, "capped", setup)
    assert run.run_row("capped", repeat=5)["repeat"] == 2
    assert calls == ["ours", "reference", "reference", "ours"]  # no warm-up, two alternating repetitions


def test_large_photo_sides_give_the_same_segments_on_a_small_photo():
    import predict_rows

    ours, reference = predict_rows._sides((600, 900))  # 2 x 2 tiles of 512 px
    mine, theirs = ours(), reference()
    check = predict_rows._check("small")
    check(mine, theirs)
    assert mine[0].shape == (600, 900) and len(mine[1]) >= 1 and "same segments" in check.note
