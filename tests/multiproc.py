"""Runs a test file's rank functions in `world` subprocesses joined by torch.distributed (gloo).

Each rank is `python <script> <group> <workdir>` with torchrun's environment; the script's
__main__ block runs the group and saves its outcomes to workdir/result-<rank>.pt. A group that
outlives `limit_s` is killed and fails the test with every rank's log.
"""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, group, world, workdir, data, *, timeout, limit_s):
    """Runs `group` on `world` ranks; returns each rank's saved result."""
    workdir.mkdir(parents=True, exist_ok=True)
    torch.save(data, workdir / "data.pt")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", "TEST_TIMEOUT": str(timeout)}
    procs = []
    for r in range(world):
        log = open(workdir / f"log-{r}.txt", "w")
        procs.append(subprocess.Popen(
            [sys.executable, script, group, str(workdir)], stdout=log, stderr=subprocess.STDOUT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
        log.close()
    deadline = time.monotonic() + limit_s
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"group {group} on {world} ranks hung past {limit_s} s: " + logs(workdir))
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} of group {group} failed: " + logs(workdir)
    return [torch.load(workdir / f"result-{r}.pt", weights_only=False) for r in range(world)]


def logs(workdir):
    return "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}"
                   for p in sorted(workdir.glob("log-*.txt")))
