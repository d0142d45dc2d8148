"""`gs-ray status|logs|stop` against a Jobs API that does not know the job: a clear error, not a traceback.

A loopback HTTP server answers as a Ray head does (version check, then 404 for the job), so
this runs without a cluster; tests/test_remote.py submits real jobs to a real head.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gs_ray.cli import EXIT_USER_ERROR, main

RAY_VERSION = {"version": "4", "ray_version": "2.60.0", "ray_commit": "0" * 40, "session_name": "test"}


class _HeadWithNoJobs(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        if self.path == "/api/version":
            status, body = 200, json.dumps(RAY_VERSION)
        else:  # what the job head answers for an id it does not know
            status, body = 404, f"Job {self.path.split('/')[3]} does not exist"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:  # keep the test log to what it asserts
        pass


@pytest.fixture(scope="module")
def jobs_api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HeadWithNoJobs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.mark.parametrize("command", [["status"], ["logs"], ["logs", "--follow"], ["stop"]])
def test_unknown_job_id_is_a_clear_error(jobs_api, command, capsys):
    assert main([command[0], "raysubmit_nosuchjob", *command[1:], "--address", jobs_api]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "job 'raysubmit_nosuchjob' is not known to the cluster at" in err and jobs_api in err
    assert "Traceback" not in err
