"""Every user mistake ends the real `dinocell` command with one line on stderr that names the thing, exit status 2,
and no traceback (`--debug` shows it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dinocell.storage.local_server import create_bucket


def _run(args: list[str], env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinocell.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def _error_lines(stderr: str, command: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith(f"dinocell {command}: ")]


# (case id, argv with {tmp} / {bucket} placeholders, extra env, what the line must name)
CASES = [
    ("unknown config field", ["config", "--set", "data.bacthes=1"], {}, ["data.bacthes", "did you mean 'batches'"]),
    ("config file missing", ["config", "--config", "{tmp}/nope.yaml"], {}, ["nope.yaml"]),
    ("discover without output", ["discover", "--config", "tiny"], {}, ["--out", "data.manifest"]),
    ("shard, manifest missing", ["shard", "--config", "tiny", "--manifest", "{tmp}/nope.parquet", "--out", "{tmp}/s"],
     {}, ["{tmp}/nope.parquet"]),
    ("evaluate, checkpoint missing", ["evaluate", "--config", "tiny", "--checkpoint", "{tmp}/nope.pt", "--manifest",
                                      "{tmp}/nope.parquet", "--out", "{tmp}/ev"], {}, ["{tmp}/nope.pt"]),
    ("publish, checkpoint missing", ["publish", "--checkpoint", "{tmp}/nope.pt", "--dest", "{tmp}/m", "--name", "a",
                                     "--version", "1"], {}, ["{tmp}/nope.pt"]),
    ("train, local backend on 2 nodes", ["train", "--config", "tiny", "--output-dir", "{tmp}/run", "--backend", "local",
                                        "--nodes", "2"], {}, ["nodes=2", "pytorchjob"]),
    ("S3 no such key", ["shard", "--config", "tiny", "--manifest", "s3://{bucket}/missing.parquet", "--out",
                        "s3://{bucket}/shards"], {"AWS_ENDPOINT_URL": "{endpoint}"},
     ["s3://{bucket}/missing.parquet", "no such object"]),
    ("S3 no credentials", ["shard", "--config", "tiny", "--manifest", "s3://{bucket}/m.parquet", "--out", "s3://{bucket}/s"],
     {"AWS_ENDPOINT_URL": "{endpoint}", "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
      "AWS_SHARED_CREDENTIALS_FILE": "{tmp}/none", "AWS_CONFIG_FILE": "{tmp}/none"}, ["s3://{bucket}/m.parquet", "credentials"]),
    ("S3 endpoint unreachable", ["shard", "--config", "tiny", "--manifest", "s3://{bucket}/m.parquet", "--out",
                                 "s3://{bucket}/s"], {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
     ["http://127.0.0.1:9", "cannot reach"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_user_mistakes_get_one_line_and_exit_2(case, tmp_path, s3_server):
    name, argv, env, must_name = case
    bucket = f"cli-errors-{os.getpid()}"
    try:
        create_bucket(s3_server.endpoint_url, bucket)
    except Exception:  # created by an earlier case of this session
        pass
    fill = {"tmp": str(tmp_path), "bucket": bucket, "endpoint": s3_server.endpoint_url}
    argv = [a.format(**fill) for a in argv]
    env = {k: v.format(**fill) for k, v in env.items()}
    t0 = time.perf_counter()
    result = _run(argv, env, cwd=tmp_path)
    elapsed = time.perf_counter() - t0
    command = argv[0]
    assert result.returncode == 2, (name, result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = _error_lines(result.stderr, command)
    assert len(lines) == 1, result.stderr
    for thing in must_name:
        assert thing.format(**fill) in lines[0], (thing, lines[0])
    assert elapsed < 60, f"{name}: took {elapsed:.0f} s to fail"


def test_debug_shows_the_traceback(tmp_path):
    result = _run(["--debug", "shard", "--config", "tiny", "--manifest", str(tmp_path / "nope.parquet"), "--out",
                   str(tmp_path / "s")])
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_version():
    from dinocell import __version__

    result = _run(["--version"])
    assert result.returncode == 0 and result.stdout.strip() == f"dinocell {__version__}"
