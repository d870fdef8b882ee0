"""MEN through its schema (and the authors' layout): every kind of problem is found and named precisely."""

from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cfcml.datasets.cohort import CohortError
from cfcml.datasets.men.synthetic import convert_to_layout_b, write_synthetic_men
from cfcml.datasets.reader import check_cohort, load_cohort


def check_men(root, deep=True):
    return check_cohort("men", root, deep=deep)


def read_men(root):
    return load_cohort("men", root)


def line(n: int, name: str = "clinical.csv") -> str:
    """Where a problem on file line n of a table is reported."""
    return f"{name} data row {n - 2} (line {n})"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    # 9 patients, 3 folds: exactly one patient of each class per fold.
    return write_synthetic_men(tmp_path_factory.mktemp("men") / "a", patients=9, seed=1, shape=(24, 24, 6))


@pytest.fixture
def root(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "men"))


def rows(root: Path, name: str = "clinical.csv") -> list[dict]:
    with open(root / name, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(root: Path, table: list[dict], name: str = "clinical.csv") -> None:
    with open(root / name, "w", newline="") as f:
        w = csv.DictWriter(f, list(table[0]))
        w.writeheader()
        w.writerows(table)


def edit(root: Path, i: int, **cells) -> str:
    """Set cells of data row i; return that row's patient id."""
    table = rows(root)
    table[i].update(cells)
    write_rows(root, table)
    return table[i]["id"]


def find(problems, **want):
    hits = [p for p in problems if all(getattr(p, k) == v for k, v in want.items())]
    assert hits, f"no problem with {want}; got:\n" + "\n".join(map(str, problems))
    return hits[0]


def test_clean_cohort_has_no_problems(root):
    cohort, problems = check_men(root)
    assert problems == []
    assert len(cohort.cases) == 9


def test_missing_image_file(root):
    cid = rows(root)[0]["id"]
    (root / "images" / cid / "ADC.nii.gz").unlink()
    cohort, problems = check_men(root)
    p = find(problems, case=cid, field="ADC")
    assert p.where == f"images/{cid}/ADC.nii.gz" and "missing" in p.message
    assert cid not in {c.case_id for c in cohort.cases}


def test_truncated_nifti_found_by_deep_check(root):
    cid = rows(root)[1]["id"]
    path = root / "images" / cid / "FLAIR_C.nii.gz"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    _, problems = check_men(root)
    p = find(problems, case=cid, field="FLAIR_C", where=f"images/{cid}/FLAIR_C.nii.gz")
    assert "corrupt" in p.message


def test_garbage_nifti(root):
    cid = rows(root)[2]["id"]
    (root / "images" / cid / "T1C.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 30))
    _, problems = check_men(root, deep=False)  # the header alone already fails
    find(problems, case=cid, field="T1C", where=f"images/{cid}/T1C.nii.gz")


def _rewrite(path: Path, affine=None, data=None):
    img = nib.load(str(path))
    nib.save(
        nib.Nifti1Image(np.asanyarray(img.dataobj) if data is None else data, img.affine if affine is None else affine),
        str(path),
    )


def test_series_outside_the_t1c_space(root):
    cid = rows(root)[3]["id"]
    path = root / "images" / cid / "ADC.nii.gz"
    aff = nib.load(str(path)).affine.copy()
    aff[0, 3] += 15.0  # FOV is 24 mm wide: now only ~40% overlaps the T1C
    _rewrite(path, affine=aff)
    _, problems = check_men(root)
    p = find(problems, case=cid, field="ADC", where=f"images/{cid}/ADC.nii.gz")
    assert "field of view" in p.message


def test_series_rotated_beyond_tolerance(root):
    cid = rows(root)[4]["id"]
    path = root / "images" / cid / "FLAIR_C.nii.gz"
    aff = nib.load(str(path)).affine.copy()
    t = np.radians(30)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff[:3, :3] = rot @ aff[:3, :3]
    _rewrite(path, affine=aff)
    _, problems = check_men(root)
    assert "rotated" in find(problems, case=cid, field="FLAIR_C").message


def test_flipped_and_permuted_grid_is_fine(root):
    # Same space, axes reordered and flipped: resampling handles it, so no problem.
    cid = rows(root)[5]["id"]
    path = root / "images" / cid / "ADC.nii.gz"
    img = nib.load(str(path))
    aff = img.affine.copy()
    aff[:3, 3] += aff[:3, 0] * (img.shape[0] - 1)  # flip X: voxel 0 is now the last one
    aff[:3, 0] *= -1
    aff[:, [0, 1]] = aff[:, [1, 0]]  # swap X and Y voxel axes
    data = np.transpose(np.asanyarray(img.dataobj)[::-1], (1, 0, 2))
    _rewrite(path, affine=aff, data=data)
    _, problems = check_men(root)
    assert problems == []


def test_unknown_category_values(root):
    cid0 = edit(root, 0, location="4")
    cid1 = edit(root, 1, sex="F")
    _, problems = check_men(root)
    p = find(problems, case=cid0, field="location", where=line(2))
    assert "4" in p.message
    find(problems, case=cid1, field="sex", where=line(3))


def test_missing_and_non_numeric_attributes(root):
    cid0 = edit(root, 0, age="")
    cid2 = edit(root, 2, tumor_area="big")
    _, problems = check_men(root)
    assert "missing" in find(problems, case=cid0, field="age").message
    assert "not a number" in find(problems, case=cid2, field="tumor_area", where=line(4)).message


def test_duplicate_patient_id(root):
    table = rows(root)
    table.append(dict(table[0]))
    write_rows(root, table)
    _, problems = check_men(root)
    p = find(problems, case=table[0]["id"], field="id", where=line(len(table) + 1))
    assert "duplicate" in p.message


def test_label_outside_classes(root):
    cid = edit(root, 3, grade="G3")
    _, problems = check_men(root)
    assert "G3" in find(problems, case=cid, field="grade", where=line(5)).message


def test_patient_without_images_and_folder_without_row(root):
    cid = rows(root)[0]["id"]
    shutil.rmtree(root / "images" / cid)
    shutil.copytree(root / "images" / rows(root)[1]["id"], root / "images" / "MEN9999")
    _, problems = check_men(root)
    assert "folder images/" + cid + " does not exist" in find(problems, case=cid).message
    assert "without a row" in find(problems, case="MEN9999", where="images/MEN9999").message


def test_missing_fold_assignment(root):
    cid = edit(root, 4, fold="")
    _, problems = check_men(root)
    assert "fold" in find(problems, case=cid, field="fold", where=line(6)).message


def test_fold_lacking_a_class(root):
    table = rows(root)
    for r in table:
        if r["grade"] == "G2inv" and r["fold"] == "2":
            r["fold"] = "1"
    write_rows(root, table)
    _, problems = check_men(root)
    p = find(problems, field="fold", case=None)
    assert "fold 2" in p.message and "G2inv" in p.message


def test_bad_fold_in_splits_file(root):
    table = rows(root)
    write_rows(root, [{"id": r["id"], "fold": r["fold"]} for r in table], "splits.csv")
    table2 = rows(root, "splits.csv")
    table2[0]["fold"] = "zero"
    write_rows(root, table2, "splits.csv")
    _, problems = check_men(root)
    find(problems, case=table2[0]["id"], field="fold", where=line(2, "splits.csv"))


def test_read_men_raises_with_every_problem(root):
    cid = edit(root, 0, sex="2")
    edit(root, 1, grade="G9")
    (root / "images" / cid / "T1C.nii.gz").unlink()  # a bad row still gets its images checked
    with pytest.raises(CohortError) as err:
        read_men(root)
    assert sorted((p.case, p.field) for p in err.value.problems) == sorted(
        [(cid, "sex"), (cid, "T1C"), (rows(root)[1]["id"], "grade")]
    )
    assert "field sex" in str(err.value)


def test_not_a_cohort(tmp_path):
    cohort, problems = check_men(tmp_path)
    assert cohort is None and problems[0].where == "clinical.csv" and "file not found" in problems[0].message


# ----------------------------------------------------------------------------- layout B


@pytest.fixture
def root_b(root, tmp_path) -> Path:
    return convert_to_layout_b(root, tmp_path / "b")


def test_layout_b_patient_in_two_test_folders(root_b):
    src = next((root_b / "1fold" / "test" / "Grade_1").iterdir())
    dst = root_b / "2fold" / "test" / "Grade_1" / src.name
    shutil.rmtree(root_b / "2fold" / "train" / "Grade_1" / src.name)
    shutil.copytree(src, dst)
    _, problems = check_men(root_b)
    assert "several folds" in find(problems, case=src.name, field="fold").message


def test_layout_b_grade_folder_disagrees_with_table(root_b):
    table = rows(root_b)
    g1 = next(r for r in table if r["grade"] == "G1")
    g1["grade"] = "G2inv"
    write_rows(root_b, table)
    _, problems = check_men(root_b)
    assert "disagrees" in find(problems, case=g1["id"], field="grade").message


def test_layout_b_missing_series(root_b):
    folder = next((root_b / "3fold" / "test" / "Grade_2_invasion").iterdir())
    (folder / "t2_bbox.nii.gz").unlink()
    _, problems = check_men(root_b)
    p = find(problems, case=folder.name, field="FLAIR_C")
    assert p.where == f"3fold/test/Grade_2_invasion/{folder.name}/t2_bbox.nii.gz"
