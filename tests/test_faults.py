"""Killed and concurrent sweeps: real SIGKILLs at each phase of a job (``rap.faults``), then the same command again;
two sweeps over one folder at once; a lock left by a killed process."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, compose

from rap.harness.job import run_job

pytestmark = pytest.mark.slow  # each case runs sweeps that are killed and rerun

PHASES = ["load", "compress", "latency", "ppl", "zeroshot", "write:metrics.json", "finish"]
RATIOS = ["0.125", "0.25", "0.375", "0.5", "0.625", "0.75", "0"]  # one job per phase; the last is the baseline
COMMON = ["model=tiny-llama", "eval=smoke", "eval.zeroshot.limit=2", "tracking=wandb", "criterion=weight_norm"]


def sweep(tmp_path, kill_at=None, ratios=RATIOS, launcher=(), name="s"):
    cmd = [sys.executable, "run.py", "-m", *launcher, *COMMON, f"out_dir={tmp_path}", f"sweep={name}",
           f"ratio={','.join(ratios)}"]
    env = {k: v for k, v in os.environ.items() if k != "RAP_KILL_AT"}
    if kill_at:
        env["RAP_KILL_AT"] = kill_at
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def snapshot(root):
    """Every finished result: file -> (bytes, mtime_ns)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for folder in root.glob("*/")
            if (folder / "metrics.json").exists()
            for p in [folder / "metrics.json", folder / "per_sample.json", folder / "plan.json"] if p.exists()}


def test_killed_sweeps_lose_nothing_and_redo_the_killed_job(tmp_path, capsys):
    from analysis.collect import collect_local
    from rap.harness.tracking import read_offline_run

    names = [compose(*COMMON, f"ratio={r}").run_name for r in RATIOS]
    root, redone, kept = tmp_path / "s", 0, 0
    for i, phase in enumerate([*PHASES, None]):
        before = snapshot(root)
        proc = sweep(tmp_path, f"{phase}@{names[i]}" if phase else None)
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == (-signal.SIGKILL if phase else 0), out[-3000:]
        after = snapshot(root)
        temps = list(root.glob("*/.*.tmp"))  # only the write kill leaves one, in the killed job; the rerun removes it
        assert all(phase and phase.startswith("write:") and t.parent.name == names[i] for t in temps), temps
        # Every result finished before the kill is byte-identical and was not recomputed.
        assert {p: after.get(p) for p in before} == before
        kept += sum(p.name == "metrics.json" for p in before)
        if i > 0 and PHASES[i - 1] != "finish":  # the job killed last time is redone completely
            assert f"computing {names[i - 1]}" in out and (root / names[i - 1] / "metrics.json") in after
            redone += 1
        # No metrics.json without status complete; no temp file read as a result.
        finished, problems = collect_local(root)
        for p in root.glob("*/metrics.json"):
            assert json.loads(p.read_text())["status"] == "complete"
        assert sorted(finished["run_name"] if len(finished) else []) == sorted(p.parent.name
                                                                               for p in root.glob("*/metrics.json"))
        if phase is None:
            assert problems.empty and len(finished) == len(RATIOS)
            break
        killed = root / names[i]
        runs = list((killed / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and read_offline_run(runs[0])["exit_code"] is None  # W&B: crashed, never finished
        if phase == "finish":  # killed after its result was committed: complete, and kept
            assert (killed / "metrics.json").exists()
            continue
        assert not (killed / "metrics.json").exists()
        assert list(problems["path"]) == [str(killed)] and list(problems["status"]) == ["killed"]
        if phase.startswith("write:"):
            assert list(killed.glob(".metrics.json.*.tmp")), "the kill should leave the temp copy behind"
    with capsys.disabled():
        print(f"\n[kill test] {len(PHASES)} kills injected; {kept} finished results (metrics, per-sample and plan "
              f"files) byte-identical and not recomputed across the later runs; {redone} killed jobs redone "
              "completely; 1 killed after its commit kept")


def test_two_sweeps_over_one_folder_compute_each_cell_once(tmp_path):
    ratios = ["0", "0.25", "0.5"]
    a = sweep(tmp_path, ratios=ratios, name="c")
    b = sweep(tmp_path, ratios=ratios[::-1], name="c", launcher=["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    outs = [p.communicate(timeout=600)[0] for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs[0][-2000:] + outs[1][-2000:]
    names = [compose(*COMMON, f"ratio={r}").run_name for r in ratios]
    for name in names:
        assert sum(out.count(f"[rap] computing {name} ") for out in outs) == 1, name
        assert json.loads((tmp_path / "c" / name / "metrics.json").read_text())["status"] == "complete"


HOLD_LOCK = textwrap.dedent("""
    import os, signal, sys, time
    from rap.harness.results import job_lock
    with job_lock(sys.argv[1], "holder"):
        print("held", flush=True)
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(float(sys.argv[2]))
""")


@pytest.mark.parametrize("holder", ["kill", "2"])
def test_a_held_lock_is_waited_for_and_a_dead_one_taken_over(tmp_path, data_dir, capsys, holder):
    out = tmp_path / "job"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), holder], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    if holder == "kill":
        proc.wait(timeout=60)
    cfg = compose("model=tiny-llama", "eval=smoke", "eval.zeroshot.tasks=[]", "tracking=none", f"out_dir={tmp_path}")
    assert run_job(cfg, out)["status"] == "complete"
    proc.wait(timeout=60)
    said = capsys.readouterr().out
    expected = "which was killed before it finished" if holder == "kill" else "waiting for pid"
    assert expected in said and f"pid {proc.pid} on" in said
    assert not (out / ".rap.owner").exists()


def test_a_full_disk_leaves_no_result_that_looks_complete(tmp_path, data_dir, monkeypatch):
    import errno

    from rap import files
    from rap.errors import OutputError

    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("metrics.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    cfg = compose("model=tiny-llama", "eval=smoke", "eval.zeroshot.tasks=[]", "tracking=none", f"out_dir={tmp_path}")
    with pytest.raises(OutputError,
                       match=r"Could not write .*metrics.json \(No space left on device\); free disk space"):
        run_job(cfg, tmp_path / "job")
    assert not (tmp_path / "job" / "metrics.json").exists() and not list((tmp_path / "job").glob(".*.tmp"))
    assert json.loads((tmp_path / "job" / "failure.json").read_text())["error"] == "OutputError"
    with pytest.raises(OutputError, match=r"Output folder .* is not writable \(Not a directory\)"):
        run_job(cfg, tmp_path / "job" / "failure.json" / "sub")
