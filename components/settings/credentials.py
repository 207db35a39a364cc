"""Credentials in configuration values: where they go, and their redaction wherever a value leaves the process.

The contract (docs/security.md): credentials live in the environment, never in the configuration's URIs.
A URI that carries one still works in the process that read it, and is redacted (``user:***@``, and the
values of password-like query parameters) wherever cliploop writes, logs or prints the configuration:
``config.resolved.yaml``, ``cliploop config``, MLflow run parameters, Prefect flow-run parameters, the
deployed configuration and the console's error lines. When the configuration is loaded (:func:`secure`):

- ``mlflow.tracking_uri`` on http(s): the user and password move to ``MLFLOW_TRACKING_USERNAME`` /
  ``MLFLOW_TRACKING_PASSWORD``, which MLflow reads itself, and the URI keeps only where the server is. MLflow's
  own error messages quote the URI it was given, and a worker handed the configuration authenticates from its
  environment the same way.
- ``s3.endpoint_url``: S3 clients sign requests with the AWS credentials and never send a URL's password, so
  the user and password are dropped.
- any other value (a database URI, an SFTP artifact root): kept as given in this process, which uses it, and
  remembered so that a flow run of this process that is handed the redacted configuration gets it back
  (:func:`restore`); another process needs the value from its own environment.

Each case is reported once per process with a line that says where the credential belongs.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"

# A password in a URL's userinfo: scheme://user:password@. The password runs to the last "@" before the path, so
# an unencoded "@" in it is masked whole; a lone user name (git@, a login) is not secret and stays.
_USERINFO = re.compile(r"(?i)(?P<lead>\b[a-z][a-z0-9+.\-]*://[^:/?#@\s]*:)(?P<secret>[^/?#\s]+)@")
# Query parameters that carry a secret: passwords and tokens, and the signatures and credentials of
# presigned S3 / GCS URLs (whoever holds one can read the object until it expires).
_SECRET_PARAMS = (
    "password|passwd|pwd|pass|secret|client_secret|token|access_token|refresh_token|id_token|auth|api_key|apikey"
    "|sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential"
    "|awsaccesskeyid"
)
_QUERY = re.compile(rf"(?i)(?P<lead>[?&;](?:{_SECRET_PARAMS})=)(?P<secret>[^&#\s\"']+)")

log = logging.getLogger("cliploop")
_said: set[str] = set()
# Redacted form -> the value as given, for the values this process keeps (see restore()).
_kept: dict[str, str] = {}


def redact(text: str) -> str:
    """``text`` with every URL password and secret query value replaced by ``***`` (any text: a URI, a message)."""
    text = _USERINFO.sub(lambda m: m["lead"] + MASK + "@", text)
    return _QUERY.sub(lambda m: m["lead"] + MASK, text)


def redacted(doc: Any) -> Any:
    """A copy of plain data (a config as a dict, parameters) with :func:`redact` applied to every string."""
    if isinstance(doc, str):
        return redact(doc)
    if isinstance(doc, dict):
        return {key: redacted(value) for key, value in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [redacted(value) for value in doc]
    return doc


def restore(doc: Any) -> Any:
    """A configuration handed over as data, with the values this process keeps put back where they were redacted."""
    if isinstance(doc, str):
        return _kept.get(doc, doc)
    if isinstance(doc, dict):
        return {key: restore(value) for key, value in doc.items()}
    if isinstance(doc, list):
        return [restore(value) for value in doc]
    return doc


def _without_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """``uri`` without ``user:password@``, and the user and password it carried (percent-decoded)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), unquote(user) or None, unquote(password) or None


def _say(value: str, message: str) -> None:
    """Warn once per process for each value (redacted here: the key of what was said) and message."""
    said = f"{redact(value)}\n{message}"
    if said not in _said:
        _said.add(said)
        log.warning("cliploop: %s", message)


def secure(config) -> None:
    """Apply the contract above to a loaded configuration (in place; see the module's docstring)."""
    uri = config.mlflow.tracking_uri
    if uri and uri.lower().startswith(("http://", "https://")) and "@" in urlsplit(uri).netloc:
        bare, user, password = _without_userinfo(uri)
        # The URI's credential must go: requests would send it instead of MLflow's (a URL's user wins).
        config.mlflow.tracking_uri = bare
        given = (os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD"))
        if password and password != MASK:
            if any(given) and given != (user or "", password):  # set by the user (equal: by an earlier load)
                _say(
                    uri,
                    "mlflow.tracking_uri carries a password, and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                    "are set: those are used; remove the password from the URI (docs/security.md)",
                )
            else:
                os.environ["MLFLOW_TRACKING_USERNAME"] = user or ""
                os.environ["MLFLOW_TRACKING_PASSWORD"] = password
                _say(
                    uri,
                    "mlflow.tracking_uri carries a password: used through MLFLOW_TRACKING_USERNAME / "
                    "MLFLOW_TRACKING_PASSWORD in this process and never written; set those variables instead "
                    "(docs/security.md)",
                )
    endpoint = config.s3.endpoint_url
    if endpoint and "@" in urlsplit(endpoint).netloc:
        config.s3.endpoint_url = _without_userinfo(endpoint)[0]
        _say(
            endpoint,
            "s3.endpoint_url carries a user or password, which S3 clients never send (requests are signed with "
            "the AWS credentials): left out; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (docs/security.md)",
        )
    for key, value in _strings(config.model_dump(mode="json")):
        masked = redact(value)
        if masked != value:
            _kept[masked] = value
            _say(
                value,
                f"{key} carries a credential: used in this process and redacted wherever cliploop writes or prints "
                "it; a process handed the configuration needs the value from its own environment (docs/security.md)",
            )


def _strings(doc: Any, prefix: str = ""):
    """(dotted key, value) of every string in a nested config dump."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _strings(value, f"{prefix}{key}.")
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _strings(value, f"{prefix}{i}.")
    elif isinstance(doc, str):
        yield prefix.rstrip("."), doc
