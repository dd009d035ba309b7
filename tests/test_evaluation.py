import math

import torch

from rap.data import wikitext2_test_rows, wikitext2_test_text
from rap.harness.perplexity import perplexity
from rap.models import build_tiny


def test_perplexity_matches_hand_computation():
    model, _ = build_tiny("tiny-llama")
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (5 * 16 + 7,))
    out = perplexity(model, ids, seqlen=16)
    assert out["windows"] == 5 and out["tokens"] == 5 * 15  # the 7-token tail is dropped
    nll = []
    with torch.no_grad():
        for w in range(5):
            x = ids[w * 16:(w + 1) * 16]
            logp = torch.log_softmax(model(x[None]).logits[0], -1)
            nll += [-logp[t, x[t + 1]].item() for t in range(15)]
    assert math.isclose(out["ppl"], math.exp(sum(nll) / len(nll)), rel_tol=1e-5)
    for w in range(5):  # each window's mean CE, the unit of paired comparisons
        assert math.isclose(out["window_nll"][w], sum(nll[w * 15:(w + 1) * 15]) / 15, rel_tol=1e-5)
    assert perplexity(model, ids, seqlen=16, max_windows=2)["windows"] == 2


def test_wikitext_rows_follow_hf_layout(data_dir):
    rows = wikitext2_test_rows(data_dir)
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert "\n\n = Robert Boulter = \n" in wikitext2_test_text(data_dir)
