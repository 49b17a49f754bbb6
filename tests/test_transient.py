"""Which store errors the delivery retries (transient) and which it reports as a rejection: by
exception type and error code, never by the message text."""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from mlflow.exceptions import MlflowException, RestException

from gradsweep.track.delivery import is_transient, mlflow_client

pytestmark = pytest.mark.unit

#: run id -> (HTTP status, body) the fake gateway answers for runs/get
ANSWERS = {
    "gateway503": (503, "<html>Service Temporarily Unavailable</html>"),
    "rejected503": (400, json.dumps({"error_code": "INVALID_PARAMETER_VALUE",
                                     "message": "Run '5035030503' has no key 'loss/503': 503 504 502"})),
    "busy": (409, json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "try again"})),
    "gatewayjson": (409, json.dumps({"error_code": "504", "message": "upstream timed out"})),
}


class _Gateway(BaseHTTPRequestHandler):
    def do_GET(self):  # http.server calls it by this name
        run_id = parse_qs(urlsplit(self.path).query).get("run_id", [""])[0]
        status, body = ANSWERS[run_id]
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if body.startswith("{") else "text/html")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def gateway():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _error(client, run_id: str) -> MlflowException:
    with pytest.raises(MlflowException) as info:
        client.get_run(run_id)
    return info.value


@pytest.fixture
def no_retries(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # one request per call: no backoff waits


def test_a_rejection_that_mentions_503_is_not_transient(store, gateway, no_retries):
    """A run id, key or message with the digits of a gateway status is a rejection: retried forever
    when the message text decided."""
    missing = _error(mlflow_client(store), "5035030503")  # the embedded store: RESOURCE_DOES_NOT_EXIST
    assert "503" in str(missing) and not is_transient(missing)
    rejected = _error(mlflow_client(gateway), "rejected503")
    assert isinstance(rejected, RestException) and "503" in str(rejected) and not is_transient(rejected)


def test_unavailable_stores_are_transient(gateway, no_retries):
    client = mlflow_client(gateway)
    assert is_transient(_error(client, "gateway503"))  # a gateway's HTML page: the status decides
    assert is_transient(_error(client, "busy"))  # MLflow's own TEMPORARILY_UNAVAILABLE code
    assert is_transient(_error(client, "gatewayjson"))  # a gateway's JSON body with its status as the code
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert is_transient(_error(mlflow_client(f"http://127.0.0.1:{port}"), "any"))
    assert not is_transient(ValueError("503"))
