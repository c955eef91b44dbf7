"""Rule-based labeler: phrasing variants, negation and uncertainty scope, sides, CheXpert CSV input."""

import pytest

from mrgfast.data.errors import DataFormatError
from mrgfast.data.labeler import CHEXPERT_OBSERVATIONS, OBSERVATIONS, binarize, label_report, read_chexpert_csv


@pytest.mark.parametrize("report, expected", [
    ("No pleural effusion.", {"Pleural Effusion": 0, "Left Pleural Effusion": 0, "Right Pleural Effusion": 0}),
    ("There is no pleural effusion.", {"Pleural Effusion": 0}),
    ("Pleural effusion is not seen.", {"Pleural Effusion": 0}),
    ("Without evidence of pneumothorax.", {"Pneumothorax": 0}),
    ("Heart size is normal.", {"Cardiomegaly": 0}),
    ("The heart is not enlarged.", {"Cardiomegaly": 0}),
    ("Normal heart size.", {"Cardiomegaly": 0}),
    ("Mild cardiomegaly.", {"Cardiomegaly": 1}),
    ("The cardiac silhouette is enlarged.", {"Cardiomegaly": 1}),
    ("Heart size is at the upper limits of normal.", {"Cardiomegaly": -1}),
    ("Possible nodule.", {"Lung Lesion": -1}),
    ("Nodule is possible.", {"Lung Lesion": -1}),
    ("Pneumothorax cannot be excluded.", {"Pneumothorax": -1}),
    ("Cannot exclude pneumothorax.", {"Pneumothorax": -1}),
    ("Findings suggestive of atelectasis or pneumonia.", {"Atelectasis": -1, "Pneumonia": -1}),
    ("No focal consolidation, pleural effusion, or pneumothorax.",
     {"Consolidation": 0, "Pleural Effusion": 0, "Pneumothorax": 0}),
    ("Effusion and pneumothorax are not seen.", {"Pleural Effusion": 0, "Pneumothorax": 0}),
    ("There is no pneumothorax, the heart is enlarged.", {"Pneumothorax": 0, "Cardiomegaly": 1}),
    ("No pleural effusion but there is cardiomegaly.", {"Pleural Effusion": 0, "Cardiomegaly": 1}),
    ("No effusion, nodule is not excluded.", {"Pleural Effusion": 0, "Lung Lesion": -1}),
    ("No change in the small right pleural effusion.", {"Pleural Effusion": 1, "Right Pleural Effusion": 1}),
    ("Pericardial effusion.", {"Pleural Effusion": None}),
    ("ET tube in place. No evidence of pneumonia.", {"Support Devices": 1, "Pneumonia": 0}),
    ("Heart size upper normal.", {"Cardiomegaly": -1}),
    ("Interval resolution of the left effusion.", {"Pleural Effusion": 0, "Left Pleural Effusion": 0}),
    ("Left basilar opacity, likely atelectasis.", {"Lung Opacity": 1, "Atelectasis": -1}),
    ("Mild pulmonary vascular congestion.", {"Edema": 1}),
    ("The cardiomediastinal silhouette is within normal limits.", {"Enlarged Cardiomediastinum": 0}),
    ("No pneumothorax or large pleural effusion.", {"Pneumothorax": 0, "Pleural Effusion": 0}),
])
def test_label_report_phrasing_and_negation(report, expected):
    labels = label_report(report)
    assert set(labels) == set(OBSERVATIONS)
    for name, value in expected.items():
        assert labels[name] == value, (report, name, labels[name])


@pytest.mark.parametrize("report, left, right", [
    ("Small left pleural effusion.", 1, None),
    ("There is a right pleural effusion.", None, 1),
    ("Bilateral pleural effusions.", 1, 1),
    ("Pleural effusions are present bilaterally.", 1, 1),
    ("Blunting of the left costophrenic angle consistent with a small effusion.", 1, None),
    ("No left pleural effusion.", 0, None),
    ("No pleural effusion.", 0, 0),
    ("Right pleural effusion and left lung nodule.", None, 1),
])
def test_effusion_side(report, left, right):
    labels = label_report(report)
    assert (labels["Left Pleural Effusion"], labels["Right Pleural Effusion"]) == (left, right)


