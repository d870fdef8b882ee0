"""`cfcml serve`: the champion behind HTTP, checked against `cfcml predict` and the pyfunc.

The services tests train a tiny model (one epoch), register it on the session's MLflow
server with the `champion` alias, start `cfcml serve` as a separate process on a free
loopback port and talk real HTTP to it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cfcml.datasets import write_synthetic
from cfcml.datasets.spec import load_spec
from cfcml.platform.serve_request import Limits, RequestDecoder, RequestError

# ----------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload=None, raw: bytes | None = None, content_type: str = "application/json"):
    body = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url + "/invocations", data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _data_url(path: Path, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _train_and_register(kind: str, tmp: Path, tracking_url: str, name: str):
    """(model URI, cohort) of a one-epoch model registered as NAME@champion."""
    import mlflow
    from mlflow import MlflowClient

    from cfcml.config import build_config
    from cfcml.datasets.reader import load_cohort
    from cfcml.engine.run import train_one
    from cfcml.platform.pyfunc import build_package, log_model

    quick = ["train.epochs=1", "train.select_min_epoch=0", "train.select_window=1", f"data.cache_dir={tmp / 'cache'}"]
    if kind == "men":
        data = write_synthetic("men", tmp / "men", 18, seed=2)
        cfg = build_config(
            "men-smoke", ["data.image_size=[4,16,16]", "model.image_channels=2", "train.batch_size=6", *quick]
        )
        train_one(cfg, data, tmp / "run", fold=1, progress=False)
    else:
        data = write_synthetic("derm7pt", tmp / "derm" / "release_v0", 40, seed=1)
        cfg = build_config("derm7pt-smoke", ["data.image_size=[32,32]", *quick])
        train_one(cfg, data, tmp / "run", seed=0, progress=False)
    cohort = load_cohort(load_spec(kind), data)
    package = build_package(cfg, [{"name": "run1", "weights": tmp / "run" / "best.pt"}], cohort, tmp / "package")
    mlflow.set_tracking_uri(tracking_url)
    with mlflow.start_run():
        info = log_model(package, cohort.spec, registered_model_name=name)
    MlflowClient(tracking_url).set_registered_model_alias(name, "champion", str(info.registered_model_version))
    return f"models:/{name}@champion", cohort, str(info.registered_model_version)


class Server:
    """`cfcml serve` in its own process group, on a free loopback port; stopped by pid."""

    def __init__(self, args: list[str], tracking_url: str, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cfcml.cli",
                    "serve",
                    *args,
                    "--port",
                    str(self.port),
                    "--tracking-uri",
                    tracking_url,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cfcml serve exited {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"cfcml serve did not answer /ping within 240 s:\n{log.read_text()[-3000:]}")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _records(cohort, cases, root: Path, inline: set[int]) -> list[dict]:
    """Request records: images as paths relative to the data root, or inline for rows in `inline`."""
    from cfcml.platform.pyfunc import case_record

    out = []
    for i, case in enumerate(cases):
        rec = case_record(cohort.spec, case)
        for col in [*cohort.spec.series, "mask"]:
            if rec.get(col):
                p = Path(rec[col])
                rec[col] = _data_url(p) if i in inline else str(p.resolve().relative_to(root.resolve()))
        out.append(rec)
    return out


def _probs(frame: pd.DataFrame, classes) -> np.ndarray:
    return frame[[f"prob_{k}" for k in classes]].to_numpy(dtype=float)


def _served_probs(response: dict) -> np.ndarray:
    return np.array([[p["probabilities"][k] for k in response["classes"]] for p in response["predictions"]])


def _check_same_everywhere(tmp_path, url, model_uri, cohort, tracking_url, version, n=4):
    """The same cases through the server (paths and inline), `cfcml predict` and the pyfunc:
    the same probabilities; MLflow's stock scoring function serves the package too."""
    import mlflow
    from mlflow.pyfunc import scoring_server

    from cfcml.cli import main
    from cfcml.platform.pyfunc import cohort_frame

    cases = cohort.cases[:n]
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    direct = pyfunc.predict(cohort_frame(cohort, cases))
    assert (direct["status"] == "ok").all()
    assert (
        main(
            [
                "predict",
                "--model",
                model_uri,
                "--data",
                str(cohort.root),
                "--out",
                str(tmp_path / "p.csv"),
                "--tracking-uri",
                tracking_url,
            ]
        )
        == 0
    )
    csv = pd.read_csv(tmp_path / "p.csv", dtype={"case_id": str}).set_index("case_id").loc[[c.case_id for c in cases]]

    status, text = _post(url, {"dataframe_records": _records(cohort, cases, cohort.root, inline={1, 3})})
    assert status == 200, text
    served = json.loads(text)
    assert served["model"]["name"] == model_uri.split("/")[1].split("@")[0] and served["model"]["alias"] == "champion"
    assert served["model"]["version"] == version
    assert [p["case_id"] for p in served["predictions"]] == [c.case_id for c in cases]
    classes = list(cohort.spec.classes)
    np.testing.assert_allclose(_served_probs(served), _probs(direct, classes), atol=1e-5)
    np.testing.assert_allclose(_probs(csv, classes), _probs(direct, classes), atol=1e-5)
    assert [p["predicted_class"] for p in served["predictions"]] == list(direct["pred"])
    assert all(p["inputs_missing"] == [] for p in served["predictions"])

    # MLflow's own scoring server code serves the registered package unchanged (absolute paths)
    stock = scoring_server.invocations(
        json.dumps({"dataframe_records": cohort_frame(cohort, cases).to_dict("records")}),
        "application/json",
        pyfunc,
        pyfunc.metadata.get_input_schema(),
    )
    assert stock.status == 200
    np.testing.assert_allclose(
        _probs(pd.DataFrame(json.loads(stock.response)["predictions"]), classes), _probs(direct, classes), atol=1e-5
    )

    # a missing series and attribute: treated as the package treats empty cells, and said so
    spec = cohort.spec
    gone_series, gone_attr = spec.series[-1], spec.attribute_names[0]
    rec = _records(cohort, cases[:1], cohort.root, inline=set())[0] | {gone_series: "", gone_attr: None}
    status, text = _post(url, {"dataframe_split": {"columns": list(rec), "data": [list(rec.values())]}})
    assert status == 200, text
    one = json.loads(text)["predictions"][0]
    frame = cohort_frame(cohort, cases[:1])
    frame.loc[0, [gone_series, gone_attr]] = ""
    expected = pyfunc.predict(frame)
    np.testing.assert_allclose(
        _served_probs({"classes": classes, "predictions": [one]}), _probs(expected, classes), atol=1e-5
    )
    assert [m["input"] for m in one["inputs_missing"]] == [gone_series, gone_attr]
    assert "blank" in one["inputs_missing"][0]["treated_as"] and "unknown" in one["inputs_missing"][1]["treated_as"]
    assert gone_series not in one["inputs_used"] and spec.series[0] in one["inputs_used"]
    return pyfunc


