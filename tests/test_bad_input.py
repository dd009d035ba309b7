"""Every bad input of the README's table ends in one clear sentence and leaves no result. Most cases are checked in
process: the job (``run_job``) raises rap's error, or Hydra's composition raises its own, with the sentence run.py
prints. A handful run ``run.py`` itself, for what only the command line has: the exit codes, the preset check before
Hydra parses, the output-folder callback and a launcher. For rap's own errors the sentence is the last line on stderr,
also where a launcher prints a stack trace above it; for Hydra's (an unknown group option or key) Hydra's first line
names the problem."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose

from rap.errors import RapError

BASE = ["model=tiny-llama", "tracking=none", "eval=smoke", "criterion=weight_norm"]

# (case, overrides, environment, message): rap's own errors, raised by the job in process (run.py: exit 2)
JOB_CASES = [
    ("ratio out of range", ["ratio=1.5"], {}, "ratio=1.5 is outside [0, 1)"),
    ("ratio not a number", ["ratio=abc"], {}, "ratio='abc' is not a number"),
    ("ratio leaving no pair", ["ratio=0.97"], {}, "ratio=0.97 leaves no RoPE pair or V channel of head_dim=16"),
    ("ratio with method=none", ["method=none", "ratio=0.3"], {},
     "method=none keeps the model uncompressed, so ratio must be 0"),
    ("non-RoPE model (local GPT-2 config)", ["model=llama3-8b", "model.path={gpt2}"], {},
     "Model type 'gpt2' does not use rotary position embeddings in the supported layout"),
    ("odd head_dim", ["model=llama3-8b", "model.path={odd}"], {},
     "RoPE requires an even rotary dimension, but got `head_dim`=15"),
    ("missing data folder", ["data.dir=/nonexistent/data"], {}, "Data dir '/nonexistent/data' does not exist"),
    ("CUDA asked for but absent", ["device=cuda"], {}, "device=cuda was asked for but CUDA is not available"),
    ("device map for a model built in memory", ["model.device_map=auto"], {},
     "source=tiny models are built on one device"),
    ("corrupt plan", ["ratio=0.25", "plan={plan}"], {}, "plan.json is not readable JSON"),
    ("plan of another method", ["ratio=0.25", "method=palu", "plan={good_plan}"], {},
     "is a rap plan at ratio 0.25, but the job asks for method=palu"),
    ("plan at ratio 0", ["plan={good_plan}"], {},
     "is a rap plan at ratio 0.25, but the job is the uncompressed baseline"),
    ("corrupt plan at ratio 0", ["plan={plan}"], {}, "plan.json is not readable JSON"),
    ("W&B online without a key", ["tracking=wandb"], {"WANDB_MODE": "online", "WANDB_API_KEY": "", "NETRC": "/x"},
     "W&B online mode needs an API key and none is set"),
    ("bad calibration size", ["ratio=0.2", "method=palu", "calibration.whiten=[0,2048]"], {},
     "calibration.whiten=[0, 2048] is not [n_samples, seqlen]"),
    ("retired option value", ["ratio=0.2", "method=palu", "method.rank_allocation=fisher"], {}, "use fisher_uniform"),
    ("quantizer without that bit width", ["cache=quantized", "cache.nbits=3"], {},
     "cache.nbits=3 is not available with cache.backend=hqq"),
    ("unknown cache option", ["cache=quantized", "+cache.group=4"], {}, "Unknown cache option(s) ['group']"),
    *[(f"a press {where}", ["press=streaming", *overrides], {}, message) for where, overrides, message in (
        ("with forward perplexity", ["eval.ppl.mode=forward"], "eval.ppl.mode=forward reads no cache"),
        ("on a sliding-window model", ["model=tiny-gemma3"], "has sliding-window layers"),
        ("with a quantized cache", ["cache=quantized"], "compacts full-precision cache tensors"),
        ("with RULER", ["eval=long", "eval.long.tasks=[niah_single_1]"], "press=streaming with eval.long"))],
    ("quantizer group not dividing the width",
     ["ratio=0.3", "cache=quantized", "cache.q_group_size=4", "eval.zeroshot.tasks=[]"], {},
     "does not divide the cached width"),
]
# Hydra's own errors, raised as the config is composed (run.py: exit 1, the first line of stderr)
COMPOSE_CASES = [
    ("unknown method", ["method=foo"], "Could not find 'method/foo'"),
    ("unknown criterion", ["criterion=foo"], "Could not find 'criterion/foo'"),
    ("unknown eval profile", ["eval=foo"], "Could not find 'eval/foo'"),
    ("config key typo", ["ratoi=0.2"], "Could not override 'ratoi'."),
    ("option key typo", ["method.critrion=x"], "Could not override 'method.critrion'."),
]
# What only the command line shows: (case, overrides, message, exit code, where the message is on stderr)
CLI_CASES = [
    ("rap's error exits 2", ["ratio=1.5"], "ratio=1.5 is outside [0, 1)", 2, "last"),
    ("Hydra's error exits 1", ["method=foo"], "In 'config': Could not find 'method/foo'", 1, "first"),
    ("unknown model", ["model=no-such-model"], "model=no-such-model is not a model preset", 2, "last"),
    ("unknown launcher", ["hydra/launcher=foo"], "In 'hydra/config': Could not find 'hydra/launcher/foo'", 1,
     "first"),
    ("output folder not writable", ["out_dir={a_file}"], "is not writable (Not a directory)", 2, "last"),
    ("bad input inside a launcher's job", ["-m", "hydra/launcher=submitit_local", "ratio=1.5"],
     "ratio=1.5 is outside [0, 1)", 1, "last"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Local model configs (GPT-2; Llama with head_dim 15), a valid and a truncated RAP plan, and a plain file."""
    from rap.models import build_tiny
    from rap.plans import compress, save_plan

    d = tmp_path_factory.mktemp("inputs")
    (d / "gpt2").mkdir()
    (d / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2,
                                                        "vocab_size": 50}))
    (d / "odd").mkdir()
    (d / "odd" / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 60, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 15,
        "num_hidden_layers": 1, "vocab_size": 50, "intermediate_size": 64}))
    model, _ = build_tiny("tiny-llama")
    compress(model, "rap", 0.25, criterion="weight_norm")
    (d / "good").mkdir()
    (d / "bad").mkdir()
    save_plan(model, d / "good" / "plan.json")
    text = (d / "good" / "plan.json").read_text()
    (d / "bad" / "plan.json").write_text(text[: len(text) // 3])
    (d / "a_file").write_text("")
    return {"gpt2": d / "gpt2", "odd": d / "odd", "plan": d / "bad" / "plan.json",
            "good_plan": d / "good" / "plan.json", "a_file": d / "a_file"}


def with_base(overrides: list[str]) -> list[str]:
    keys = {o.split("=")[0].lstrip("+") for o in overrides}
    return [*[b for b in BASE if b.split("=")[0] not in keys], *overrides]


def job_error(overrides: list[str], out_dir) -> str:
    """The sentence the job in ``out_dir`` ends with (what run.py prints after ``error:``)."""
    from rap.harness.job import run_job

    with pytest.raises(RapError) as err:
        run_job(compose(*with_base(overrides)), out_dir)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("case, overrides, env, message", JOB_CASES, ids=[c[0] for c in JOB_CASES])
def test_bad_input_ends_the_job_in_one_sentence(tmp_path, inputs, monkeypatch, case, overrides, env, message):
    if case.startswith("CUDA") and torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert message in job_error([o.format(**inputs) for o in overrides], tmp_path / "job")
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.parametrize("case, overrides, message", COMPOSE_CASES, ids=[c[0] for c in COMPOSE_CASES])
def test_hydra_names_an_unknown_option_or_key(case, overrides, message):
    with pytest.raises(Exception) as err:
        compose(*with_base(overrides))
    assert message in str(err.value).splitlines()[0]


def test_a_missing_data_dir_is_named_before_an_earlier_result_in_the_folder(tmp_path, inputs):
    """The folder already holds another config's result; the user's mistake is the data dir, and it is named."""
    from rap.harness.job import run_job

    out = tmp_path / "job"
    run_job(compose(*with_base(["eval.zeroshot.tasks=[]", "eval.ppl.max_windows=1"])), out)
    assert "Data dir '/nonexistent/data' does not exist" in job_error(["data.dir=/nonexistent/data"], out)


@pytest.mark.slow
@pytest.mark.parametrize("case, overrides, message, code, where", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_input_on_the_command_line_exits_with_its_code(tmp_path, inputs, case, overrides, message, code, where):
    overrides = [o.format(**inputs) for o in overrides]
    multirun = [o for o in overrides if o == "-m"]
    rest = with_base([f"out_dir={tmp_path}", *[o for o in overrides if o != "-m"]])
    r = subprocess.run([sys.executable, "run.py", *multirun, *rest], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code, r.stderr[-2000:]
    assert message in (lines[-1] if where == "last" else lines[0]), r.stderr[-2000:]
    assert not list(tmp_path.rglob("metrics.json"))