def test_nodule_side_and_side_of_each_finding_in_one_clause():
    labels = label_report("Right pleural effusion and left lung nodule.")
    assert labels["Left Lung Lesion"] == 1 and labels["Right Lung Lesion"] is None
    assert label_report("A small nodule is seen in the right lung.")["Right Lung Lesion"] == 1


def test_no_finding_rule_and_blanks():
    normal = label_report("The heart size is normal. No pleural effusion or pneumothorax.")
    assert normal["No Finding"] == 1
    assert all(normal[n] is None for n in ("Edema", "Fracture", "Lung Opacity"))
    assert label_report("Possible small effusion.")["No Finding"] is None
    assert label_report("Cardiomegaly.")["No Finding"] is None
    # Support devices alone do not make a study abnormal (CheXpert's rule).
    assert label_report("Pacemaker in place.")["No Finding"] == 1


def test_works_on_r2gen_cleaned_text():
    labels = label_report("the heart is enlarged . no pleural effusion . possible nodule in the left lung .")
    assert (labels["Cardiomegaly"], labels["Pleural Effusion"], labels["Lung Lesion"]) == (1, 0, -1)


def test_binarize_counts_uncertain_and_blank_as_negative_by_default():
    labels = {"Cardiomegaly": 1, "Pleural Effusion": -1, "Edema": 0}
    names = ("Cardiomegaly", "Pleural Effusion", "Edema", "Fracture")
    assert binarize(labels, names) == [1, 0, 0, 0]
    assert binarize(labels, names, uncertain=1, blank=-9) == [1, 1, 0, -9]


def test_label_report_rejects_non_strings():
    with pytest.raises(TypeError, match="report string"):
        label_report(None)


def test_read_chexpert_csv(tmp_path):
    header = "Reports," + ",".join(CHEXPERT_OBSERVATIONS)
    row = ['"No effusion, mild cardiomegaly."'] + [""] * 14
    row[1 + CHEXPERT_OBSERVATIONS.index("Cardiomegaly")] = "1.0"
    row[1 + CHEXPERT_OBSERVATIONS.index("Pleural Effusion")] = "0.0"
    row[1 + CHEXPERT_OBSERVATIONS.index("Edema")] = "-1.0"
    path = tmp_path / "labeled_reports.csv"
    path.write_text(header + "\n" + ",".join(row) + "\n", encoding="utf-8")
    [(report, labels)] = read_chexpert_csv(path)
    assert report == "No effusion, mild cardiomegaly."
    assert (labels["Cardiomegaly"], labels["Pleural Effusion"], labels["Edema"], labels["Fracture"]) == (1, 0, -1, None)
    assert set(labels) == set(CHEXPERT_OBSERVATIONS)


def test_read_chexbert_csv_report_impression_column(tmp_path):
    path = tmp_path / "chexbert.csv"
    path.write_text("Report Impression,Cardiomegaly,Edema\nbig heart,1,0\n", encoding="utf-8")
    assert read_chexpert_csv(path) == [("big heart", {"Cardiomegaly": 1, "Edema": 0})]


def test_read_chexpert_csv_errors_name_file_row_and_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("Reports,Cardiomegaly\nx,yes\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.csv row 2 column 'Cardiomegaly': expected 1, 0, -1 or blank"):
        read_chexpert_csv(path)
    path.write_text("Text,Cardiomegaly\nx,1\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="no report column"):
        read_chexpert_csv(path)
    path.write_text("Reports,Foo\nx,1\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="none of the CheXpert observation columns"):
        read_chexpert_csv(path)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_chexpert_csv(tmp_path / "missing.csv")
