"""`cfcml serve`: the registered model behind an HTTP endpoint.

The app is MLflow's own scoring server (`mlflow.pyfunc.scoring_server.init`: FastAPI under
uvicorn, ``/ping``, ``/health``, ``/version``, its request timeout) around the very pyfunc
`mlflow.pyfunc.load_model` returns, with ``/invocations`` replaced by one that keeps MLflow's
request format and adds what a clinical endpoint needs and the stock one cannot give:
images inline (data URLs) or as paths confined to ``--data-root``, every image and value
checked before the model runs, HTTP 400 naming case, field and what was expected (never a
traceback), a size limit, and a response that names the model version and the missing
inputs. The model itself stays a standard pyfunc: ``mlflow models serve -m URI`` (or any
MLflow deployment target) hosts it too, with paths in ``dataframe_records``.

Response (200)::

    {"model": {"name": ..., "version": ..., "alias": ..., "uri": ...},
     "classes": [...],
     "predictions": [{"case_id": ..., "probabilities": {class: p, ...}, "predicted_class": ...,
                      "inputs_used": [...], "inputs_missing": [{"input": ..., "treated_as": ...}]}]}
"""

import asyncio
import ipaddress
import json
import logging
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import uvicorn
from fastapi import Request
from fastapi.responses import JSONResponse
from mlflow import MlflowClient
from mlflow.pyfunc import scoring_server

from cfcml.engine.modality_dropout import MISSING_WORD
from cfcml.models.encoders import tabular_embedding

from .predict import PredictError, _mlflow_reason, load_model
from .redact import redact
from .serve_request import FieldError, Limits, RequestDecoder, RequestError, bad
from .tracking_server import TrackingServerError, check_tracking_server, cli_mlflow_client, resolve_tracking_uri

log = logging.getLogger(__name__)

REGISTERED = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?")


@dataclass(frozen=True)
class ModelIdentity:
    uri: str  # what was loaded (an alias resolved to its version at start)
    name: str | None = None
    version: str | None = None
    alias: str | None = None

    def as_json(self) -> dict:
        return {"name": self.name, "version": self.version, "alias": self.alias, "uri": redact(self.uri)}


def resolve_model(model_uri: str, tracking_uri: str | None = None) -> ModelIdentity:
    """Pin ``models:/NAME@ALIAS`` to the version the alias points at now (so the version the
    server names is the one it loaded, even if the alias moves); other URIs as given."""
    m = REGISTERED.fullmatch(model_uri)
    if not m:
        return ModelIdentity(model_uri)
    if m["version"]:
        return ModelIdentity(model_uri, m["name"], m["version"])
    try:
        uri = resolve_tracking_uri(tracking_uri)
        check_tracking_server(uri)
        with cli_mlflow_client():
            version = str(MlflowClient(uri).get_model_version_by_alias(m["name"], m["alias"]).version)
    except TrackingServerError as e:
        raise PredictError(f"cannot load {redact(model_uri)}: {e}") from None
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; each becomes one line
        raise PredictError(f"cannot load {redact(model_uri)}: {_mlflow_reason(e)}") from None
    return ModelIdentity(f"models:/{m['name']}/{version}", m["name"], version, m["alias"])


def missing_treatment(packaged) -> dict[str, str]:
    """What the package does with each input left empty (`cfcml.platform.pyfunc`)."""
    spec, model = packaged.spec, packaged.cfg.model
    out = {s: f"scored without it: a blank (all-zero) {spec.kind.word}" for s in spec.series}
    for a in spec.attributes:
        if not model.use_tabular:
            out[a.column] = "not used: this model does not read the attributes"
        elif tabular_embedding(packaged.cfg).reads_features:
            out[a.column] = "scored without it: its feature columns are zero"
        else:
            out[a.column] = f"scored as {a.sentence_for(MISSING_WORD)!r}"
    return out


