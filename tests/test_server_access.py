"""Who may reach ldm serve: loopback by default, HTTP Basic auth on every route, the CLI's refusals."""

from __future__ import annotations

import pytest
from serving import LiveServer

from ldm.cli import main
from ldm.errors import InputError
from ldm.server.config import ServerConfig, is_loopback, parse_auth


@pytest.fixture(scope="module")
def guarded():
    server = LiveServer(ServerConfig(api_auth=(("ann", "s3cret:x"), ("bob", "pw")), device="cpu"))
    yield server
    server.stop()


@pytest.mark.parametrize("path", ["/sdapi/v1/samplers", "/sdapi/v1/progress", "/ldm/v1/jobs", "/docs", "/openapi.json", "/nowhere",
                                  "/", "/static/page.js", "/static/page.css"])
def test_every_route_needs_auth(guarded, path):
    with guarded.client() as http:
        answer = http.get(path)
    assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Basic")


@pytest.mark.parametrize("auth", [("ann", "wrong"), ("eve", "s3cret:x"), ("ann", "s3cret"), ("bob", "pwx"), ("", "")])
def test_wrong_credentials_are_401(guarded, auth):
    with guarded.client(auth=auth) as http:
        assert http.get("/sdapi/v1/samplers").status_code == 401


def test_right_credentials_pass(guarded):
    for auth in (("ann", "s3cret:x"), ("bob", "pw")):
        with guarded.client(auth=auth) as http:
            assert http.get("/sdapi/v1/samplers").status_code == 200
    with guarded.client(auth=("bob", "pw")) as http:
        answer = http.post("/sdapi/v1/txt2img", json={"prompt": "a star", "width": 64, "height": 64, "steps": 2})
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1


def test_the_web_page_passes_with_credentials(guarded):
    with guarded.client(auth=("bob", "pw")) as http:
        assert http.get("/").status_code == 200 and http.get("/static/page.js").status_code == 200


def test_a_post_without_auth_is_refused_before_it_runs(guarded):
    with guarded.client() as http:
        assert http.post("/sdapi/v1/txt2img", json={"steps": 2}).status_code == 401
    assert guarded.server_state.queue.jobs() == []


def test_the_cli_refuses_a_public_host_without_auth(capsys):
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    error = capsys.readouterr().err
    assert "--api-auth" in error and "--insecure-no-auth" in error and "Traceback" not in error


@pytest.mark.parametrize(
    "argv",
    [["--api-auth", "nopassword"], ["--queue-size", "0"], ["--models-dir", "/no/such/folder"], ["--outputs", "/dev/null"],
     ["--max-steps", "0"], ["--port", "70000"], ["--model", "/no/such/model.safetensors"]],
)
def test_the_cli_refuses_bad_flags_in_one_line(capsys, argv):
    assert main(["serve", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ldm serve: error: ") and error.count("\n") == 1


def test_public_hosts_need_auth_or_the_insecure_flag():
    with pytest.raises(InputError, match="--api-auth"):
        ServerConfig(host="0.0.0.0")
    with pytest.raises(InputError):
        ServerConfig(host="my-laptop.local")
    ServerConfig(host="0.0.0.0", api_auth=(("a", "b"),))
    ServerConfig(host="0.0.0.0", insecure_no_auth=True)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("10.0.0.1")


def test_auth_pairs_are_parsed():
    assert parse_auth("ann:s3cret:x,bob:pw") == (("ann", "s3cret:x"), ("bob", "pw"))
    for bad in ("ann", "ann:", ":pw", "ann:pw,"):
        with pytest.raises(InputError):
            parse_auth(bad)
