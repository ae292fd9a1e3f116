"""Any model on the Hugging Face Hub: a repo id -> a ModelSpec, through ``huggingface_hub`` only.

This is an I/O edge beside the pure catalog: ``advisor.catalog.resolve_model`` sends anything shaped
like a Hub id (``org/name``, optionally ``org/name@revision``) here once the catalog, sizes and local
paths have had their turn. What it does, and why:

- ``config.json`` comes from ``hf_hub_download``, so ``HF_TOKEN`` (gated and private repos), the
  ``HF_HOME`` cache, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` (a mirror) work exactly as they do for
  transformers: the library reads them, we never re-implement them. The architecture is read by
  ``advisor.catalog.model_from_config`` (the family registry), the same path as a posted config.
- The exact parameter count and the stored dtypes come from the Hub's safetensors metadata
  (``model_info(expand=["safetensors"])``, else the file headers through ``get_safetensors_metadata``)
  and are recorded beside the analytical count (``ModelSpec.checkpoint_params``); the estimators keep
  using the architecture's count, and a difference over 0.5% is said in the spec's note.
- A pre-quantized checkpoint (``quantization_config``: GPTQ, AWQ, FP8, bitsandbytes) gets its method, bits,
  group size and stored bytes from the same metadata (``ModelSpec.prequantized``, advisor.prequant): the
  frozen weights of an adapter plan take the checkpoint's bytes, not bf16 ones.
- Network time is bounded twice: each request by ``HubOptions.request_timeout_s`` (the library's
  ``HF_HUB_ETAG_TIMEOUT``/``HF_HUB_DOWNLOAD_TIMEOUT`` still win where set, as the library decides), and
  the whole resolution by ``HubOptions.deadline_s`` (the library retries a failed HEAD with a 60 s
  timeout and back-off, which no per-request setting caps).
- Resolved specs are kept in process, keyed by (repo, revision, endpoint), so the service answers the
  second ``/v1/recommend`` for a Hub id without the network.
- Every library error is translated here, at one boundary, into ``UnknownModelError`` /
  ``InvalidInputError`` on field ``model`` (or ``model_revision``) with one line and a "To fix:".

``huggingface_hub`` is imported on first use: the pure core and the CLI's start-up stay light, and a
deployment that never names a Hub id never loads it.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from advisor import prequant
from advisor.errors import AdvisorError, InvalidInputError, UnknownModelError
from advisor.specs import ModelSpec

__all__ = [
    "HubOptions",
    "check_causal_lm",
    "clear_cache",
    "is_hub_id",
    "parse_hub_id",
    "resolve_hub_model",
]

#: A Hub model id, optionally as a huggingface.co URL or hf:// URI, optionally with ``@revision``.
#: Namespace and name: letters, digits, ``-``, ``_``, ``.`` (huggingface_hub validates the rest).
_HUB_ID_RE = re.compile(
    r"^(?:(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/|hf://)?"
    r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"
    r"(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9._/-]*))?/?$"
)
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
#: architectures that end like this are language models transformers can train with a causal-LM loss
#: (decoder-only, or T5-style encoder-decoder text generation)
_LM_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
#: a checkpoint count further than this from the architecture's is said in the note
PARAMS_TOLERANCE = 0.005
_INLINE_HINT = "post the repo's config.json inline as `model` (API) or pass its path as --model (CLI)"

T = TypeVar("T")


def _env_bool(value: str | None, default: bool) -> bool:
    if value is None or not value.strip():
        return default
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise InvalidInputError(f"ADVISOR_HUB_LOOKUPS={value!r} is not a boolean. To fix: set it to 1 or 0", field="model")


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise InvalidInputError(f"{name}={raw!r} must be a positive number of seconds", field="model")
    return v


@dataclass(frozen=True)
class HubOptions:
    """How Hub ids resolve. The service builds one from its settings (``ADVISOR_HUB_*``), the CLI from the
    same environment variables and its flags.

    Token, cache folder, offline mode and endpoint default to what huggingface_hub itself reads
    (``HF_TOKEN`` or the stored login, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``);
    the fields here only override them."""

    enabled: bool = True  # False: air-gapped; a Hub id is an error that says how to post the config
    endpoint: str | None = None  # None: huggingface_hub's (HF_ENDPOINT, default https://huggingface.co)
    token: str | None = None  # None: huggingface_hub's (HF_TOKEN, else the stored login)
    request_timeout_s: float = 10.0  # each HTTP request
    deadline_s: float = 30.0  # the whole resolution (config + safetensors metadata), retries included
    offline: bool = False  # True: the local cache only (as HF_HUB_OFFLINE=1, which the library also honours)
    cache_ttl_s: float = 3600.0  # in-process reuse of a branch/tag resolution; a commit sha is kept for good

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> HubOptions:
        """``ADVISOR_HUB_LOOKUPS`` (bool), ``ADVISOR_HUB_ENDPOINT``, ``ADVISOR_HUB_TIMEOUT_S``,
        ``ADVISOR_HUB_DEADLINE_S``: the same names the service's settings read."""
        env = os.environ if env is None else env
        fields: dict[str, Any] = {
            "enabled": _env_bool(env.get("ADVISOR_HUB_LOOKUPS"), True),
            "endpoint": (env.get("ADVISOR_HUB_ENDPOINT") or "").strip() or None,
            "request_timeout_s": _env_float(env, "ADVISOR_HUB_TIMEOUT_S", cls.request_timeout_s),
            "deadline_s": _env_float(env, "ADVISOR_HUB_DEADLINE_S", cls.deadline_s),
        }
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def endpoint_url(self) -> str:
        """The endpoint requests go to: ours where set, else huggingface_hub's own (HF_ENDPOINT)."""
        if self.endpoint:
            return self.endpoint.rstrip("/")
        from huggingface_hub import constants

        return constants.ENDPOINT


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo_id, revision or None) where `text` is shaped like a Hub model id, else None."""
    m = _HUB_ID_RE.match(text.strip())
    if m is None:
        return None
    return m.group("repo"), m.group("rev")


def is_hub_id(text: str) -> bool:
    return parse_hub_id(text) is not None


# ---- in-process cache ------------------------------------------------------------------------------
_CACHE: dict[tuple[str, str, str], tuple[float, ModelSpec]] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_MAX = 512


def clear_cache() -> None:
    """Forget every resolved spec (tests; a long-running service picks up moved branches after the TTL)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _cached(key: tuple[str, str, str], ttl_s: float) -> ModelSpec | None:
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is None:
        return None
    stamp, spec = hit
    if _COMMIT_RE.match(key[1]) or time.monotonic() - stamp < ttl_s:
        return spec
    return None


