"""calibration/report.md and confidence.png say in words whether the layer search's set ships,
built from hand-made results rather than a calibration run."""

from __future__ import annotations

from conflayers_export.calibrate.report import _markdown, _plot
from conflayers_export.calibrate.settings import Candidate, DraftCandidate, DraftSearchResult, TaskResult

HEADER = {"model": "tiny", "settings": {"search": "cost-aware"}}


def task_result(shipped_skip: list[int], precision: str) -> TaskResult:
    ours = Candidate(skip=[3], origin="conflayers", acceptance_rate=0.5, expected_speedup=0.96)
    shipped = DraftCandidate(
        skip=shipped_skip,
        weight_precision=precision,
        vocab_size=None,
        max_draft_tokens=4,
        confidence_threshold=0.3,
        expected_speedup=1.84,
    )
    return TaskResult(
        task="default",
        chosen=ours,
        recommended=False,
        finalists=[ours],
        baselines=[Candidate(skip=[1], origin="early exit", expected_speedup=0.9)],
        iterations=[
            {
                "iteration": 0,
                "lambda": 0.0,
                "skip": [3],
                "acceptance_rate": 0.5,
                "accepted_per_cycle": 1.0,
                "expected_speedup": 0.96,
            },
            {
                "iteration": 1,
                "lambda": 0.1,
                "skip": [2, 3],
                "acceptance_rate": 0.4,
                "accepted_per_cycle": 0.8,
                "expected_speedup": 0.9,
            },
        ],
        profile={"scores": [0.1, -0.2, 0.3, 0.0], "thresholds": [0.0, 0.0, 0.0, 0.0]},
        drafts=DraftSearchResult([shipped], shipped, plain_tokens_per_second=80.0),
    )


def layer_search_section(markdown: str) -> str:
    return markdown.split("### Layer search", 1)[1]


def test_report_says_the_layer_search_set_lost_and_to_what(tmp_path):
    r = task_result([], "int8")
    section = layer_search_section(_markdown([r], HEADER))
    assert (
        "The layer search's set [3] (expected 0.96x with the bytes model) did not ship: the joint choice "
        "on the target graphs picked no skip, int8, full vocab (expected 1.84x)." in section
    )
    assert "The layer search chose skip set [3]" in section
    _plot(tmp_path / "confidence.png", [r])
    assert (tmp_path / "confidence.png").stat().st_size > 0


def test_report_says_when_the_layer_search_set_ships(tmp_path):
    r = task_result([3], "fp32")
    section = layer_search_section(_markdown([r], HEADER))
    assert (
        "The layer search's set [3] (expected 0.96x with the bytes model) ships: the joint choice on the "
        "target graphs kept it, as skip [3], fp32, full vocab (expected 1.84x)." in section
    )
    assert "did not ship" not in section
    _plot(tmp_path / "confidence.png", [r])


def test_plot_labels_the_axes_and_marks_the_shipped_draft(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    _plot(tmp_path / "confidence.png", [task_result([1, 2], "fp32")])
    left, right = figures[0].axes
    assert right.get_ylabel() == "acceptance rate / expected speedup"
    assert "break-even (speedup 1.0)" in [t.get_text() for t in right.get_legend().get_texts()]
    assert all(tick == int(tick) for tick in right.get_xticks())
    assert "skipped by the shipped draft" in [t.get_text() for t in left.get_legend().get_texts()]
    assert "ships: skip [1, 2], fp32, full vocab" in left.get_title()
    close(figures[0])


def test_no_sentence_without_a_joint_choice():
    r = task_result([], "int8")
    r.drafts = None
    assert "ship" not in layer_search_section(_markdown([r], HEADER))
