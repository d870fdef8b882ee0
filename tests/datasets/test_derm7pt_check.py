"""Derm7pt through its schema, on a tiny hand-made `release_v0` with the real layout and quirks.

One test per problem kind: each breaks one thing in the fixture and expects a Problem that
names the case, the file/row and the field. Case ids are `case_num` (the release leaves
`case_id` empty in most rows; nothing reads it).
"""

import csv

import numpy as np
import pytest
from PIL import Image

from cfcml.datasets.cohort import CohortError
from cfcml.datasets.derm7pt.synthetic import META_COLUMNS
from cfcml.datasets.reader import check_cohort, load_cohort
from cfcml.datasets.spec import load_spec
from cfcml.datasets.tabular import feature_names, tabular_features

SPEC = load_spec("derm7pt")


def check_derm7pt(root, **kw):
    return check_cohort(SPEC, root, **kw)


def read_derm7pt(root):
    return load_cohort(SPEC, root)


# (diagnosis, split, clinic, derm, case_id); the 5 attributes are filled in below.
ROWS = [
    ("clark nevus", "train", "Aab/Aab001.jpg", "Aab/AAB002.JPG", "Aab001"),
    ("melanoma (in situ)", "train", "Aab/Aab003.JPG", "Aab/AAB004.jpg", "Aab003"),
    ("basal cell carcinoma", "train", "Aab/Aab005.jpg", "Aab/AAB006.jpg", "Aab005"),  # dropped, indexed
    ("reed or spitz nevus", "valid", "NEL/NEL007.JPG", "NEL/NEL007.JPG", "NEL007"),  # clinic == derm
    ("melanoma (more than 1.5 mm)", "valid", "NEL/Nel009.jpg", "NEL/NEL010.JPG", "NEL009"),
    ("dermal nevus", "test", "NEL/Nel011.jpg", "NEL/NEL012.jpg", "NEL011"),
    ("melanoma", "test", "Xyz/Xyz013.jpg", "Xyz/XYZ014.JPG", "Xyz013"),
    ("seborrheic keratosis", "test", "Xyz/Xyz015.jpg", "Xyz/XYZ016.jpg", "Xyz015"),  # dropped, indexed
]
ATTRS = [
    ("low", "flat", "back", "female", "clinical follow up"),
    ("high", "palpable", "head neck", "male", "excision"),
    ("medium", "nodular", "chest", "male", "excision"),
    ("medium", "palpable", "lower limbs", "female", "no further examination"),
    ("low", "nodular", "acral", "female", "excision"),
    ("low", "flat", "genital areas", "male", "excision"),
    ("high", "flat", "upper limbs", "male", "excision"),
    ("low", "flat", "buttocks", "female", "clinical follow up"),
]
KEPT = {0, 1, 3, 4, 5, 6}


def write_release(root, rows=ROWS, attrs=ATTRS, splits=None, skip_images=()):
    """Write meta.csv, the index files and small JPEGs; returns the list of meta dicts."""
    (root / "meta").mkdir(parents=True)
    metas = []
    for i, ((diag, _, clinic, derm, case_id), a) in enumerate(zip(rows, attrs)):
        meta = dict.fromkeys(META_COLUMNS, "")
        meta.update(
            case_num=str(i + 1),
            diagnosis=diag,
            seven_point_score="1",
            pigment_network="typical",
            streaks="absent",
            pigmentation="absent",
            regression_structures="absent",
            dots_and_globules="regular",
            blue_whitish_veil="absent",
            vascular_structures="absent",
            clinic=clinic,
            derm=derm,
            case_id=case_id,
        )
        meta.update(zip(("level_of_diagnostic_difficulty", "elevation", "location", "sex", "management"), a))
        metas.append(meta)
    write_meta(root, metas)
    splits = splits or {s: [i for i, r in enumerate(rows) if r[1] == s] for s in ("train", "valid", "test")}
    for s, idx in splits.items():
        (root / "meta" / f"{s}_indexes.csv").write_text("indexes\n" + "".join(f"{i}\n" for i in idx))
    rng = np.random.default_rng(0)
    for m in metas:
        for rel in {m["clinic"], m["derm"]} - set(skip_images):
            path = root / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path, format="JPEG")
    return metas


