"""The sweep's report section: its figure, table, recommendation and rule, on a known result."""

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from tests import _synthetic
from xcraft import CraftTf
from xcraft.viz.report import write_report
from xcraft.viz.sweep_report import sweep_report_page, sweep_report_section


def _row(layer, rank, error, agreement, stability, r2=0.5):
    return {"layer": layer, "rank": rank, "relative_error": error, "logit_r2": r2,
            "top1_agreement": agreement, "stability": stability, "seconds": 0.25}


@pytest.fixture
def result():
    # Layer "early" rose from r = 4 to r = 8 (not monotone); "late" was not fitted at r = 8;
    # the rule's thresholds are not the defaults, so the text must take them from the result.
    return {
        "rows": [_row("early", 2, 0.3, 0.8, 0.99), _row("early", 4, 0.2, 1.0, 0.9),
                 _row("early", 8, 0.25, 1.0, 0.85), _row("late", 2, 0.4, 0.7, float("nan")),
                 _row("late", 4, 0.35, 0.93, 0.91, r2=-8.0)],
        "recommendation": {"layer": "late", "rank": 4, "qualified": True},
        "monotone": {"early": False, "late": True},
        "split": {"fitted": [0, 2, 3], "held_out": [1]},
        "rule": {"min_agreement": 0.9, "min_stability": 0.875},
    }


def _table_rows(fragment):
    return re.findall(r"<tr(?: style=\"[^\"]*\")?>(.*?)</tr>", fragment)[1:]  # after the header


def test_the_section_shows_the_table_the_choice_and_the_rule(result):
    fragment, summary = sweep_report_section(result, class_label="Trouser")
    assert "<h2>Choosing a layer and a number of concepts</h2>" in fragment
    assert "<strong>Recommended: layer <code>late</code> with 4 concepts.</strong>" in fragment
    assert "to the images of Trouser at 2 layers × 3 numbers of concepts (2, 4, 8), 1 held-out" \
        in fragment
    rows = _table_rows(fragment)
    assert len(rows) == 5
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
    assert cells[4][1:6] == ["4", "0.350", "-8.000", "0.93", "0.910"]
    assert cells[3][5] == "–"  # NaN stability (one seed)
    bold = re.findall(r"<tr style=\"font-weight: 600[^\"]*\">(.*?)</tr>", fragment)
    assert bold == [rows[4]]  # only the recommended candidate
    assert all("not monotone" in row for row in rows[:3]) and "not monotone" not in rows[4]
    assert "the crops): <code>late</code> at r = 8.</p>" in fragment  # the skipped candidate
    assert "is at least 0.9 (the concepts keep" in fragment
    assert "is at least 0.875 (they do not depend" in fragment
    # The picture is a real PNG, embedded.
    uri = re.search(r'src="data:image/png;base64,([^"]+)"', fragment).group(1)
    Image.open(io.BytesIO(base64.b64decode(uri))).verify()
    # The summary is JSON as it stands (NaN as null) and keeps the result's numbers.
    text = json.dumps(summary, allow_nan=False)
    assert json.loads(text)["rows"][3]["stability"] is None
    assert summary["recommendation"] == result["recommendation"]
    assert summary["rule"] == result["rule"] and summary["kind"] == "sweep"


def test_an_unqualified_choice_is_called_the_best_available(result):
    result["recommendation"]["qualified"] = False
    fragment, _ = sweep_report_section(result)
    assert "No candidate met the rule; the best available is layer <code>late</code> with 4 " \
           "concepts." in fragment
    assert "Recommended:" not in fragment


def test_a_result_without_rule_names_the_thresholds(result):
    del result["rule"], result["split"]
    fragment, summary = sweep_report_section(result)
    assert "reaches the sweep&#x27;s `min_agreement`" in fragment
    assert "held-out" not in fragment.split("<table>")[0].split("</p>")[0]
    assert "rule" not in summary


def test_the_page_stands_alone(result):
    page = sweep_report_page(result, class_label="class 1", data_file="sweep.json")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert sweep_report_section(result)[0].split("<img")[0][:60] in page
    assert "<code>sweep.json</code> beside it" in page


def test_write_report_embeds_the_section(result, tmp_path):
    images, _ = _synthetic.make_motif_images(n_images=12, size=32, seed=0)
    craft = CraftTf.from_model(_synthetic.make_motif_model(), _synthetic.FEATURE_LAYER,
                               number_of_concepts=3, patch_size=16, random_state=0,
                               verbose=False)
    craft.fit(images, class_id=0)
    craft.estimate_importance(nb_design=8)
    section = sweep_report_section(result)
    summary = write_report({0: craft}, tmp_path, fidelity=False, n_map_images=0,
                           extra_sections={"sweep": section})
    assert section[0] in (tmp_path / "report.html").read_text()
    saved = json.loads((tmp_path / "summary.json").read_text())["sections"]["sweep"]
    assert saved == summary["sections"]["sweep"] and saved["recommendation"]["layer"] == "late"
    assert saved["rows"][3]["stability"] is None and np.isclose(saved["rows"][4]["logit_r2"], -8)


def test_bad_results_are_refused(result):
    with pytest.raises(TypeError, match=r"`result` must be the dict returned by xcraft\.sweep, "
                                        r"got list\."):
        sweep_report_section([result])
    with pytest.raises(ValueError, match=r"`result` must hold the keys 'rows' and "
                                         r"'recommendation' of xcraft\.sweep, got keys \['rows'\] "
                                         r"\(missing 'recommendation'\)\."):
        sweep_report_section({"rows": result["rows"]})
    with pytest.raises(ValueError, match=r"`result\['rows'\]` must hold at least one candidate"):
        sweep_report_section({**result, "rows": []})
    with pytest.raises(ValueError, match=r"`result\['rows'\]\[0\]` must hold the keys layer, "
                                         r"rank, .* \(missing stability\)\."):
        sweep_report_section({**result, "rows": [{k: v for k, v in result["rows"][0].items()
                                                   if k != "stability"}]})
