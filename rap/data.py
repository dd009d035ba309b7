"""Text data: where the data dir is, WikiText-2 test for perplexity, and calibration text.

Files keep their original formats (see ``../shared/data/README.md``). Without a data dir, the hub copies
are used, which needs a network connection.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

from .errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "RAP_DATA_DIR"
WIKITEXT_TEST = "wikitext-2-raw/wiki.test.raw"
CALIBRATION_FILES = {"wiki": "calibration/wiki.utf8", "c4": "calibration/c4.utf8"}


def resolve_data_dir(configured: str | None = None) -> Path | None:
    """The data dir: the configured value, else ``$RAP_DATA_DIR``, else ``<repo>/../shared/data`` if it exists.

    Returns ``None`` when nothing is configured and the default is absent (callers then use the hub).
    A configured or env dir that does not exist is an error, not a silent fallback.
    """
    chosen = configured or os.environ.get(DATA_DIR_ENV)
    if chosen:
        path = Path(chosen).expanduser().resolve()
        if not path.is_dir():
            raise DataError(f"Data dir '{path}' does not exist; set data.dir=... or ${DATA_DIR_ENV} to the folder "
                            "with the data files.")
        return path
    default = (REPO_ROOT.parent / "shared" / "data").resolve()
    return default if default.is_dir() else None


def data_file(data_dir: Path, rel: str) -> Path:
    path = Path(data_dir) / rel
    if not path.is_file():
        raise DataError(f"Data file '{path}' is missing; set data.dir=... or ${DATA_DIR_ENV} to a folder that has "
                        f"'{rel}'.")
    return path


def wikitext2_test_rows(data_dir: Path | None) -> list[str]:
    """WikiText-2 raw test rows exactly as the HF dataset has them (blank lines as ``""``)."""
    if data_dir is None:
        from datasets import load_dataset

        return list(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
    lines = read_text(data_file(data_dir, WIKITEXT_TEST)).splitlines(keepends=True)
    return ["" if line == " \n" else line for line in lines]


def wikitext2_test_text(data_dir: Path | None) -> str:
    """The common (GPTQ) protocol joins the test rows with blank lines."""
    return "\n\n".join(wikitext2_test_rows(data_dir))


def calibration_documents(data_dir: Path | None, source: str = "wiki") -> list[str]:
    """Calibration documents: ``wiki`` (Wikipedia articles), ``c4`` (web pages) or ``wikitext2_train`` (hub)."""
    if source == "wikitext2_train":
        from datasets import load_dataset

        try:
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"]
        except Exception as e:  # offline, or no cached copy
            raise DataError(f"WikiText-2 train could not be loaded ({type(e).__name__}); use calibration.source=wiki "
                            "or c4.") from None
        return ["\n\n".join(rows)]
    if source not in CALIBRATION_FILES:
        raise DataError(f"Unknown calibration source '{source}'; use wiki, c4 or wikitext2_train.")
    if data_dir is None:
        raise DataError(f"Calibration source '{source}' needs a data dir; set data.dir=... or ${DATA_DIR_ENV}.")
    path = data_file(data_dir, CALIBRATION_FILES[source])
    text = read_text(path)
    if source == "wiki":  # WikiExtractor output: <doc id=.. title=..> ... </doc>
        docs = re.findall(r"<doc[^>]*>(.*?)</doc>", text, flags=re.S)
    else:  # one web page per line
        docs = text.splitlines()
    docs = [d.strip() for d in docs if len(d.strip()) > 200]
    if not docs:
        raise DataError(f"Calibration file {path} holds no document of more than 200 characters; restore it from its "
                        "source or use another calibration.source.")
    return docs


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; restore it from its source (see the data README).") from None


def check_wikitext2_test(data_dir: Path | None, seqlen: int) -> None:
    """Before loading: the test file holds at least one window (a token is at least one byte, so fewer bytes than
    ``seqlen`` means fewer tokens). The exact count is checked once it is tokenized (``check_window``)."""
    if data_dir is None:
        return
    path = data_file(data_dir, WIKITEXT_TEST)
    check_window(len(read_text(path).encode()), seqlen, path, "bytes")


def check_window(n: int, seqlen: int, path, unit: str = "tokens") -> None:
    if n < seqlen:
        raise DataError(f"{path} holds {n} {unit}, fewer than one perplexity window of {seqlen} tokens; the file is "
                        "truncated (restore it) or lower eval.ppl.seqlen.")


def window_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts every text with it (Gemma: without it in context the model is far off its
    training distribution), else None (SmolLM2, Llama 3's base protocol: windows cut straight from the corpus)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None


def calibration_batches(tokenizer, data_dir: Path | None, source: str, sizes: dict, seed: int = 0,
                        documents: list[str] | None = None) -> dict:
    """For each ``name: (n_samples, seqlen)`` of ``sizes``, that many random windows of the calibration text as a
    (n, seqlen) LongTensor. The text is read and tokenized once; each size draws its windows from the same seeded
    state, so a size gets the same windows whichever other sizes are asked for.

    Documents are concatenated (seeded shuffle) so every window is full length. With a tokenizer that starts every
    text with BOS (``window_bos``: Gemma) each window is BOS and ``seqlen - 1`` text tokens, as the model's inputs are.
    ``documents``: the source's documents when already read (``calibration_documents``).
    """
    import torch

    docs = list(documents) if documents is not None else calibration_documents(data_dir, source)
    rng = random.Random(seed)
    rng.shuffle(docs)
    ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
    bos = window_bos(tokenizer)
    state, out = rng.getstate(), {}
    for name, (n_samples, seqlen) in sizes.items():
        if ids.numel() < n_samples * seqlen:
            raise DataError(f"Calibration source '{source}' has {ids.numel()} tokens, fewer than "
                            f"{n_samples}x{seqlen}; lower calibration.n_samples or seqlen.")
        rng.setstate(state)
        starts = rng.sample(range(0, ids.numel() - seqlen), n_samples)
        if bos is None:
            out[name] = torch.stack([ids[s:s + seqlen] for s in sorted(starts)])
        else:
            out[name] = torch.stack([torch.cat([ids.new_tensor([bos]), ids[s:s + seqlen - 1]]) for s in sorted(starts)])
    return out


def calibration_batch(tokenizer, data_dir: Path | None, source: str, n_samples: int, seqlen: int, seed: int = 0):
    """``n_samples`` random windows of ``seqlen`` tokens from the calibration text (see ``calibration_batches``)."""
    return calibration_batches(tokenizer, data_dir, source, {"default": (n_samples, seqlen)}, seed)["default"]
