"""Every bad input of the README's table: one clear sentence, the table's exit code, and no result. For rap's own
errors the sentence is the last line on stderr, also where a launcher prints a stack trace above it; for Hydra's
(an unknown group option or key) Hydra's first line names the problem."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

# (case, overrides, environment, message, exit code, where the message is: "last" or "first" line of stderr)
CASES = [
    ("ratio out of range", ["ratio=1.5"], {}, "ratio=1.5 is outside [0, 1)", 2, "last"),
    ("ratio not a number", ["ratio=abc"], {}, "ratio='abc' is not a number", 2, "last"),
    ("ratio leaving no pair", ["ratio=0.97"], {},
     "ratio=0.97 leaves no RoPE pair or V channel of head_dim=16", 2, "last"),
    ("ratio with method=none", ["method=none", "ratio=0.3"], {},
     "method=none keeps the model uncompressed, so ratio must be 0", 2, "last"),
    ("unknown method", ["method=foo"], {}, "In 'config': Could not find 'method/foo'", 1, "first"),
    ("unknown criterion", ["criterion=foo"], {}, "In 'config': Could not find 'criterion/foo'", 1, "first"),
    ("unknown model", ["model=no-such-model"], {}, "model=no-such-model is not a model preset", 2, "last"),
    ("unknown eval profile", ["eval=foo"], {}, "In 'config': Could not find 'eval/foo'", 1, "first"),
    ("unknown launcher", ["hydra/launcher=foo"], {},
     "In 'hydra/config': Could not find 'hydra/launcher/foo'", 1, "first"),
    ("config key typo", ["ratoi=0.2"], {}, "Could not override 'ratoi'.", 1, "first"),
    ("option key typo", ["method.critrion=x"], {}, "Could not override 'method.critrion'.", 1, "first"),
    ("non-RoPE model (local GPT-2 config)", ["model=llama3-8b", "model.path={gpt2}"], {},
     "Model type 'gpt2' does not use rotary position embeddings in the supported layout", 2, "last"),
    ("odd head_dim", ["model=llama3-8b", "model.path={odd}"], {},
     "RoPE requires an even rotary dimension, but got `head_dim`=15", 2, "last"),
    ("missing data folder", ["data.dir=/nonexistent/data"], {},
     "Data dir '/nonexistent/data' does not exist", 2, "last"),
    ("CUDA asked for but absent", ["device=cuda"], {},
     "device=cuda was asked for but CUDA is not available", 2, "last"),
    ("device map for a model built in memory", ["model.device_map=auto"], {},
     "source=tiny models are built on one device", 2, "last"),
    ("corrupt plan", ["ratio=0.25", "plan={plan}"], {}, "plan.json is not readable JSON", 2, "last"),
    ("plan of another method", ["ratio=0.25", "method=palu", "plan={good_plan}"], {},
     "is a rap plan at ratio 0.25, but the job asks for method=palu", 2, "last"),
    ("W&B online without a key", ["tracking=wandb"],
     {"WANDB_MODE": "online", "WANDB_API_KEY": "", "NETRC": "/nonexistent"},
     "W&B online mode needs an API key and none is set", 2, "last"),
    ("output folder not writable", ["out_dir={a_file}"], {}, "is not writable (Not a directory)", 2, "last"),
    ("bad calibration size", ["ratio=0.2", "method=palu", "calibration.whiten=[0,2048]"], {},
     "calibration.whiten=[0, 2048] is not [n_samples, seqlen]", 2, "last"),
    ("retired option value", ["ratio=0.2", "method=palu", "method.rank_allocation=fisher"], {},
     "use fisher_uniform", 2, "last"),
    ("quantizer without that bit width", ["cache=quantized", "cache.nbits=3"], {},
     "cache.nbits=3 is not available with cache.backend=hqq", 2, "last"),
    ("unknown cache option", ["cache=quantized", "+cache.group=4"], {}, "Unknown cache option(s) ['group']", 2, "last"),
    ("quantizer group not dividing the width",
     ["ratio=0.3", "cache=quantized", "cache.q_group_size=4", "eval.zeroshot.tasks=[]"], {},
     "does not divide the cached width", 2, "last"),
    ("bad input inside a launcher's job", ["-m", "hydra/launcher=submitit_local", "ratio=1.5"], {},
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


@pytest.mark.parametrize("case, overrides, env, message, code, where", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_sentence(tmp_path, inputs, case, overrides, env, message, code, where):
    import os

    if case.startswith("CUDA") and torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    overrides = [o.format(**inputs) for o in overrides]
    multirun = [o for o in overrides if o == "-m"]
    rest = [o for o in overrides if o != "-m"]
    base = ["model=tiny-llama", "tracking=none", "eval=smoke", f"out_dir={tmp_path}", "criterion=weight_norm"]
    keys = {o.split("=")[0].lstrip("+") for o in rest}
    cmd = [sys.executable, "run.py", *multirun, *[b for b in base if b.split("=")[0] not in keys], *rest]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code, r.stderr[-2000:]
    line = lines[-1] if where == "last" else lines[0]
    assert message in line, r.stderr[-2000:]
    assert not list(tmp_path.rglob("metrics.json"))
