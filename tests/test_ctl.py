"""nydusctl unit tests: argument handling, exit codes, the daemon API client (small fake
HTTP-over-unix server; the real nydusd is exercised in integration tests)."""

from __future__ import annotations

import http.server
import json
import os
import socketserver
import threading

import pytest

from snapshotter import ctl


def test_help_and_usage_errors(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        ctl.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("pull", "run", "info", "metrics", "--address"):
        assert word in out
    for bad in ([], ["bogus"], ["pull"], ["metrics", "--api-sock", "x", "--kind", "nope"],
                ["-S", "x", "set", "log-level", "loud"], ["-S", "x", "mount", "-s", "b"]):
        with pytest.raises(SystemExit) as e:
            ctl.main(bad)
        assert e.value.code == 2, bad
    assert ctl.main(["info"]) == 2  # no socket: one line (-S/--sock or --api-sock)


def test_missing_containerd_socket_is_exit_1(tmp_path, capsys) -> None:
    rc = ctl.main(["--address", str(tmp_path / "none.sock"), "pull", "example.com/a:b"])
    assert rc == 1
    assert "does not exist" in capsys.readouterr().err


def test_bad_user_is_exit_1(tmp_path, capsys) -> None:
    sock = tmp_path / "c.sock"
    sock.touch()
    assert ctl.main(["--address", str(sock), "pull", "--user", "nocolon", "x"]) == 1
    assert "USER:PASSWORD" in capsys.readouterr().err


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes]] = {}
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append(self.path)
        status, body = self.routes.get(self.path, (404, b'{"code":"NotFound"}'))
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if body[:1] in (b"{", b"[")
                         else "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: object) -> None:
        pass


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # BaseHTTPRequestHandler wants a (host, port) client address
        conn, _ = self.socket.accept()
        return conn, ("local", 0)


