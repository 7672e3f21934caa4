"""The metrics table."""

from slade_dist.eval.report import format_table


def test_table_rows_columns_and_pseudo_labels():
    res = {
        "protocol": "self",
        "models": {
            "teacher": {
                "map_at_r": 0.2,
                "precision_at_1": 0.5,
                "recall_at_1": 0.5,
                "recall_at_10": 0.9,
                "recall_at_2": 0.6,
                "n_queries": 40,
            },
            "student r1": {
                "map_at_r": 0.25,
                "precision_at_1": 0.55,
                "recall_at_1": 0.55,
                "recall_at_10": 0.95,
                "recall_at_2": 0.66,
            },
        },
        "pseudo_labels": {"round 1": {"purity": 0.5, "k": 10}},
    }
    lines = format_table(res).splitlines()
    assert lines[1].split() == ["model", "MAP@R", "P@1", "R@1", "R@2", "R@10"]
    assert lines[3].split() == ["teacher", "20.00", "50.00", "50.00", "60.00", "90.00"]
    assert lines[4].split()[:2] == ["student", "r1"] and "purity 0.500" in lines[-1]
    assert format_table({}) == "(no metrics)"
