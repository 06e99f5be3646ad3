"""Named pairs from models.toml, and which of their files are already on this machine.

One table per pair: `target` and `drafter` (Hugging Face repo ids or local paths), the default
draft length, a note, and how to chat with the target: `chat = "template"` (instruction-tuned:
its chat template) or `"dialogue"` (a base model: a plain-text dialogue it continues; see
conversation.py); left out, a target with a chat template is "template". `label` names the model in
chat's banner. `target_4bit` names an mlx-community quantized target and adds the
alias `<alias>-4bit`. `kind = "embedded"` marks the pair that works offline: its target is
built on first use by `mlx_mtp.embedded` and its drafter ships inside the package (a path
relative to it). With no model named, commands use the first embedded pair.
"""

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Dict, List, Optional, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACKAGE = Path(__file__).parent
REGISTRY = PACKAGE / "models.toml"
HUB, EMBEDDED = "hub", "embedded"
TEMPLATE, DIALOGUE = "template", "dialogue"


@dataclass
class PairEntry:
    alias: str
    target: str = ""
    drafter: str = ""
    draft_tokens: int = 4
    note: str = ""
    kind: str = HUB
    chat: str = ""  # TEMPLATE, DIALOGUE, or "": decided by the checkpoint
    label: str = ""

    def target_path(self) -> str:
        if self.kind == EMBEDDED:
            from .embedded import ensure_target

            return str(ensure_target())
        return self.target

    def drafter_path(self) -> str:
        if self.kind == EMBEDDED:
            return str(PACKAGE / self.drafter)
        return self.drafter


def load_registry(path: Optional[Path] = None) -> Dict[str, PairEntry]:
    path = path or REGISTRY
    known = {f.name for f in fields(PairEntry)} - {"alias"}
    out = {}
    for alias, table in tomllib.loads(path.read_text()).items():
        table = dict(table)
        quantized = table.pop("target_4bit", None)
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"{path}: [{alias}] has unknown keys {sorted(unknown)}")
        if table.get("kind", HUB) not in (HUB, EMBEDDED):
            raise ValueError(f"{path}: [{alias}] kind must be {HUB!r} or {EMBEDDED!r}")
        if table.get("chat", TEMPLATE) not in (TEMPLATE, DIALOGUE):
            raise ValueError(f"{path}: [{alias}] chat must be {TEMPLATE!r} or {DIALOGUE!r}")
        out[alias] = PairEntry(alias, **table)
        if quantized:
            out[f"{alias}-4bit"] = replace(
                out[alias], alias=f"{alias}-4bit", target=quantized, note=f"4-bit target; {out[alias].note}"
            )
    return out


def find_pair(name: str) -> Optional[PairEntry]:
    return load_registry().get(name)


def default_pair() -> Optional[PairEntry]:
    """The pair used when no model is named: the first embedded one."""
    return next((e for e in load_registry().values() if e.kind == EMBEDDED), None)


@dataclass
class Presence:
    """One side of a pair on this machine."""

    local: bool  # downloaded, converted or shipped: loading needs no network
    size: Optional[int]  # bytes on disk, or to download; None when unknown


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _cached_repos() -> Dict[str, int]:
    """Repo id (lower case) -> bytes, for every model in the Hugging Face cache."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        # The same cache `snapshot_download` reads (scan_cache_dir's default is fixed at import).
        repos = scan_cache_dir(constants.HF_HUB_CACHE).repos
    except CacheNotFound:
        return {}
    return {r.repo_id.lower(): r.size_on_disk for r in repos if r.repo_type == "model"}


def hub_size(repo: str) -> Optional[int]:
    """Bytes `mlx_mtp.load` would download for a repo, or None offline or on any hub error."""
    from huggingface_hub import HfApi
    from huggingface_hub.constants import is_offline_mode

    from .loading import WEIGHT_PATTERNS

    if is_offline_mode():
        return None
    try:
        info = HfApi().model_info(repo, files_metadata=True, timeout=10)
    except Exception:  # the size is informative only: never fail a listing for it
        return None
    return sum(s.size or 0 for s in info.siblings if any(fnmatch(s.rfilename, p) for p in WEIGHT_PATTERNS))


def _presence(path_or_repo: str, cached: Dict[str, int]) -> Presence:
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return Presence(True, _dir_size(path))
    size = cached.get(path_or_repo.lower())
    if size is not None:
        return Presence(True, size)
    return Presence(False, hub_size(path_or_repo))


def presence(entries: List[PairEntry]) -> List[Tuple[Presence, Presence]]:
    """(target, drafter) presence of each entry; hub sizes are looked up in parallel."""
    cached = _cached_repos()

    def one(entry: PairEntry) -> Tuple[Presence, Presence]:
        if entry.kind == EMBEDDED:
            from .embedded import TARGET_DIR, cache_home

            # Built from a PyPI package on first use: nothing to download from the hub.
            built = cache_home() / TARGET_DIR
            target = Presence(True, _dir_size(built) if built.exists() else None)
            return target, _presence(entry.drafter_path(), cached)
        return _presence(entry.target, cached), _presence(entry.drafter, cached)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, entries))