def write_meta(root, metas):
    with open(root / "meta" / "meta.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=META_COLUMNS)
        w.writeheader()
        w.writerows(metas)


@pytest.fixture
def release(tmp_path):
    root = tmp_path / "release_v0"
    return root, write_release(root)


def only_problem(root, **kw):
    cohort, problems = check_derm7pt(root, **kw)
    assert len(problems) == 1, problems
    return cohort, problems[0]


def test_reads_the_fixture_with_its_quirks(release):
    root, _ = release
    assert check_derm7pt(root)[1] == []
    c = read_derm7pt(root)
    assert (c.dataset, c.classes, c.modalities, c.splits) == (
        "derm7pt",
        ("NEV", "MEL"),
        ("clinic", "derm"),
        ("train", "valid", "test"),
    )
    assert [x.case_id for x in c.cases] == [str(i + 1) for i in sorted(KEPT)]  # meta.csv order, dropped gone
    assert c.counts() == {s: {"NEV": 1, "MEL": 1} for s in c.splits}
    assert c.notes == [
        (
            "meta/meta.csv: 2 row(s) dropped: diagnosis is none of NEV, MEL "
            "(basal cell carcinoma 1, seborrheic keratosis 1)"
        )
    ]
    same = next(x for x in c.cases if x.case_id == "4")
    assert same.images[0] == same.images[1] == root / "images" / "NEL/NEL007.JPG"
    mel = c.cases[1]
    assert (mel.label, mel.split) == (1, "train")
    assert mel.sentences == (
        "The level of diagnostic difficulty is high",
        "The lesion elevation is palpable",
        "The lesion location is head neck",
        "The sex of patient is male",
        "The management for the patient is excision",
    )
    assert mel.attributes["management"] == "excision"


def test_tabular_features_are_one_hot(release):
    c = read_derm7pt(release[0])
    x = tabular_features(SPEC, c.cases)
    names = feature_names(SPEC)
    assert x.shape == (6, 20) and x.dtype == np.float32
    assert (x.sum(1) == 5).all()
    assert x[1, names.index("location=head neck")] == 1 and x[1, names.index("sex=male")] == 1


def test_dropped_rows_are_not_checked(tmp_path):
    root = tmp_path / "r"
    write_release(root, skip_images={"Aab/Aab005.jpg"})  # basal cell carcinoma: never read
    assert check_derm7pt(root)[1] == []


def test_missing_image(tmp_path):
    root = tmp_path / "r"
    write_release(root, skip_images={"NEL/NEL010.JPG"})
    cohort, p = only_problem(root)
    assert (p.case, p.field) == ("5", "derm") and "file images/NEL/NEL010.JPG does not exist" in p.message
    assert p.where == "images/NEL/NEL010.JPG"
    assert cohort is not None and len(cohort.cases) == 5  # the valid cases: counts next to problems
    assert "5" not in {c.case_id for c in cohort.cases}


def test_case_mismatch_is_reported_with_the_near_miss(release):
    root, metas = release
    metas[0]["derm"] = "Aab/AAB002.jpg"  # on disk: AAB002.JPG
    write_meta(root, metas)
    _, p = only_problem(root)
    assert (p.case, p.field) == ("1", "derm")
    assert "on disk as 'AAB002.JPG'" in p.message and "case-sensitive" in p.message


def test_missing_folder(release):
    root, metas = release
    metas[0]["clinic"] = "Nope/Aab001.jpg"
    write_meta(root, metas)
    _, p = only_problem(root)
    assert "folder images/Nope does not exist" in p.message


def test_corrupt_and_truncated_jpeg(release):
    root, _ = release
    (root / "images/Xyz/XYZ014.JPG").write_bytes(b"not a jpeg at all")
    good = (root / "images/NEL/Nel011.jpg").read_bytes()
    (root / "images/NEL/Nel011.jpg").write_bytes(good[: len(good) // 2])  # truncated scan data
    _, problems = check_derm7pt(root)  # default: full decode
    assert {(p.case, p.field) for p in problems} == {("7", "derm"), ("6", "clinic")}
    assert all("unreadable image" in p.message for p in problems)
    # Reading only parses headers: it still rejects the non-JPEG.
    with pytest.raises(CohortError) as err:
        read_derm7pt(root)
    assert any(p.case == "7" for p in err.value.problems)


def test_unknown_category_value(release):
    root, metas = release
    metas[5]["location"] = "foot"
    write_meta(root, metas)
    _, p = only_problem(root)
    assert (p.case, p.field) == ("6", "location") and "unknown value 'foot'" in p.message


def test_missing_attribute(release):
    root, metas = release
    metas[1]["elevation"] = ""
    write_meta(root, metas)
    _, p = only_problem(root)
    assert (p.case, p.field, p.message) == ("2", "elevation", "missing value")


def test_duplicate_case_num(release):
    root, metas = release
    metas[4]["case_num"] = "1"
    write_meta(root, metas)
    cohort, p = only_problem(root)
    assert (p.case, p.field) == ("1", "case_num") and "duplicate" in p.message and "data row 0" in p.message
    assert [c.case_id for c in cohort.cases].count("1") == 1  # the first one stays


def test_the_release_as_distributed_empty_case_id_and_notes_are_fine(release):
    """The official release leaves case_id empty in 984 of 1011 rows and notes in nearly all:
    columns the method does not use never make a cohort fail, whatever they hold."""
    root, metas = release
    for m in metas:
        m.update(case_id="", notes="", seven_point_score="?!", streaks="")
    metas[2]["case_id"] = metas[3]["case_id"] = "dup"
    write_meta(root, metas)
    cohort, problems = check_derm7pt(root)
    assert problems == [] and len(cohort.cases) == len(KEPT)


def test_header_only_and_non_utf8_tables_fail_clearly(release):
    root, metas = release
    header = (root / "meta/meta.csv").read_text().splitlines()[0]
    (root / "meta/meta.csv").write_text(header + "\n")
    cohort, problems = check_derm7pt(root)
    assert cohort is None and problems[0].where == "meta/meta.csv" and "no data rows" in problems[0].message
    metas[0]["notes"] = "naevus café"
    write_meta(root, metas)
    (root / "meta/meta.csv").write_bytes((root / "meta/meta.csv").read_text().encode("latin-1"))
    _, problems = check_derm7pt(root)
    assert problems[0].where == "meta/meta.csv line 2" and "not UTF-8" in problems[0].message


def test_index_outside_meta(tmp_path):
    root = tmp_path / "r"
    write_release(root, splits={"train": [0, 1, 2, 8], "valid": [3, 4], "test": [5, 6, 7]})
    _, p = only_problem(root)
    assert p.where.startswith("meta/train_indexes.csv") and p.field == "indexes"
    assert "index 8 is outside" in p.message and "0-based" in p.message


def test_split_lacking_a_class(tmp_path):
    root = tmp_path / "r"
    write_release(root, splits={"train": [0, 1, 2, 4], "valid": [3], "test": [5, 6, 7]})
    _, p = only_problem(root)
    assert p.where == "meta/valid_indexes.csv" and "no MEL case" in p.message


def test_index_file_without_indexes_column(release):
    root, _ = release
    (root / "meta/test_indexes.csv").write_text("index\n5\n6\n7\n")
    _, problems = check_derm7pt(root)
    assert problems[0].where == "meta/test_indexes.csv" and "no 'indexes' column" in problems[0].message
    # ... and, with no test rows left, the test split lacks both classes.
    assert {p.message for p in problems[1:]} == {"split test has no NEV case", "split test has no MEL case"}


def test_row_in_two_splits(tmp_path):
    root = tmp_path / "r"
    write_release(root, splits={"train": [0, 1, 2], "valid": [3, 4, 0], "test": [5, 6, 7]})
    _, p = only_problem(root)
    assert "index 0 is also in the train split" in p.message


def test_missing_meta_and_columns(tmp_path):
    cohort, problems = check_derm7pt(tmp_path)
    assert cohort is None and problems[0].where == "meta/meta.csv"
    write_release(tmp_path / "release_v0")
    assert "release_v0" in check_derm7pt(tmp_path)[1][0].message  # points one level down
    root = tmp_path / "r"
    metas = write_release(root)
    for m in metas:
        del m["management"]
    with open(root / "meta/meta.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in META_COLUMNS if c != "management"])
        w.writeheader()
        w.writerows(metas)
    cohort, problems = check_derm7pt(root)
    assert cohort is None and len(problems) == 1 and "missing column 'management'" in problems[0].message


def test_read_raises_with_every_problem(release):
    root, metas = release
    metas[0]["sex"] = "Male"
    metas[6]["case_num"] = ""
    write_meta(root, metas)
    (root / "images/Aab/AAB004.jpg").unlink()
    with pytest.raises(CohortError) as err:
        read_derm7pt(root)
    assert len(err.value.problems) == 3
    text = str(err.value)
    assert "field sex" in text and "did you mean 'male'" in text and "field case_num" in text
    assert "AAB004.jpg does not exist" in text
