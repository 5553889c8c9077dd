"""AfI figures and the report: drawn from a fitted estimator, written atomically."""

import json

import numpy as np
import pytest

from tests.afi.test_io import fitted  # noqa: F401 - the fitted estimator fixture
from xcraft.viz.afi import (
    AFI_REPORT_FILE,
    AFI_SUMMARY_FILE,
    plot_channel_importances,
    plot_class_impressions,
    plot_occluder,
    write_afi_report,
)


def test_plots_return_figures(fitted):  # noqa: F811
    assert len(plot_occluder(fitted.delta_, images=np.zeros((2, 8, 8, 3))).axes) >= 5
    assert len(plot_channel_importances(fitted.channel_importance_).axes) == 2
    assert fitted.plot_concept_importances().axes
    assert plot_class_impressions({"colours": np.zeros((8, 8, 3))}).axes


def test_report_is_self_contained(fitted, tmp_path):  # noqa: F811
    summary = write_afi_report(fitted, tmp_path, class_label="red", settings={"seed": 0},
                               impressions={"colours": np.zeros((8, 8, 3))})
    page = (tmp_path / AFI_REPORT_FILE).read_text()
    assert page.count("data:image/png;base64,") == 4 and "http" not in page.split("<main>")[1]
    on_disk = json.loads((tmp_path / AFI_SUMMARY_FILE).read_text())
    assert on_disk["afi"] == summary["afi"]
    assert summary["afi"]["channel_importance"]["colours"] == pytest.approx([1.0, 0.0, 0.0])
    assert [c["name"] for c in summary["afi"]["concepts"]["concepts"]][0] == "red"


def test_the_afi_section_fits_the_craft_report(fitted):  # noqa: F811
    from xcraft.viz.afi import afi_report_section

    html, summary = afi_report_section(fitted, class_label="red")
    assert isinstance(html, str) and "data:image/png;base64," in html
    assert isinstance(summary, dict)  # the pair write_report(extra_sections=...) takes