_KEY_LOCKS: dict[tuple[str, str, str], threading.Lock] = {}


def _key_lock(key: tuple[str, str, str]) -> threading.Lock:
    with _CACHE_LOCK:
        if len(_KEY_LOCKS) > _CACHE_MAX:
            _KEY_LOCKS.clear()  # only ever a cache of locks: a new one is made on demand
        return _KEY_LOCKS.setdefault(key, threading.Lock())


def _store(key: tuple[str, str, str], spec: ModelSpec) -> None:
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (time.monotonic(), spec)


# ---- resolution ------------------------------------------------------------------------------------
def resolve_hub_model(
    repo_id: str, revision: str | None = None, options: HubOptions | None = None, *, revision_field: str = "model"
) -> ModelSpec:
    """The ModelSpec of Hub repo `repo_id` at `revision` (default: the repo's main branch).

    Raises UnknownModelError (unknown or private repo) or InvalidInputError (gated, bad revision,
    offline cache miss, no config.json, not a causal LM, network failure or timeout), each one line
    with a "To fix:"; `revision_field` names the input a bad revision came from."""
    opts = options or HubOptions()
    parsed = parse_hub_id(repo_id)
    if parsed is None:
        raise InvalidInputError(
            f"{repo_id!r} is not a Hugging Face model id. To fix: name it as org/name (e.g. Qwen/Qwen3-8B)",
            field="model",
        )
    repo, at_rev = parsed
    if at_rev and revision and at_rev != revision:
        raise InvalidInputError(
            f"two revisions for {repo}: {at_rev!r} in the id and {revision!r} given separately. "
            "To fix: give the revision once",
            field=revision_field,
        )
    revision = revision or at_rev
    if not opts.enabled:
        raise InvalidInputError(
            f"{repo!r} looks like a Hugging Face id, but Hub look-ups are off on this deployment "
            f"(ADVISOR_HUB_LOOKUPS=0 or --no-hub). To fix: {_INLINE_HINT}, or turn look-ups on",
            field="model",
        )
    key = (repo, revision or "main", opts.endpoint_url())
    spec = _cached(key, opts.cache_ttl_s)
    if spec is not None:
        return spec
    with _key_lock(key):  # concurrent requests for one model: one resolution, the others wait for its result
        spec = _cached(key, opts.cache_ttl_s)
        if spec is not None:
            return spec
        spec, complete = _with_deadline(lambda: _fetch(repo, revision, opts, revision_field), opts, repo)
        if not complete:  # answered from the disk cache without the Hub: ask the Hub again next time
            return spec
        _store(key, spec)
    if spec.revision and spec.revision != key[1]:
        _store((repo, spec.revision, key[2]), spec)  # the same commit asked by its sha later
    return spec