def _assert_400(url, payload=None, raw=None, content_type="application/json", field=None, index=None, needle=""):
    status, text = _post(url, payload, raw=raw, content_type=content_type)
    assert status == 400, (status, text)
    assert "Traceback" not in text and 'File "' not in text
    body = json.loads(text)
    errors = body["errors"]
    assert any(
        (field is None or e["field"] == field)
        and (index is None or e["index"] == index)
        and needle.lower() in e["message"].lower()
        for e in errors
    ), errors
    return body


# ----------------------------------------------------------------------------- services


@pytest.fixture(scope="module")
def men_served(mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-men")
    uri, cohort, version = _train_and_register("men", tmp, mlflow_server.url, "serve-test-men")
    server = Server(
        ["--model", uri, "--data-root", str(cohort.root), "--max-request-mb", "2", "--max-cases", "8"],
        mlflow_server.url,
        tmp / "server.log",
    )
    yield server, uri, cohort, version
    server.stop()


@pytest.mark.services
@pytest.mark.slow
def test_volume_cohort_same_probabilities_over_http_predict_and_pyfunc(men_served, mlflow_server, tmp_path):
    server, uri, cohort, version = men_served
    with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(server.url + "/model", timeout=5) as r:
        described = json.loads(r.read())
    assert described["columns"][0] == "case_id" and described["paths_accepted"] is True
    _check_same_everywhere(tmp_path, server.url, uri, cohort, mlflow_server.url, version)


@pytest.mark.services
@pytest.mark.slow
def test_bad_requests_are_400_naming_case_and_field(men_served, tmp_path):
    import nibabel as nib

    server, _, cohort, _ = men_served
    url, spec = server.url, cohort.spec
    good = _records(cohort, cohort.cases[:2], cohort.root, inline=set())
    first = spec.series[0]

    _assert_400(
        url,
        {"dataframe_records": [good[0], good[1] | {"grade_typo": "1"}]},
        field="grade_typo",
        index=1,
        needle="unknown column",
    )
    _assert_400(
        url,
        {"dataframe_records": [{k: v for k, v in good[0].items() if k != "age"}]},
        field="age",
        index=0,
        needle="missing column",
    )
    _assert_400(url, {"dataframe_records": [good[0] | {"sex": "7"}]}, field="sex", needle="unknown sex code")
    _assert_400(url, {"dataframe_records": [good[0] | {"age": 250}]}, field="age", needle="above the maximum")
    _assert_400(url, {"dataframe_records": [good[0] | {"location": True}]}, field="location", needle="expected")
    _assert_400(url, {"dataframe_records": [good[0] | {first: "data:x;base64,@@@"}]}, field=first, needle="base64")
    junk = "data:application/gzip;base64," + base64.b64encode(b"\x1f\x8b" + os.urandom(400)).decode()
    _assert_400(url, {"dataframe_records": [good[0] | {first: junk}]}, field=first, needle="nifti")
    png = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(png, "PNG")
    png_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    _assert_400(url, {"dataframe_records": [good[0] | {first: png_url}]}, field=first, needle="expected a NIfTI")
    flat = tmp_path / "flat.nii.gz"  # a 2D image where a 3D series is expected
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((32, 32)).astype(np.float32), np.eye(4)), flat)
    _assert_400(url, {"dataframe_records": [good[0] | {first: _data_url(flat)}]}, field=first, needle="3D")
    # a case with every input empty
    empty = {k: ("" if k != "case_id" else "x") for k in good[0]}
    _assert_400(url, {"dataframe_records": [empty]}, index=0, needle="every image and attribute is empty")
    # the envelope, the JSON, the content type, the limits
    _assert_400(url, {"instances": good}, needle="dataframe_records")
    _assert_400(url, {"dataframe_records": []}, needle="at least one case")
    _assert_400(url, {"dataframe_records": [good[0]] * 9}, needle="at most 8")
    _assert_400(url, {"dataframe_records": [good[0], good[0]]}, field="case_id", index=1, needle="repeats")
    _assert_400(url, raw=b"{not json", needle="not valid")
    _assert_400(url, raw=b'{"dataframe_records": [{"age": NaN}]}', needle="not valid")
    _assert_400(url, raw=b"a,b\n1,2", content_type="text/csv", field="content-type")
    _assert_400(url, raw=b" " * (2 * 2**20 + 10), needle="at most")
    # several problems at once: every one is listed
    body = _assert_400(
        url,
        {"dataframe_records": [good[0] | {"sex": "9"}, good[1] | {"age": "old"}]},
        field="age",
        index=1,
        needle="not a number",
    )
    assert {(e["index"], e["field"]) for e in body["errors"]} == {(0, "sex"), (1, "age")}
    # and the server still answers good requests
    status, _ = _post(url, {"dataframe_records": good})
    assert status == 200


