"""Optional bearer-token auth and TLS: both on together here (each is off by default, as the other tests show)."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genrec.server.app import create_server
from genrec.server.client import Stubs, open_channel
from genrec.server.config import LimitsConfig
from genrec.v1 import info_pb2

from serverutil import config_for

pytest_plugins = ["serverfixtures"]

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", d / "key.pem",
                    "-out", d / "cert.pem"], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def secure(served_bundle, cert):
    server, port = create_server(config_for(served_bundle, auth_token=TOKEN, tls_cert=cert[0], tls_key=cert[1]))
    server.start()
    server.warm_up()
    yield server, port
    server.stop(grace=0)


def _info(port, ca, token=None):
    with open_channel(f"localhost:{port}", token=token, tls_ca=ca) as channel:
        return Stubs.of(channel).info.GetInfo(info_pb2.GetInfoRequest(), timeout=10)


def test_the_right_token_over_tls_is_served(secure, cert):
    server, port = secure
    assert _info(port, cert[0], TOKEN).catalog_size > 0


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"])
def test_a_missing_or_wrong_token_is_unauthenticated(secure, cert, token):
    server, port = secure
    with pytest.raises(grpc.RpcError) as e:
        _info(port, cert[0], token)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in e.value.details()
    assert server.metrics.value("genrec_requests_total",
                                {"method": "InfoService/GetInfo", "code": "UNAUTHENTICATED"}) >= 1


def test_health_needs_no_token(secure, cert):
    _, port = secure
    with open_channel(f"localhost:{port}", tls_ca=cert[0]) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_clients_cannot_talk_to_a_tls_port(secure):
    _, port = secure
    with pytest.raises(grpc.RpcError) as e:
        _info(port, None, TOKEN)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_config_is_checked_once_at_the_edge(served_bundle, cert):
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        config_for(served_bundle, tls_cert=cert[0])
    with pytest.raises(ValueError, match="does not exist"):
        config_for(served_bundle, tls_cert=cert[0], tls_key=cert[1].with_name("nope.pem"))
    with pytest.raises(ValueError, match="auth_token is empty"):
        config_for(served_bundle, auth_token=" ")
    # A file that is not a PEM key is named as such (gRPC alone reports it as a port it cannot bind).
    with pytest.raises(ValueError, match="do not load .* PEM certificate chain"):
        config_for(served_bundle, tls_cert=cert[0], tls_key=cert[0])
    with pytest.raises(ValueError, match="'tpu:0' is not a torch device"):
        config_for(served_bundle, device="tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            config_for(served_bundle, device="cuda")
    with pytest.raises(ValueError, match="max_beam_width .* must be at least max_k"):
        LimitsConfig(max_k=200, max_beam_width=100)
