"""slurm/multinode.slurm's GPU split on faked GPU nodes (GRPO_DRY_RUN: the split is printed, nothing starts). On one
node the trainer and the servers used to default to every GPU each, with servers placed on ids past the last GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slurm,
              pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs slurm's scontrol (system-deps.sh)")]


def dry_run(nodes: str, gpus: int | None, **env: str) -> subprocess.CompletedProcess:
    # scontrol reads a slurm.conf even to expand a host list: a minimal one, so these tests need no running
    # cluster (before, they passed only after tests/integration/test_slurm.py had written /etc/slurm/slurm.conf)
    conf = Path(tempfile.gettempdir()) / "grpo-dry-run-slurm.conf"
    conf.write_text("ClusterName=dryrun\nSlurmctldHost=localhost\n")
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GRPO_", "CUDA_VISIBLE"))}
    e.update({"SLURM_JOB_NODELIST": nodes, "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(ROOT), "GRPO_DRY_RUN": "1",
              "GRPO_PYTHON": sys.executable, "SLURM_CONF": str(conf), **env})
    if gpus is not None:
        e["SLURM_GPUS_ON_NODE"] = str(gpus)
    return subprocess.run(["bash", "slurm/multinode.slurm", "recipes/smollm2-135m-arith.yaml"], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=60)


def split(p: subprocess.CompletedProcess) -> dict[str, str]:
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if "dry run" in x)
    return dict(kv.split("=", 1) for kv in line.split("dry run: ")[1].split(" ") if "=" in kv)


def test_one_eight_gpu_node_is_split_in_half():
    s = split(dry_run("gpu1", 8, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"))
    assert s["nproc"] == "4" and s["train_gpus"] == "0,1,2,3"
    assert s["servers_per_node"] == "4" and s["server_gpus"] == "4"  # (the list continues: 4 5 6 7)
    p = dry_run("gpu1", 8, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    assert "server_gpus=4 5 6 7" in p.stdout


def test_gpu_ids_come_from_the_inherited_visible_devices():
    p = dry_run("gpu1", 4, CUDA_VISIBLE_DEVICES="2,3,5,7", GRPO_NPROC="3")
    assert "train_gpus=2,3,5" in p.stdout and "server_gpus=7" in p.stdout, p.stdout


@pytest.mark.parametrize("env", [{"GRPO_NPROC": "8"}, {"GRPO_NPROC": "6", "GRPO_SERVERS_PER_NODE": "3"}])
def test_a_split_that_does_not_fit_fails_before_anything_starts(env):
    p = dry_run("gpu1", 8, **env)
    assert p.returncode == 2 and "cannot hold" in p.stderr
    assert dry_run("gpu1", 1).returncode == 2  # one GPU cannot hold a trainer and a server


def test_several_nodes_and_cpu():
    p = dry_run("gpu[1-3]", 8)
    assert "train_nodes=gpu1 gpu2 nproc=8 train_gpus=0,1,2,3,4,5,6,7" in p.stdout
    assert "vllm_nodes=gpu3 servers_per_node=8 server_gpus=0 1 2 3 4 5 6 7" in p.stdout
    assert "nproc=1 train_gpus=cpu" in dry_run("cpu1", None).stdout
