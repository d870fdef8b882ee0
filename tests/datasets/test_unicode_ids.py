"""Patient ids in any script (issue 23): `MÉN0001` and `病例-001` name folders on every
mainstream file system, so a cohort with them loads and checks cleanly; ids that cannot name
a folder ('/', '..', whitespace, control characters) are refused with one problem naming the
row, and the folder such an id leads to is not reported again as "without a row"."""

from __future__ import annotations

import csv
import shutil
import unicodedata
from pathlib import Path

import pytest

from cfcml.cli import main
from cfcml.datasets import write_synthetic
from cfcml.datasets.men.synthetic import convert_to_layout_b
from cfcml.datasets.reader import check_cohort, load_cohort
from cfcml.datasets.rows import id_problem
from cfcml.datasets.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
GLIOMA = ROOT / "examples" / "glioma-demo.yaml"
UNICODE_IDS = {"GLI0001": "MÉN0001", "GLI0002": "病例-001"}


@pytest.fixture(scope="module")
def glioma_base(tmp_path_factory) -> Path:
    return write_synthetic(load_spec(GLIOMA), tmp_path_factory.mktemp("glioma") / "data", 24, seed=5)


@pytest.fixture(scope="module")
def men_base(tmp_path_factory) -> Path:
    return write_synthetic("men", tmp_path_factory.mktemp("men") / "data", 12, seed=2)


@pytest.fixture
def glioma(glioma_base, tmp_path) -> Path:
    return Path(shutil.copytree(glioma_base, tmp_path / "glioma"))


@pytest.fixture
def men(men_base, tmp_path) -> Path:
    return Path(shutil.copytree(men_base, tmp_path / "men"))


def rename_case(root: Path, old: str, new: str, folder: str | None = None, pattern: str | None = None) -> None:
    """Give case `old` the id `new` in clinical.csv and move its image folder to `folder`
    (default: `new`; a path such as `A/1` makes nested folders); `pattern`: a glob of the case's
    folders (default `images/<old>`)."""
    table = root / "clinical.csv"
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sum(r["id"] == old for r in rows) == 1
    for r in rows:
        r["id"] = new if r["id"] == old else r["id"]
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for src in sorted(root.glob(pattern or f"images/{old}")):
        dst = src.parent / (folder or new)
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)


@pytest.mark.parametrize("cid", ["MÉN0001", "病例-001", "ME\u0301N0001", "Ωμέγα_7", "مريض.12", "환자-٣", "x²"])
def test_ids_in_any_script_may_name_a_folder(cid):
    assert id_problem(cid) is None


@pytest.mark.parametrize(
    ("cid", "why"),
    [
        ("MEN/0001", r"'/' \(U\+002F, solidus\) is not allowed"),
        ("MEN\\0001", r"'\\\\' \(U\+005C, reverse solidus\) is not allowed"),
        ("..", r"'\.\.' is not a folder name"),
        (".", r"'\.' is not a folder name"),
        ("MEN 0001", r"' ' \(U\+0020, space\) is not allowed"),
        ("MEN\t1", r"'\\t' \(U\+0009, whitespace\) is not allowed"),
        ("MEN\x001", r"'\\x00' \(U\+0000, a control character\) is not allowed"),
        ("MEN:1", r"':' \(U\+003A, colon\)"),
        ("MEN\u200b1", r"U\+200B, zero width space"),
        ("病" * 86, r"it is 258 bytes long in UTF-8; a file name holds at most 255"),
    ],
)
def test_ids_that_cannot_name_a_folder_are_refused_with_the_reason(cid, why):
    import re

    problem = id_problem(cid)
    assert problem is not None and re.search(why, problem), problem
    if "not allowed" in why:
        assert "letters and digits of any script" in problem


def test_a_schema_cohort_with_unicode_ids_loads_and_checks_cleanly(glioma, capsys):
    for old, new in UNICODE_IDS.items():
        rename_case(glioma, old, new)
    cohort, problems = check_cohort(load_spec(GLIOMA), glioma)
    assert problems == []
    cases = {c.case_id: c for c in cohort.cases}
    assert set(UNICODE_IDS.values()) <= set(cases) and len(cases) == 24
    assert cases["病例-001"].images[0] == glioma / "images" / "病例-001" / "T1.nii.gz"
    assert len(load_cohort(load_spec(GLIOMA), glioma, deep=True).cases) == 24
    capsys.readouterr()
    assert main(["data", "check", "--dataset", str(GLIOMA), "--root", str(glioma), "--json"]) == 0