@pytest.fixture
def fake_api(tmp_path):
    path = str(tmp_path / "api.sock")
    _Handler.routes = {
        "/api/v1/daemon": (200, json.dumps({"id": "d1", "state": "RUNNING", "version": {}}).encode()),
        "/api/v1/metrics": (200, json.dumps({"data_read": 4096, "fop_hits": [1, 2]}).encode()),
        "/api/v1/metrics/backend?id=/m1": (200, b'{"read_count": 3}'),
        "/api/v1/metrics/blobcache": (500, b'{"code":"Internal","message":"boom"}'),
        "/api/v1/metrics?id=/text": (200, b"# TYPE nydusd_data_read counter\nnydusd_data_read 7\n"),
    }
    _Handler.seen = []
    srv = _UnixServer(path, _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield path
    srv.shutdown()
    srv.server_close()


def test_info_and_metrics(fake_api, capsys) -> None:
    assert ctl.main(["info", "--api-sock", fake_api]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "RUNNING"
    assert ctl.main(["metrics", "--api-sock", fake_api]) == 0
    assert json.loads(capsys.readouterr().out)["data_read"] == 4096
    assert ctl.main(["metrics", "--api-sock", fake_api, "--kind", "backend", "--id", "/m1"]) == 0
    assert json.loads(capsys.readouterr().out) == {"read_count": 3}
    assert _Handler.seen == ["/api/v1/daemon", "/api/v1/metrics", "/api/v1/metrics/backend?id=/m1"]


def test_metrics_prometheus_text_printed_as_served(fake_api, capsys) -> None:
    _Handler.routes["/api/v1/metrics?id=/text"] = (200, b"nydusd_data_read 7\n")
    assert ctl.main(["metrics", "--api-sock", fake_api, "--id", "/text"]) == 0
    assert capsys.readouterr().out == "nydusd_data_read 7\n"


def test_daemon_api_errors(fake_api, tmp_path, capsys) -> None:
    assert ctl.main(["metrics", "--api-sock", fake_api, "--kind", "blobcache"]) == 1
    assert "HTTP 500" in capsys.readouterr().err
    assert ctl.main(["info", "--api-sock", str(tmp_path / "nope.sock")]) == 1
    with pytest.raises(ctl.CtlError):
        ctl.daemon_api_get(str(tmp_path / "nope.sock"), "/api/v1/daemon")
    # a socket nobody listens on
    import socket
    dead = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(dead)
    s.close()
    assert ctl.main(["info", "--api-sock", dead]) == 1
    assert "nydusctl:" in capsys.readouterr().err
    assert os.path.exists(dead)


# --- operator config snippets (misc/) ---------------------------------------------------------
import pathlib
import re

import toml

REPO = pathlib.Path(__file__).resolve().parent.parent
CRI = "io.containerd.grpc.v1.cri"


def _leaves(d: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out: dict[tuple, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def test_misc_containerd_config_matches_harness_config() -> None:
    from integration.harness.containerd import containerd_config
    snippet = toml.loads((REPO / "misc" / "containerd-config.toml").read_text())
    assert snippet["version"] == 2
    assert snippet["proxy_plugins"]["nydus"]["type"] == "snapshot"
    cri = snippet["plugins"][CRI]["containerd"]
    assert cri["snapshotter"] == "nydus" and cri["disable_snapshot_annotations"] is False
    generated = containerd_config(root="/r", state="/s", address="/s/c.sock", opt_dir="/o",
                                  cni_conf_dir="/c", snapshotters={"nydus": "/x/nydus.sock"},
                                  cri_snapshotter="nydus", mirrors=["127.0.0.1:1"])
    gen = _leaves(generated)
    for key, value in _leaves(snippet).items():
        if key[-1] == "discard_unpacked_layers":
            continue            # operator advice only; the harness keeps containerd's default
        assert key in gen, f"harness config lacks {'.'.join(key)}"
        if not (isinstance(value, str) and value.startswith("/")):
            assert gen[key] == value, key


def _render_go_template(text: str, values: dict[str, object]) -> str:
    """Render the subset of Go templates the k3s snippet uses ({{ .A.B }}, if/if not/end)."""
    def lookup(expr: str) -> object:
        return values[expr.strip()]

    def fmt(v: object) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    out, stack = [], [True]
    for token in re.split(r"(\{\{-?.*?-?\}\})", text):
        m = re.fullmatch(r"\{\{-?\s*(.*?)\s*-?\}\}", token)
        if not m:
            if all(stack):
                out.append(token)
            continue
        expr = m.group(1)
        if expr.startswith("if not "):
            stack.append(not lookup(expr[7:]))
        elif expr.startswith("if "):
            stack.append(bool(lookup(expr[3:])))
        elif expr == "end":
            stack.pop()
        elif all(stack):
            out.append(fmt(lookup(expr)))
    assert stack == [True], "unbalanced template"
    return "".join(out)


def test_misc_k3s_template_renders_to_valid_config() -> None:
    text = (REPO / "misc" / "k3s-config.toml.tmpl").read_text()
    values = {".NodeConfig.Containerd.Opt": "/var/lib/rancher/k3s/agent/containerd",
              ".NodeConfig.SELinux": False, ".NodeConfig.AgentConfig.PauseImage": "pause:3.6",
              ".SystemdCgroup": True, ".NodeConfig.NoFlannel": False,
              ".NodeConfig.AgentConfig.CNIBinDir": "/bin", ".NodeConfig.AgentConfig.CNIConfDir": "/etc/cni",
              ".NodeConfig.Containerd.Registry": "/etc/certs.d"}
    cfg = toml.loads(_render_go_template(text, values))
    assert cfg["version"] == 2
    cri = cfg["plugins"][CRI]
    assert cri["containerd"]["snapshotter"] == "nydus"
    assert cri["containerd"]["disable_snapshot_annotations"] is False
    assert cri["sandbox_image"] == "pause:3.6" and cri["cni"]["conf_dir"] == "/etc/cni"
    assert cfg["proxy_plugins"]["nydus"] == {
        "type": "snapshot", "address": "/run/containerd-nydus/containerd-nydus-grpc.sock"}
    values[".NodeConfig.NoFlannel"] = True
    assert "cni" not in toml.loads(_render_go_template(text, values))["plugins"][CRI]