def _with_deadline(fn: Callable[[], T], opts: HubOptions, repo: str) -> T:
    """Run `fn` in a daemon thread and give up after ``opts.deadline_s``: the library's own retries
    (a failed HEAD is retried with a 60 s timeout and back-off) must not hold a request for minutes.
    A thread left behind finishes or times out on its own; being a daemon, it never holds the CLI's exit."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread as is
            box["error"] = exc

    worker = threading.Thread(target=run, name=f"hub-resolve:{repo}", daemon=True)
    worker.start()
    worker.join(opts.deadline_s)
    if worker.is_alive():
        raise InvalidInputError(
            f"the Hugging Face Hub at {opts.endpoint_url()} did not answer for {repo!r} within {opts.deadline_s:g} s. "
            f"To fix: retry, check the network or HF_ENDPOINT, raise ADVISOR_HUB_DEADLINE_S, or {_INLINE_HINT}",
            field="model",
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def _fetch(repo: str, revision: str | None, opts: HubOptions, revision_field: str) -> tuple[ModelSpec, bool]:
    """Model info first (one request, no library retries: an unknown repo, a bad revision or a dead network
    fail at once), then config.json through huggingface_hub's cache (one HEAD when it is cached already).
    Where the info request fails for a network reason, config.json still comes from the local cache if it is
    there, as huggingface_hub falls back to its cache. The flag: whether the Hub itself answered."""
    from huggingface_hub import hf_hub_download

    info, info_error = _model_info(repo, revision, opts)
    if info_error is not None and _definitive(info_error):
        raise _translate(info_error, repo, revision, opts, revision_field, "config.json") from None
    unreachable = info_error is not None and _network_error(info_error)
    commit = getattr(info, "sha", None) if info is not None else None
    commit = commit if isinstance(commit, str) and _COMMIT_RE.match(commit) else None
    try:
        path = hf_hub_download(
            repo,
            "config.json",
            # the branch or tag as asked (not the info's sha): huggingface_hub then records the ref in its cache,
            # so a later offline run finds `main` there
            revision=revision,
            token=opts.token,
            endpoint=opts.endpoint,
            etag_timeout=opts.request_timeout_s,
            # the Hub could not be reached for the info: only the cache can answer (a retry would wait the same)
            local_files_only=opts.offline or unreachable,
        )
    except Exception as exc:
        cause = info_error if unreachable and info_error is not None else exc
        raise _translate(cause, repo, revision, opts, revision_field, "config.json") from None
    cfg_path = Path(path)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"{repo}'s config.json cannot be read: {exc}. To fix: check the repo's config.json, or {_INLINE_HINT}",
            field="model",
        ) from None
    if not isinstance(cfg, dict):
        raise InvalidInputError(f"{repo}'s config.json is not a JSON object. To fix: {_INLINE_HINT}", field="model")
    if _COMMIT_RE.match(cfg_path.parent.name):
        commit = cfg_path.parent.name  # the snapshot folder of huggingface_hub's cache is named by the commit read
    check_causal_lm(cfg, repo)

    from advisor.catalog import model_from_config

    try:
        spec = model_from_config(cfg, name=repo)
    except AdvisorError as exc:
        message = exc.message if repo in exc.message else f"{repo}: {exc.message}"
        raise type(exc)(message, field="model", suggestions=exc.suggestions) from None
    if info is None:
        reason = "offline" if opts.offline or _is_offline() else f"the Hub did not answer ({_short(info_error)})"
        ckpt = _Checkpoint(None, (), f"{reason}: the safetensors metadata was not read")
    else:
        ckpt = _checkpoint_metadata(repo, commit or revision, info, opts)
    spec = _with_checkpoint(spec, repo, revision, commit, ckpt, opts)
    # a pre-quantized checkpoint (GPTQ, AWQ, FP8, bitsandbytes): its stored bytes from the same metadata, or the
    # config's bits and group size where none was read (advisor.prequant says which in the note)
    spec = prequant.attach(spec, cfg, repo, ckpt.dtypes if ckpt.params is not None else None, ckpt.basis)
    return spec, info is not None


def _is_offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _model_info(repo: str, revision: str | None, opts: HubOptions) -> tuple[Any, Exception | None]:
    """The Hub's model info with the safetensors summary and the commit sha, or the error that prevented it."""
    from huggingface_hub import HfApi

    if opts.offline or _is_offline():
        from huggingface_hub.errors import OfflineModeIsEnabled

        return None, OfflineModeIsEnabled("offline mode: the Hub is not asked")
    try:
        api = HfApi(endpoint=opts.endpoint, token=opts.token)
        return api.model_info(
            repo, revision=revision, expand=["safetensors", "sha"], timeout=opts.request_timeout_s
        ), None
    except Exception as exc:
        return None, exc


