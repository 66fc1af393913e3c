"""A public run whose files come from a real nginx (Debian's package, installed by .ci/run):
`crowdtrain serve --public-url` points two volunteer processes at nginx serving the run's
public folder; over three rounds the coordinator serves none of the artifact bytes (counted per
route on its side), nginx serves them all, and only control traffic is left to the
coordinator."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import httpx
import pytest
from swarm_helpers import copy_run, run_to_end

from crowdtrain.cli.processes import free_port
from crowdtrain.wire import protocol

pytestmark = pytest.mark.slow

# the routes that carry the run's files; everything else is control traffic
ARTIFACT_ROUTES = (protocol.BLOB, protocol.MODEL, protocol.UPDATE, protocol.SHARD,
                   protocol.BASE, protocol.TEACHER)


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    assert found, "nginx is not installed: `bash .ci/run` installs Debian's nginx-light"
    return found


@pytest.fixture
def nginx(tmp_path):
    """nginx serving a folder (filled in by the test) on a free port; yields (url, root, log)."""
    root, conf, port = tmp_path / "www", tmp_path / "nginx.conf", free_port()
    root.mkdir()
    user = "user root;\n" if os.geteuid() == 0 else ""  # root's tmp dirs are 0700
    temp = "".join(f"{k}_temp_path {tmp_path}/{k};\n" for k in
                   ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(f"""{user}daemon off; worker_processes 1; pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log {tmp_path}/access.log;
  {temp}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location / {{ try_files $uri =404; }}
  }}
}}
""")
    proc = subprocess.Popen([nginx_binary(), "-c", str(conf), "-p", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 20
    while True:
        try:
            httpx.get(url + "/nothing", timeout=1)
            break
        except httpx.TransportError:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < end, "nginx did not start"
            time.sleep(0.1)
    try:
        yield url, root, tmp_path / "access.log"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_volunteers_fetch_every_file_from_nginx_and_none_from_the_coordinator(
        tiny_run, nginx, tmp_path):
    url, root, access_log = nginx
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=5, rounds=3, round_seconds=60,
                   min_contributions=2)
    run.public_dir.mkdir()
    root.rmdir()
    root.symlink_to(run.public_dir)  # nginx serves the run's public folder
    _, st = run_to_end(run, tmp_path, serve_args=("--public-url", url))
    assert st.finished and [r.contributions for r in st.rounds[:3]] == [2, 2, 2]
    served = st.bytes_served
    assert not {r: served[r] for r in ARTIFACT_ROUTES if served.get(r)}, served
    # nginx served the shards, the model and the updates, each by its sha256
    got = [line for line in access_log.read_text().splitlines()
           if re.search(r'"GET /[0-9a-f]{64} HTTP/1\.1" 20[06] ', line)]
    names = {re.search(r"GET /([0-9a-f]{64})", line).group(1) for line in got}
    shards = {e.sha256 for e in run.index.train}
    from crowdtrain.run.checkpoint import load_checkpoint
    from crowdtrain.run.ledger import Ledger

    ledger = Ledger(run.ledger_path)
    updates = {r["update_sha256"] for r in ledger.rounds() if r["update_sha256"]}
    ledger.close()
    model0 = load_checkpoint(run.ckpt_dir, 0).meta["sha256"]
    assert names & shards and names & updates and model0 in names, (names, got)
    control = sum(served.values())
    per = control / 2 / 3
    print(f"control bytes the coordinator served: {control:,} in all, {per:,.0f} per volunteer "
          f"per round; artifact bytes from nginx: {len(got)} files")
    assert per < 64_000  # joins, leases, heartbeats, announcements: kilobytes, not the model
