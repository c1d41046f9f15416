"""Helpers for tests against the real-peer harness: run maddylite inside the namespace."""

import os
import sys
import textwrap
from dataclasses import dataclass

import pytest

PY = sys.executable
POLICIES = "mtasts\n    dnssec\n    dane\n    local_policy"


@dataclass
class Result:
    """Result is one recipient line of `maddylite deliver`."""

    rcpt: str
    status: str
    code: int
    enhanced: str
    mx: str
    tls_level: str
    mx_level: str
    text: str


@pytest.fixture
def workdir(harness, tmp_path):
    """workdir is a per-test directory readable inside the namespace."""
    os.chmod(tmp_path, 0o755)
    return tmp_path


@pytest.fixture
def deliver(harness, workdir):
    """deliver runs `maddylite deliver` in the namespace and parses its per-recipient lines."""

    def run(rcpts, *, remote="", policies=POLICIES, sender="sender@sender.test", message=None, global_extra="", env=None,
            resolv_conf=None):
        conf = workdir / "deliver.conf"
        defaults = {"connect_timeout": "3s", "command_timeout": "10s", "submission_timeout": "10s"}
        for line in remote.splitlines():
            defaults.pop(line.split()[0] if line.split() else "", None)
        remote = "\n                ".join([*(f"{k} {v}" for k, v in defaults.items()), remote])
        conf.write_text(textwrap.dedent(f"""\
            state_dir {workdir}/state
            hostname mx.sender.test
            {global_extra}
            tls_client {{
                root_ca {harness.ca_pem_path}
            }}
            mx_auth policies {{
                {policies}
            }}
            target.remote r {{
                mx_auth &policies
                {remote}
            }}
            """))
        msg = message or b"From: sender@sender.test\r\nSubject: integration\r\n\r\nhello\r\n"
        p = harness.ns_run([PY, "-m", "maddylite", "deliver", "--config", str(conf), "--from", sender, "--to", *rcpts],
                           input=msg.decode("utf-8"), timeout=120, env=env, resolv_conf=resolv_conf)
        results = {}
        for line in p.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) < 7:
                continue
            results[parts[0]] = Result(parts[0], parts[1], int(parts[2]), parts[3], parts[4].removeprefix("mx="),
                                       parts[5].removeprefix("tls_level="), parts[6].removeprefix("mx_level="),
                                       parts[7] if len(parts) > 7 else "")
        assert set(results) == set(rcpts), f"rc={p.returncode}\nstdout={p.stdout}\nstderr={p.stderr[-3000:]}"
        return p.returncode, results, p.stderr

    return run