_NETWORK_ERRORS = {
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "WriteTimeout",
    "PoolTimeout",
    "TimeoutException",
    "NetworkError",
    "ReadError",
    "WriteError",
    "RemoteProtocolError",
    "ProxyError",
    "OfflineModeIsEnabled",
}


def _network_error(exc: BaseException) -> bool:
    """No answer from the Hub at all (offline, DNS, refused, timed out), as opposed to an HTTP answer."""
    return any(
        type(e).__name__ in _NETWORK_ERRORS or isinstance(e, (TimeoutError, ConnectionError)) for e in _chain(exc)
    )


def _definitive(exc: Exception) -> bool:
    """Errors the Hub states about the repo itself (not the network): no need to look further."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    return isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError)) and not isinstance(exc, GatedRepoError)


def check_causal_lm(cfg: Mapping[str, Any], repo: str) -> None:
    """Refuse a config that is not a language model the advisor can plan fine-tuning for.

    A model_type a family claims is fine (T5's ``T5ForConditionalGeneration`` included); an unknown one
    must at least declare a causal-LM head in ``architectures`` (then it is read as a Llama-format
    config, as ``model_from_config`` notes). Encoder-only, vision, audio and embedding models are not."""
    from advisor.families import family_for_model_type

    mtype = str(cfg.get("model_type") or "").lower()
    archs = [str(a) for a in cfg.get("architectures") or [] if isinstance(a, str)]
    if mtype and family_for_model_type(mtype) is not None:
        return
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return
    if mtype in _MOE_OR_NEW_LM_TYPES:  # model_from_config has the last word (it names what is not modelled yet)
        return
    what = ", ".join(archs) or "no architectures"
    raise InvalidInputError(
        f"{repo} is not a causal language model the advisor can plan for (model_type {mtype or 'missing'!r}, "
        f"{what}). To fix: name a text-generation model (an *ForCausalLM checkpoint), or {_INLINE_HINT}",
        field="model",
    )


#: LM types whose configs ``model_from_config`` judges itself (MoE, multimodal wrappers of a text LM)
_MOE_OR_NEW_LM_TYPES = frozenset(
    {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "gemma3", "gemma3_text"}
)


# ---- safetensors metadata --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Checkpoint:
    params: int | None
    dtypes: tuple[tuple[str, int], ...]
    basis: str  # where the numbers came from, or why there are none


def _checkpoint_metadata(repo: str, revision: str | None, info: Any, opts: HubOptions) -> _Checkpoint:
    """Exact stored parameter counts per dtype: the Hub's model info where it has the safetensors summary,
    else the safetensors headers (range requests). Missing metadata is not an error: the spec then
    carries the architecture's count only, and the note says why."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import NotASafetensorsRepoError

    st = getattr(info, "safetensors", None)
    if st is not None and st.total:
        return _Checkpoint(int(st.total), _dtypes(st.parameters), "the Hub's model info (safetensors)")
    try:
        api = HfApi(endpoint=opts.endpoint, token=opts.token)
        meta = api.get_safetensors_metadata(repo, revision=revision, timeout=opts.request_timeout_s)
    except NotASafetensorsRepoError:
        return _Checkpoint(None, (), "the repo has no safetensors weights (no model.safetensors or index)")
    except Exception as exc:
        return _Checkpoint(None, (), f"the safetensors headers could not be read ({_short(exc)})")
    counts = meta.parameter_count
    total = sum(counts.values())
    if not total:
        return _Checkpoint(None, (), "the safetensors headers list no tensors")
    return _Checkpoint(total, _dtypes(counts), "the safetensors headers of the checkpoint")


def _dtypes(counts: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(((str(k), int(v)) for k, v in counts.items()), key=lambda kv: (-kv[1], kv[0])))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _with_checkpoint(
    spec: ModelSpec, repo: str, revision: str | None, commit: str | None, ckpt: _Checkpoint, opts: HubOptions
) -> ModelSpec:
    at = commit or revision or "main"
    notes = [spec.note] if spec.note else []
    if ckpt.params is not None:
        arch = spec.param_count
        diff = (ckpt.params - arch) / arch
        if abs(diff) > PARAMS_TOLERANCE:
            stored = ", ".join(f"{d} {n:,}" for d, n in ckpt.dtypes)
            notes.append(
                f"checkpoint stores {ckpt.params:,} parameters ({stored}) vs {arch:,} from the architecture "
                f"({diff:+.1%}): estimates use the architecture's count (quantised or packed weights, extra heads "
                "or tensors the config does not describe)"
            )
    else:
        notes.append(f"exact parameter count not read: {ckpt.basis}")
    return replace(
        spec,
        hf_id=repo,
        source=f"{opts.endpoint_url()}/{repo}/blob/{at}/config.json",
        revision=commit or revision,
        checkpoint_params=ckpt.params,
        checkpoint_dtypes=ckpt.dtypes,
        note="; ".join(notes),
    )


# ---- error translation (the one boundary) ----------------------------------------------------------
def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


def _translate(
    exc: Exception, repo: str, revision: str | None, opts: HubOptions, revision_field: str, filename: str
) -> AdvisorError:
    """One huggingface_hub/httpx error -> one advisor error with a one-line message and a "To fix:"."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = opts.endpoint_url()
    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    first = next((e for e in chain if isinstance(e, GatedRepoError)), None)
    if first is not None:
        had_token = _has_token(opts)
        fix = (
            "your token has no access yet: accept the licence on the repo's page with the account HF_TOKEN belongs to"
            if had_token
            else "accept the licence on the repo's page, then set HF_TOKEN to a token of that account"
        )
        return InvalidInputError(
            f"{repo} is a gated repo on {endpoint} and "
            f"{'the token given has no access' if had_token else 'no token was sent'}. To fix: {fix}",
            field="model",
        )
    if any(isinstance(e, RevisionNotFoundError) for e in chain):
        return InvalidInputError(
            f"revision {revision!r} not found in {repo} on {endpoint}. "
            "To fix: give an existing branch, tag or commit sha (or leave the revision out for main)",
            field=revision_field,
        )
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return UnknownModelError(
            f"no model repo {repo!r} on {endpoint} (or it is private). To fix: check the id on the Hub "
            "(org/name, case as shown there), or set HF_TOKEN for a private repo",
            field="model",
        )
    if any(isinstance(e, RemoteEntryNotFoundError) for e in chain):
        return InvalidInputError(
            f"{repo} has no {filename} at {revision or 'main'}: not a transformers model repo. "
            f"To fix: name the repo of the transformers checkpoint, or {_INLINE_HINT}",
            field="model",
        )
    codes = [s for s in (_status(e) for e in chain) if s is not None]
    if 401 in codes or 403 in codes:
        return InvalidInputError(
            f"{endpoint} refused {repo} (HTTP {codes[0]}): the token is missing, invalid or lacks access. "
            "To fix: set HF_TOKEN to a valid token with read access to this repo",
            field="model",
        )
    offline = opts.offline or constants.is_offline_mode()
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain) or (
        offline and any(isinstance(e, LocalEntryNotFoundError) for e in chain)
    ):
        return InvalidInputError(
            f"{repo}{'@' + revision if revision else ''} is not in the local Hugging Face cache and Hub access is off "
            "(HF_HUB_OFFLINE). To fix: resolve it once with network access (it is cached in HF_HOME), "
            f"unset HF_HUB_OFFLINE, or {_INLINE_HINT}",
            field="model",
        )
    if names & {"ReadTimeout", "ConnectTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException"} or any(
        isinstance(e, TimeoutError) for e in chain
    ):
        return InvalidInputError(
            f"the Hugging Face Hub at {endpoint} timed out for {repo} (after {opts.request_timeout_s:g} s per request). "
            f"To fix: retry, check the network or HF_ENDPOINT, or {_INLINE_HINT}",
            field="model",
        )
    if names & {"ConnectError", "NetworkError", "ProxyError", "RemoteProtocolError"} or any(
        isinstance(e, LocalEntryNotFoundError) for e in chain
    ):
        return InvalidInputError(
            f"cannot reach the Hugging Face Hub at {endpoint} for {repo} and it is not in the local cache. "
            f"To fix: check the network, proxy or HF_ENDPOINT, or {_INLINE_HINT}",
            field="model",
        )
    if any(isinstance(e, HFValidationError) for e in chain):
        return InvalidInputError(
            f"{repo!r} is not a valid Hugging Face repo id ({_short(exc)}). To fix: use org/name as shown on the Hub",
            field="model",
        )
    return InvalidInputError(
        f"the Hugging Face Hub at {endpoint} failed for {repo}: {_short(exc)}. To fix: retry later, or {_INLINE_HINT}",
        field="model",
    )


def _has_token(opts: HubOptions) -> bool:
    if opts.token:
        return True
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:
        return False