@pytest.mark.services
@pytest.mark.slow
def test_paths_outside_the_data_root_are_refused(men_served, tmp_path):
    server, _, cohort, _ = men_served
    good = _records(cohort, cohort.cases[:1], cohort.root, inline=set())[0]
    first = cohort.spec.series[0]
    inside = cohort.root / good[first]
    outside = tmp_path / "outside.nii.gz"  # a real volume, outside the root
    outside.write_bytes(inside.read_bytes())
    link_out = cohort.root / "link-out.nii.gz"
    link_in = cohort.root / "link-in.nii.gz"
    link_out.symlink_to(outside)
    link_in.symlink_to(inside)
    try:
        for path in (
            str(outside),
            f"../{outside.parent.name}/{outside.name}",
            f"images/../../{cohort.root.name}/../x",
            "link-out.nii.gz",
            "/etc/hostname",
        ):
            _assert_400(
                server.url,
                {"dataframe_records": [good | {first: path}]},
                field=first,
                index=0,
                needle="outside the server's data root",
            )
        _assert_400(
            server.url, {"dataframe_records": [good | {first: "images/nope.nii.gz"}]}, field=first, needle="no file"
        )
        status, text = _post(server.url, {"dataframe_records": [good | {first: "link-in.nii.gz"}]})  # stays inside
        assert status == 200, text
        status, text = _post(server.url, {"dataframe_records": [good | {first: str(inside)}]})  # absolute, inside
        assert status == 200, text
    finally:
        link_out.unlink()
        link_in.unlink()


