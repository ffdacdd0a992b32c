"""Every CLI: ``--version`` from package metadata; the errors operators meet most, each as one
line with its cause and fix, exit status 2 for usage/configuration errors (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rafs.cli_common import version
from snapshotter import remote
from snapshotter.errors import Unavailable
from storage.backend.registry import RegistryConfig

MODULES = {"nydus-snapshotter": "snapshotter", "nydusctl": "snapshotter.ctl", "nydus-image": "rafs.cli",
           "nydusd": "rafs.daemon.cli", "nydusify": "rafs.convert.cli"}


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text and "ExceptionGroup" not in text
    return lines[0]


@pytest.mark.parametrize("prog", sorted(MODULES))
def test_version_everywhere(prog):
    r = run("-m", MODULES[prog], "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{prog} {version()} (pynydus)"
    assert version() != ""


def test_parsers_read_the_version_only_for_the_flag(monkeypatch):
    """Building a CLI's parser (every start) does not read the package metadata; --version does."""
    import rafs.cli
    import rafs.cli_common
    import rafs.convert.cli
    import rafs.daemon.cli
    import snapshotter.cli
    import snapshotter.ctl

    asked = []
    monkeypatch.setattr(rafs.cli_common, "version", lambda: asked.append(1) or "9.9")
    parsers = [rafs.cli.build_parser(), rafs.daemon.cli.build_parser(), rafs.convert.cli._parser(),
               snapshotter.cli.build_parser(), snapshotter.ctl.build_parser()]
    assert asked == []
    with pytest.raises(SystemExit) as exit_info:
        parsers[1].parse_args(["--version"])
    assert exit_info.value.code == 0 and asked == [1]


def test_containerd_nydus_grpc_entry_point_and_flags():
    code = "import sys; from snapshotter.cli import grpc_main; sys.exit(grpc_main(sys.argv[1:]))"
    r = run("-c", code, "--version")
    assert r.stdout.strip() == f"containerd-nydus-grpc {version()} (pynydus)"
    help_text = run("-c", code, "--help").stdout
    for flag in ("--config", "--root", "--address", "--log-level", "--nydusd-config", "--nydusd",
                 "--fs-driver", "--daemon-mode", "--nydus-image", "--log-to-stdout", "--version"):
        assert flag in help_text, flag


def test_serve_listed_in_help():
    assert "{serve}" in run("-m", "snapshotter", "--help").stdout


def test_snapshotter_root_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run("-m", "snapshotter", "serve", "--root", str(tmp_path / "file" / "root"),
            "--address", str(tmp_path / "s.sock"))
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert f"root {tmp_path}/file/root is not a writable directory (Not a directory)" in line
    assert "pass --root with a writable directory" in line


def test_snapshotter_root_missing_is_created(tmp_path):
    r = run("-m", "snapshotter", "--root", "/proc/pynydus-no-such-root", "--address", str(tmp_path / "s.sock"))
    assert r.returncode == 2
    assert "root /proc/pynydus-no-such-root is not a writable directory" in one_line(r.stderr)


def test_snapshotter_bad_flag_value_one_line():
    r = run("-m", "snapshotter", "--daemon-mode", "bogus")
    assert r.returncode == 2
    assert "invalid choice: 'bogus'" in one_line(r.stderr)


def test_nydusd_missing_bootstrap(tmp_path):
    r = run("-m", "rafs.daemon.cli", "--bootstrap", str(tmp_path / "nope"), "--mountpoint", str(tmp_path / "mnt"))
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert f"--bootstrap {tmp_path}/nope: no such file" in line and "nydus-image create -B" in line


def test_nydusd_upgrade_without_supervisor_one_line(tmp_path):
    r = run("-m", "rafs.daemon.cli", "--upgrade", "--apisock", str(tmp_path / "a.sock"),
            "--mountpoint", str(tmp_path / "mnt"))
    assert r.returncode == 2
    assert "--upgrade needs --supervisor" in one_line(r.stderr)


def test_nydusd_log_rotation_size_warned(tmp_path):
    r = run("-m", "rafs.daemon.cli", "--log-rotation-size", "100",
            "--bootstrap", str(tmp_path / "nope"), "--mountpoint", str(tmp_path / "mnt"))
    assert r.returncode == 2  # the missing bootstrap stops it; the warning came first
    assert "warning: --log-rotation-size is accepted but not supported here" in r.stderr.splitlines()[0]


def test_nydusd_invalid_bootstrap_is_not_an_exception_group(tmp_path):
    (tmp_path / "junk").write_bytes(b"junk\n")
    (tmp_path / "mnt").mkdir()
    r = run("-m", "rafs.daemon.cli", "--bootstrap", str(tmp_path / "junk"), "--mountpoint", str(tmp_path / "mnt"))
    assert r.returncode == 2
    assert "not a RAFS bootstrap (no v5 magic" in one_line(r.stderr)
    assert not [ln for ln in open("/proc/mounts") if str(tmp_path) in ln]


def test_nydusify_bad_log_level():
    r = run("-m", "rafs.convert.cli", "--log-level", "foo", "convert")
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "--log-level: invalid choice: 'foo'" in line and "see nydusify --help" in line


def test_nydus_image_create_missing_blob_dir(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_text("a")
    r = run("-m", "rafs.cli", "create", "-D", str(tmp_path / "missing") + "/", "-B", str(tmp_path / "b.boot"),
            str(tmp_path / "src"))
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert f"--blob-dir: directory {tmp_path}/missing/ does not exist" in line and "mkdir -p" in line
    assert ".tmp" not in line
    assert sorted(os.listdir(tmp_path)) == ["src"]      # nothing half-written


def test_unreachable_registry_one_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    registry = RegistryConfig(host=f"127.0.0.1:{port}", repo="a/b", scheme="http", timeout=2, connect_timeout=2,
                              retry_limit=0, use_docker_config=False)
    with pytest.raises(Unavailable) as err:
        remote.check_reachable(f"127.0.0.1:{port}/a/b:c", registry)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"GET http://127.0.0.1:{port}/v2/: connection refused" in msg
    assert "insecure_registries" in msg                  # the fix
    for internal in ("urllib3", "HTTPConnectionPool", "Max retries", "object at 0x"):
        assert internal not in msg