def test_a_decomposed_folder_name_is_the_same_id(glioma):
    """A folder written by macOS (NFD: E + U+0301) and a table typed with É (NFC) are one case."""
    nfd = unicodedata.normalize("NFD", "MÉN0001")
    rename_case(glioma, "GLI0001", "MÉN0001", folder=nfd)
    assert nfd != "MÉN0001" and (glioma / "images" / nfd).is_dir()
    cohort, problems = check_cohort(load_spec(GLIOMA), glioma)
    assert problems == []
    case = next(c for c in cohort.cases if c.case_id == "MÉN0001")
    assert all(p.is_file() for p in case.images) and case.images[0].parent.name == nfd


def test_the_same_id_composed_and_decomposed_is_a_duplicate(glioma):
    rename_case(glioma, "GLI0001", "MÉN0001")
    rename_case(glioma, "GLI0002", unicodedata.normalize("NFD", "MÉN0001"))
    _, problems = check_cohort(load_spec(GLIOMA), glioma)
    assert [p.message.split(" (")[0] for p in problems] == ["duplicate case id"], problems


@pytest.mark.parametrize(
    ("cid", "folder"), [("GLI/0003", "GLI/0003"), ("GLI 0003", "GLI 0003"), ("GLI\t0003", "GLI\t0003")]
)
def test_an_id_that_cannot_name_a_folder_is_one_problem_naming_the_row(glioma, cid, folder):
    rename_case(glioma, "GLI0003", cid, folder=folder)
    _, problems = check_cohort(load_spec(GLIOMA), glioma)
    assert len(problems) == 1, "\n".join(map(str, problems))
    (p,) = problems
    assert p.where.startswith("clinical.csv data row ") and p.case == cid and p.field == "id"
    assert p.message.startswith("the id names a folder: ")


def test_the_cli_prints_the_one_problem_and_exits_2(glioma, capsys):
    rename_case(glioma, "GLI0003", "GLI/0003")
    capsys.readouterr()
    assert main(["data", "check", "--dataset", str(GLIOMA), "--root", str(glioma)]) == 2
    err = capsys.readouterr().err
    assert "GLI/0003" in err and "solidus" in err and "without a row" not in err, err


def test_men_with_unicode_ids_in_both_layouts(men, tmp_path):
    """Layout A (images/<id>/) and the authors' fold folders (layout B) take the same ids."""
    rename_case(men, "MEN0001", "MÉN0001")
    rename_case(men, "MEN0002", "病例-001")
    cohort, problems = check_cohort("men", men)
    assert problems == [] and {"MÉN0001", "病例-001"} <= {c.case_id for c in cohort.cases}
    b = convert_to_layout_b(men, tmp_path / "b")
    for folder in b.glob("*fold/*/*/MÉN0001"):  # decomposed on disk, composed in the table
        folder.rename(folder.parent / unicodedata.normalize("NFD", "MÉN0001"))
    cohort_b, problems_b = check_cohort("men", b)
    assert problems_b == []
    assert {c.case_id: c.label for c in cohort_b.cases} == {c.case_id: c.label for c in cohort.cases}


def test_men_refused_id_is_one_problem_in_both_layouts(men, tmp_path):
    b = convert_to_layout_b(men, tmp_path / "b")
    rename_case(men, "MEN0003", "MEN/0003")
    _, problems = check_cohort("men", men)
    assert [(p.case, p.field) for p in problems] == [("MEN/0003", "id")], "\n".join(map(str, problems))
    rename_case(b, "MEN0003", "MEN/0003", pattern="*fold/*/*/MEN0003")  # nested: <grade>/MEN/0003/
    assert list(b.glob("*fold/*/*/MEN/0003/t1_bbox.nii.gz"))
    _, problems_b = check_cohort("men", b)
    assert [(p.case, p.field) for p in problems_b] == [("MEN/0003", "id")], "\n".join(map(str, problems_b))