class Scorer:
    """Decode, check and score one request payload (no HTTP here; the app calls it)."""

    def __init__(self, pyfunc, identity: ModelIdentity, data_root: Path | None = None, limits: Limits | None = None):
        self.pyfunc = pyfunc
        self.identity = identity
        self.packaged = pyfunc.unwrap_python_model().model
        self.spec = self.packaged.spec
        self.decoder = RequestDecoder(self.spec, data_root, limits)
        self.treatment = missing_treatment(self.packaged)
        self._lock = threading.Lock()  # one prediction at a time: the package's sentence table is shared

    def score(self, payload) -> dict:
        with tempfile.TemporaryDirectory(prefix="cfcml-serve-") as tmp:
            cases = self.decoder.decode(payload, Path(tmp))
            frame = pd.DataFrame([c.row for c in cases], columns=self.decoder.columns)
            with self._lock:
                out = self.pyfunc.predict(frame)
        refused = [(i, c, s) for i, (c, s) in enumerate(zip(cases, out["status"])) if s != "ok"]
        if refused:  # checked inputs the package still could not score: the case's fault, say which
            raise RequestError([FieldError(s.removeprefix("not scored: "), c.row["case_id"], i) for i, c, s in refused])
        names = [*self.spec.series, *self.spec.attribute_names]
        predictions = []
        for case, rec in zip(cases, out.to_dict("records")):
            predictions.append(
                {
                    "case_id": rec["case_id"],
                    "probabilities": {k: float(rec[f"prob_{k}"]) for k in self.spec.classes},
                    "predicted_class": rec["pred"],
                    "inputs_used": [n for n in names if n not in case.missing],
                    "inputs_missing": [{"input": n, "treated_as": self.treatment[n]} for n in case.missing],
                }
            )
        return {"model": self.identity.as_json(), "classes": list(self.spec.classes), "predictions": predictions}

    def describe(self) -> dict:
        """What the endpoint expects (GET /model)."""
        return {
            "model": self.identity.as_json(),
            "dataset": self.spec.name,
            "classes": list(self.spec.classes),
            "image_kind": self.spec.image_kind,
            "columns": self.decoder.columns,
            "optional_columns": [c for c in self.decoder.columns if c not in self.decoder.required],
            "paths_accepted": self.decoder.root is not None,
            "limits": {"max_request_bytes": self.decoder.limits.max_bytes, "max_cases": self.decoder.limits.max_cases},
        }


DRAIN_LIMIT = 8  # an oversized body up to this many times the limit is read to the end before the 400


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        if int(declared) <= DRAIN_LIMIT * limit:
            # read (and drop) what the client is still sending: answering before it has finished
            # makes its send fail with a broken pipe instead of showing it the 400
            async for _ in request.stream():
                pass
        raise bad(f"the request body is {int(declared)} bytes; at most {limit} are accepted (--max-request-mb)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise bad(f"the request body is over {limit} bytes, the most accepted (--max-request-mb)")
    return bytes(body)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes, content_type: str | None):
    mime = (content_type or "application/json").split(";")[0].strip().lower()
    if mime != "application/json":
        raise bad(f"content type {mime!r}: expected application/json", field="content-type")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the body is not valid UTF-8 JSON ({str(e).splitlines()[0][:200]})") from None


def create_app(scorer: Scorer):
    """MLflow's scoring app for the pyfunc, with our ``/invocations`` and ``GET /model``."""
    app = scoring_server.init(scorer.pyfunc)
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/invocations"]
    limit = scorer.decoder.limits.max_bytes

    @app.post("/invocations")
    async def invocations(request: Request):
        try:
            payload = parse_json(await _read_body(request, limit), request.headers.get("content-type"))
            return JSONResponse(await asyncio.to_thread(scorer.score, payload))
        except RequestError as e:
            log.info("400: %s", redact(str(e), limit=500))
            return JSONResponse(e.as_json(), status_code=400)
        except Exception:  # the HTTP boundary: log it here, never send a traceback
            log.exception("internal error while scoring a request")
            return JSONResponse(
                {
                    "error_code": "INTERNAL_ERROR",
                    "message": "internal error while scoring (the server log has the details)",
                },
                status_code=500,
            )

    @app.get("/model")
    async def model():
        return JSONResponse(scorer.describe())

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model_uri: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    data_root: Path | None = None,
    tracking_uri: str | None = None,
    limits: Limits | None = None,
) -> int:
    """Load the model and serve it until interrupted (uvicorn, one process)."""
    if data_root is not None and not Path(data_root).is_dir():
        raise NotADirectoryError(f"--data-root {data_root} is not a folder")
    identity = resolve_model(model_uri, tracking_uri)
    pyfunc = load_model(identity.uri, tracking_uri)
    meta = (pyfunc.metadata.metadata or {}) if pyfunc.metadata else {}
    if meta.get("dataset") is None:
        raise PredictError(f"{redact(model_uri)} is not a cfcml model (its MLmodel metadata names no dataset)")
    scorer = Scorer(pyfunc, identity, data_root, limits)
    if not is_loopback(host):
        log.warning("listening on %s: anyone who can reach this address can score cases (no authentication)", host)
    shown = f"{identity.name} version {identity.version}" if identity.version else redact(identity.uri)
    print(
        f"serving {shown} ({scorer.spec.name}) on http://{host}:{port} (POST /invocations, GET /ping, /health, /model)",
        flush=True,
    )
    uvicorn.run(create_app(scorer), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    return 0
