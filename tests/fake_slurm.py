"""A SLURM of one machine for the tests: sbatch, srun, sacct, scontrol and scancel as small
programs on PATH, so submitit's real SLURM code submits, watches and requeues real jobs.

`install(bin_dir, state_dir)` writes the five commands; they keep their state in
state_dir (FAKE_SLURM_DIR):

    next_id                 the next job id
    scripts/<id>.sh         each submitted script, copied when submitted (submitit renames its own)
    jobs/<key>.json         per job (or array task "<id>_<i>"): state, restarts, pids
    runner-<id>.log         the runner's output

sbatch starts a detached runner that runs the script's tasks (an array's, at most its %N at
once) with SLURM's environment; with FAKE_SLURM_HOLD=1 in sbatch's environment the jobs
stay PENDING until `fake_slurm.py release ID`, and a partition named "missing" is refused.
`scontrol requeue KEY` marks a task REQUEUED, and the runner runs it again when its script
ends, as SLURM requeues a job. srun starts nodes x ntasks-per-node processes with
SLURM_PROCID, SLURM_LOCALID and SLURM_NODEID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

COMMANDS = ("sbatch", "srun", "sacct", "scontrol", "scancel")


def install(bin_dir: Path, state_dir: Path) -> dict[str, str]:
    """Write the commands into bin_dir; returns the environment that puts them first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        cmd = bin_dir / name
        me = Path(__file__).resolve()
        cmd.write_text(f"#!/bin/sh\nexec {sys.executable} {me} {name} \"$@\"\n")
        cmd.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state_dir)}


def _state() -> Path:
    return Path(os.environ["FAKE_SLURM_DIR"])


def _job_file(key: str) -> Path:
    return _state() / "jobs" / f"{key}.json"


def read_job(key: str) -> dict:
    return json.loads(_job_file(key).read_text())


def _update(key: str, **changes: object) -> None:
    path = _job_file(key)
    path.parent.mkdir(exist_ok=True)
    job = json.loads(path.read_text()) if path.exists() else {}
    job.update(changes)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(job))
    tmp.replace(path)


def _directives(script: str) -> dict[str, str]:
    out = {}
    for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M):
        out[m.group(1)] = (m.group(2) or "true").strip("'")
    return out


def sbatch(args: list[str]) -> int:
    script = Path(args[-1]).read_text()
    refused = re.search(r"^#SBATCH --partition=(?:'?)missing", script, re.M)
    if refused:  # as SLURM answers a partition it does not have
        print("sbatch: error: Batch job submission failed: Invalid partition name specified",
              file=sys.stderr)
        return 1
    counter = _state() / "next_id"
    job_id = int(counter.read_text()) if counter.exists() else 1000
    counter.write_text(str(job_id + 1))
    (_state() / "scripts").mkdir(exist_ok=True)
    (_state() / "scripts" / f"{job_id}.sh").write_text(script)
    opts = _directives(script)
    keys = [str(job_id)]
    if "array" in opts:
        last = int(opts["array"].split("-")[1].split("%")[0])
        keys = [f"{job_id}_{i}" for i in range(last + 1)]
    for key in keys:
        _update(key, state="PENDING", restarts=0, pids=[])
    if not os.environ.get("FAKE_SLURM_HOLD"):
        release([str(job_id)])
    print(f"Submitted batch job {job_id}")
    return 0


def release(args: list[str]) -> int:
    log = (_state() / f"runner-{args[0]}.log").open("a")
    subprocess.Popen([sys.executable, __file__, "run", args[0]], stdout=log, stderr=log,
                     stdin=subprocess.DEVNULL, start_new_session=True,
                     env={**os.environ, "FAKE_SLURM_HOLD": ""})
    return 0


