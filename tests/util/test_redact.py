"""redact(): credentials never leave the process, whatever string they hide in."""

from __future__ import annotations

import pytest

from cfcml.platform.redact import one_line, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://mlflow:hunter2@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        (
            "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/ray?endpoint_override=127.0.0.1:9000&scheme=http",
            "s3://***:***@bucket/ray?endpoint_override=127.0.0.1:9000&scheme=http",
        ),
        ("https://ghp_0123456789abcdef@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
        ("sqlite:////srv/optuna.db?password=pw&mode=ro", "sqlite:////srv/optuna.db?password=***&mode=ro"),
        ("mysql://u:p@h/db?auth_token=abc&timeout=3", "mysql://u:***@h/db?auth_token=***&timeout=3"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=dead&X-Amz-Security-Token=zz",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***",
        ),
        (
            "aws_secret_access_key=wJalr/K7MDENG AWS_ACCESS_KEY_ID=AKIA1",
            "aws_secret_access_key=*** AWS_ACCESS_KEY_ID=***",
        ),
        ("postgresql://u@db/x?sslpassword=s3cret", "postgresql://u@db/x?sslpassword=***"),
        ('{"password": "two words", "user": "u"}', '{"password": "***", "user": "u"}'),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.x", "Authorization: Bearer ***"),
        (
            "error: could not connect to postgresql://ml:pw@10.0.0.5/db (timeout)",
            "error: could not connect to postgresql://ml:***@10.0.0.5/db (timeout)",
        ),
    ],
)
def test_credentials_are_masked(text, expected):
    assert redact(text) == expected
    assert redact(redact(text)) == expected  # idempotent: a redacted value is a stable lookup key


@pytest.mark.parametrize(
    "text",
    [
        "models:/cfcml-men@champion",
        "runs:/0123abcd/model",
        "postgresql://user@db/mlflow",  # a user name alone is no secret
        "s3://bucket/ray/men-smoke?endpoint_override=127.0.0.1:9000&scheme=http",
        "--set model.num_tokens=16 --set train.lr=1e-3 max_tokens_per_batch=4 bypass=1",
        "error: token: none given",
        "/data/men/clinical.csv row 17: age '1e308' is not a finite number",
    ],
)
def test_harmless_text_is_unchanged(text):
    assert redact(text) == text


def test_limit_and_one_line():
    long = "x" * 10_000
    assert len(redact(long, limit=200)) <= 200 and redact(long, limit=200).endswith("chars)")
    assert redact("short", limit=200) == "short"
    assert one_line("first\n\n  second password=pw \n") == "first | second password=***"
    assert redact(None) == "" and redact(ValueError("token=abc")) == "token=***"
