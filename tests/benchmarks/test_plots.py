"""compare's figures, drawn from small synthetic results: every legend, label and title lies
on the canvas, no legend covers data or text, and epoch axes count whole epochs."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from directpred_plugin.benchmarks import plots  # noqa: E402
from _synthetic_results import synthetic_results  # noqa: E402

LONG_NAMES = ("mlp", "directpred:freq=5,refresh=iterative", "directcopy:eps=0.3,freq=10", "none")

FIGURES = {
    "accuracy": lambda: plots.accuracy_figure(synthetic_results()),
    "accuracy, one seed, long names": lambda: plots.accuracy_figure(synthetic_results(LONG_NAMES, seeds=(0,))),
    "accuracy, no untrained runs": lambda: plots.accuracy_figure(synthetic_results(untrained=False)),
    "curves, one epoch": lambda: plots.curves_figure(synthetic_results(epochs=1)),
    "curves, 60 epochs, the family": lambda: plots.curves_figure(synthetic_results(
        ("mlp", "linear", "directpred", "directcopy", "directset", "ns", "ns2", "stiefel", "visser",
         "directpred-hybrid", "none"), epochs=60)),
    "probes": lambda: plots.probes_figure(synthetic_results(epochs=3, probe_epochs=[1, 2])),
    "probes, linear": lambda: plots.probes_figure(synthetic_results(epochs=3, probe_epochs=[1, 2],
                                                                    probe_linear=True)),
    "probes, long names": lambda: plots.probes_figure(synthetic_results(LONG_NAMES, epochs=8,
                                                                        probe_epochs=[1, 2, 4])),
}


@pytest.fixture(params=list(FIGURES))
def drawn(request):
    fig = FIGURES[request.param]()
    fig.canvas.draw()
    yield fig
    plots.pyplot().close(fig)


def _legends(fig) -> list:
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


def _labels(fig) -> dict:
    """Every text a reader needs, by name: titles, axis labels, the tick labels that are drawn."""
    renderer = fig.canvas.get_renderer()
    texts = {}
    if fig._suptitle is not None:
        texts["suptitle"] = fig._suptitle.get_window_extent(renderer)
    for n, ax in enumerate(fig.axes):
        for name, text in (("title", ax.title), ("xlabel", ax.xaxis.label), ("ylabel", ax.yaxis.label)):
            if text.get_text():
                texts[f"axes {n} {name}"] = text.get_window_extent(renderer)
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            for tick in axis.get_major_ticks():
                if tick.get_visible() and tick.label1.get_visible() and tick.label1.get_text() and \
                        axis.get_view_interval().min() <= tick.get_loc() <= axis.get_view_interval().max():
                    texts[f"axes {n} {name} tick {tick.label1.get_text()}"] = tick.label1.get_window_extent(renderer)
    return texts


def _data_points(ax) -> np.ndarray:
    """Display coordinates of every plotted point: line vertices and markers, scatter dots, error bars."""
    from matplotlib.collections import LineCollection, PathCollection

    points = [line.get_transform().transform(line.get_xydata()) for line in ax.get_lines()]
    for collection in ax.collections:
        if isinstance(collection, PathCollection):
            points.append(collection.get_offset_transform().transform(collection.get_offsets()))
        elif isinstance(collection, LineCollection):
            points += [collection.get_transform().transform(segment) for segment in collection.get_segments()]
    return np.concatenate([p for p in points if len(p)]) if points else np.empty((0, 2))


def test_every_legend_and_label_lies_on_the_canvas(drawn):
    canvas = drawn.bbox
    inside = lambda box: (box.x0 >= canvas.x0 - 1 and box.y0 >= canvas.y0 - 1  # noqa: E731
                          and box.x1 <= canvas.x1 + 1 and box.y1 <= canvas.y1 + 1)
    legends = _legends(drawn)
    assert legends, "every figure has a legend"
    renderer = drawn.canvas.get_renderer()
    for legend in legends:
        assert inside(legend.get_window_extent(renderer)), (legend.get_window_extent(renderer), canvas)
    labels = _labels(drawn)
    assert any(name.endswith("ylabel") for name in labels)
    for name, box in labels.items():
        assert inside(box), (name, box, canvas)
    tight = drawn.get_tightbbox(renderer)  # inches: everything drawn
    width, height = drawn.get_size_inches()
    assert tight.x0 >= -0.01 and tight.y0 >= -0.01 and tight.x1 <= width + 0.01 and tight.y1 <= height + 0.01


def test_no_legend_covers_data_or_text(drawn):
    from matplotlib.transforms import Bbox

    renderer = drawn.canvas.get_renderer()
    labels = _labels(drawn)
    for legend in _legends(drawn):
        box = legend.get_window_extent(renderer)
        for ax in drawn.axes:
            points = _data_points(ax)
            assert len(points)
            covered = points[(points[:, 0] >= box.x0) & (points[:, 0] <= box.x1)
                             & (points[:, 1] >= box.y0) & (points[:, 1] <= box.y1)]
            assert not len(covered), f"the legend covers data points at {covered[:3]}"
            for line in ax.get_lines():  # and the lines between the points
                if line.get_linestyle() not in ("None", "", " "):
                    path = line.get_transform().transform_path(line.get_path())
                    assert not path.intersects_bbox(Bbox(box.get_points()), filled=False), line.get_label()
        for name, other in labels.items():
            assert not box.overlaps(other), f"the legend covers the {name}"


def test_epoch_axes_count_whole_epochs_and_few_points_show_markers():
    for fig in (plots.curves_figure(synthetic_results(epochs=1)),
                plots.probes_figure(synthetic_results(epochs=3, probe_epochs=[1]))):
        fig.canvas.draw()
        for ax in fig.axes:
            low, high = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
            assert all(line.get_marker() == "o" for line in ax.get_lines() if len(line.get_xdata()) > 0
                       and line.get_linestyle() == "-"), [line.get_marker() for line in ax.get_lines()]
        plots.pyplot().close(fig)
    many = plots.curves_figure(synthetic_results(epochs=60))
    many.canvas.draw()
    ticks = [t for t in many.axes[0].get_xticks() if 1 <= t <= 60]
    assert 2 <= len(ticks) < 20 and all(float(t).is_integer() for t in ticks)
    assert all(line.get_marker() in (None, "None", "") for line in many.axes[0].get_lines())
    plots.pyplot().close(many)


def test_titles_say_epoch_and_seed_in_the_singular_for_one():
    fig = plots.accuracy_figure(synthetic_results(seeds=(0,), epochs=1))
    texts = " ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))
    assert "1 epoch)" in texts and "1 seed" in texts and "1 seeds" not in texts and "1 epochs" not in texts
    plots.pyplot().close(fig)