@pytest.mark.services
@pytest.mark.slow
def test_photo_cohort_same_probabilities_over_http_predict_and_pyfunc(mlflow_server, tmp_path):
    uri, cohort, version = _train_and_register("derm7pt", tmp_path, mlflow_server.url, "serve-test-derm7pt")
    server = Server(["--model", uri, "--data-root", str(cohort.root)], mlflow_server.url, tmp_path / "server.log")
    try:
        _check_same_everywhere(tmp_path, server.url, uri, cohort, mlflow_server.url, version)
        # PNG is accepted too; a volume sent to a photo model is not
        from PIL import Image

        rec = _records(cohort, cohort.cases[:1], cohort.root, inline=set())[0]
        photo = cohort.spec.series[0]
        png = io.BytesIO()
        with Image.open(cohort.root / rec[photo]) as im:
            im.convert("RGB").save(png, "PNG")
        status, text = _post(
            server.url,
            {
                "dataframe_records": [
                    rec | {photo: "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}
                ]
            },
        )
        assert status == 200, text
        gz = "data:application/gzip;base64," + base64.b64encode(b"\x1f\x8b\x08\x00" + bytes(100)).decode()
        _assert_400(server.url, {"dataframe_records": [rec | {photo: gz}]}, field=photo, needle="PNG or JPEG")
        tiny = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tiny, "PNG")
        tiny_url = "data:image/png;base64," + base64.b64encode(tiny.getvalue()).decode()
        _assert_400(server.url, {"dataframe_records": [rec | {photo: tiny_url}]}, field=photo, needle="smaller than")
        _assert_400(
            server.url, {"dataframe_records": [rec | {"location": "elbow"}]}, field="location", needle="expected one of"
        )
    finally:
        server.stop()


# ----------------------------------------------------------------------------- no services


def test_without_a_data_root_every_path_is_refused(tmp_path):
    spec = load_spec("men")
    decoder = RequestDecoder(spec, None)
    row = {c: "" for c in decoder.columns} | {"case_id": "p1", "age": "50", spec.series[0]: "images/p1/T1C.nii.gz"}
    with pytest.raises(RequestError) as e:
        decoder.decode({"dataframe_records": [row]}, tmp_path)
    (err,) = e.value.errors
    assert err.field == spec.series[0] and err.case == "p1" and "without --data-root" in err.message


def test_missing_value_words_are_missing_inputs_and_limits_apply(tmp_path):
    data = write_synthetic("men", tmp_path / "men", 9, seed=0)
    spec = load_spec("men")
    decoder = RequestDecoder(spec, data, Limits(max_cases=2))
    series = {s: f"images/{{}}/{s}.nii.gz" for s in spec.series}
    ids = sorted(p.name for p in (data / "images").iterdir())
    row = {c: None for c in decoder.columns if c != "mask"} | {"case_id": ids[0], "age": "NA", "sex": 1.0}
    row |= {s: t.format(ids[0]) for s, t in series.items()}
    (case,) = decoder.decode({"dataframe_records": [row]}, tmp_path)
    assert case.row["sex"] == "1" and case.row["age"] == "" and "age" in case.missing and "sex" not in case.missing
    assert Path(case.row[spec.series[0]]).is_absolute() and Path(case.row[spec.series[0]]).is_relative_to(
        data.resolve()
    )
    with pytest.raises(RequestError, match="at most 2"):
        decoder.decode({"dataframe_records": [row] * 3}, tmp_path)