def run(args: list[str]) -> int:
    """The runner: every task of job args[0], with at most the array's %N at once."""
    job_id = args[0]
    script = _state() / "scripts" / f"{job_id}.sh"
    opts = _directives(script.read_text())
    nodes = int(opts.get("nodes", 1))
    per_node = int(opts.get("ntasks-per-node", 1))
    keys = sorted((p.stem for p in (_state() / "jobs").glob(f"{job_id}*.json")
                   if p.stem == job_id or p.stem.startswith(f"{job_id}_")),
                  key=lambda k: int(k.split("_")[-1]))
    limit = threading.Semaphore(int(opts["array"].split("%")[1]) if "array" in opts else 1)

    def task(key: str) -> None:
        with limit:
            env = {**os.environ, "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
                   "SLURM_NTASKS": str(nodes * per_node), "SLURM_NTASKS_PER_NODE": str(per_node),
                   "SLURM_JOB_NODELIST": ",".join(["localhost"] * nodes), "FAKE_SLURM_KEY": key}
            if "_" in key:
                env.update(SLURM_ARRAY_JOB_ID=job_id, SLURM_ARRAY_TASK_ID=key.split("_")[1],
                           SLURM_JOB_ID=str(int(job_id) * 1000 + int(key.split("_")[1])))
            else:
                env["SLURM_JOB_ID"] = job_id
            while read_job(key)["state"] != "CANCELLED":
                restarts = read_job(key)["restarts"]
                _update(key, state="RUNNING")
                env["SLURM_RESTART_COUNT"] = str(restarts)
                rc = subprocess.run(["bash", str(script)], env=env).returncode
                if read_job(key)["state"] == "REQUEUED":
                    _update(key, restarts=restarts + 1)
                    continue
                if read_job(key)["state"] == "RUNNING":
                    _update(key, state="COMPLETED" if rc == 0 else "FAILED")
                return

    threads = [threading.Thread(target=task, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


def srun(args: list[str]) -> int:
    """srun [--unbuffered] [--output F] [--error F] COMMAND...: the job's tasks."""
    outputs: dict[str, str] = {}
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            outputs[flag] = args.pop(0)
    ntasks = int(os.environ.get("SLURM_NTASKS", 1))
    per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", 1))
    key = os.environ["FAKE_SLURM_KEY"]
    names = {"%j": os.environ["SLURM_JOB_ID"], "%A": os.environ.get("SLURM_ARRAY_JOB_ID", ""),
             "%a": os.environ.get("SLURM_ARRAY_TASK_ID", "")}
    procs = []
    for rank in range(ntasks):
        files = {}
        for flag, pattern in outputs.items():
            for k, v in {**names, "%t": str(rank)}.items():
                pattern = pattern.replace(k, v)
            files[flag] = open(pattern, "a")  # noqa: SIM115 (closed with the process)
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node),
               "SLURM_NODEID": str(rank // per_node)}
        procs.append(subprocess.Popen(args, env=env, stdout=files.get("--output"),
                                      stderr=files.get("--error")))
    _update(key, pids=[p.pid for p in procs])
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def sacct(args: list[str]) -> int:
    wanted = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for path in sorted((_state() / "jobs").glob("*.json")):
        if path.stem.split("_")[0] in wanted:
            print(f"{path.stem}|{read_job(path.stem)['state']}|localhost")
    return 0


def scontrol(args: list[str]) -> int:
    if args[0] == "requeue":
        _update(args[1], state="REQUEUED")
        return 0
    raise SystemExit(f"fake scontrol: {args} not known")


def scancel(args: list[str]) -> int:
    """scancel KEY [--signal SIG]: signal the task's processes, or cancel it."""
    key, sig = args[0], None
    if "--signal" in args:
        name = args[args.index("--signal") + 1]
        sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}")
    else:
        _update(key, state="CANCELLED")
    for pid in read_job(key)["pids"]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig or signal.SIGTERM)
    time.sleep(0.1)
    return 0


if __name__ == "__main__":
    command = Path(sys.argv[1]).name
    sys.exit({"sbatch": sbatch, "srun": srun, "sacct": sacct, "scontrol": scontrol,
              "scancel": scancel, "run": run, "release": release}[command](sys.argv[2:]))
