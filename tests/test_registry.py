"""models.toml: named pairs, their 4-bit and embedded forms, and what is on this machine."""

import hashlib
import sys
import types
from pathlib import Path

import huggingface_hub.constants
import pytest

from mlx_mtp.checkpoints import registry

GEMMA_4 = ["gemma-4-e2b", "gemma-4-e4b", "gemma-4-26b-a4b", "gemma-4-31b"]


def put_in_hub_cache(cache: Path, repo: str, files: dict) -> Path:
    """Lay `files` (name -> bytes) out as huggingface_hub does: blobs plus a snapshot of links."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / blob).write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(Path("../" * (len(Path(name).parts) + 1)) / "blobs" / blob)
    return snapshot


def copy_to_hub_cache(cache: Path, repo: str, directory: Path) -> Path:
    return put_in_hub_cache(cache, repo, {f.name: f.read_bytes() for f in directory.iterdir() if f.is_file()})


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty offline Hugging Face cache in tmp_path."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def toml(tmp_path, monkeypatch):
    """Point the registry at a models.toml written by the test."""

    def write(text: str):
        path = tmp_path / "models.toml"
        path.write_text(text)
        monkeypatch.setattr(registry, "REGISTRY", path)

    return write


def test_the_shipped_registry_names_the_four_gemma_4_pairs():
    entries = registry.load_registry()
    for alias in GEMMA_4:
        entry = entries[alias]
        assert entry.target.startswith("google/gemma-4-") and entry.target.endswith("-it")
        assert entry.drafter == entry.target + "-assistant"
        assert entry.draft_tokens >= 1 and entry.note


def test_a_4bit_target_adds_an_alias_with_the_same_drafter():
    entries = registry.load_registry()
    for alias in GEMMA_4:
        quantized = entries[f"{alias}-4bit"]
        assert quantized.target.startswith("mlx-community/") and quantized.target.endswith("-4bit")
        assert quantized.drafter == entries[alias].drafter
        assert quantized.draft_tokens == entries[alias].draft_tokens


def test_unknown_keys_and_kinds_are_errors(toml):
    toml('[x]\ntarget = "a/b"\ndrafter = "a/c"\ntypo = 1\n')
    with pytest.raises(ValueError, match="unknown keys"):
        registry.load_registry()
    toml('[x]\ntarget = "a/b"\ndrafter = "a/c"\nkind = "gguf"\n')
    with pytest.raises(ValueError, match="kind"):
        registry.load_registry()


def test_no_default_pair_without_an_embedded_entry(toml):
    toml('[x]\ntarget = "a/b"\ndrafter = "a/c"\n')
    assert registry.default_pair() is None


def test_the_embedded_entry_is_the_default_and_builds_its_target(toml, monkeypatch, tmp_path):
    built = tmp_path / "built-target"
    fake = types.SimpleNamespace(ensure_target=lambda: built)
    monkeypatch.setitem(sys.modules, "mlx_mtp.checkpoints.embedded", fake)
    toml('[hub]\ntarget = "a/b"\ndrafter = "a/c"\n\n[small]\nkind = "embedded"\ndrafter = "assets/drafter"\n')
    entry = registry.default_pair()
    assert entry.alias == "small"
    assert entry.target_path() == str(built)
    assert Path(entry.drafter_path()) == registry.PACKAGE / "assets" / "drafter"


def test_the_embedded_target_needs_no_download_and_shows_its_size_once_built(toml, monkeypatch, tmp_path):
    built = tmp_path / "home" / "target"
    fake = types.SimpleNamespace(cache_home=lambda: tmp_path / "home", TARGET_DIR="target")
    monkeypatch.setitem(sys.modules, "mlx_mtp.checkpoints.embedded", fake)
    toml(f'[small]\nkind = "embedded"\ndrafter = "{tmp_path}"\n')
    (target, drafter), = registry.presence(list(registry.load_registry().values()))
    assert target.local and target.size is None and drafter.local
    built.mkdir(parents=True)
    (built / "model.safetensors").write_bytes(b"x" * 7)
    (target, _), = registry.presence(list(registry.load_registry().values()))
    assert target.size == 7


def test_presence_reads_sizes_from_the_hub_cache(hub_cache, toml):
    put_in_hub_cache(hub_cache, "org/target", {"config.json": b"{}", "model.safetensors": b"x" * 1000})
    toml('[p]\ntarget = "org/target"\ndrafter = "org/missing"\n')
    (target, drafter), = registry.presence(list(registry.load_registry().values()))
    assert target.local and target.size == 1002
    assert not drafter.local and drafter.size is None  # offline: the hub is not asked


def test_presence_of_a_local_directory(tmp_path, toml):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "model.safetensors").write_bytes(b"x" * 10)
    toml(f'[p]\ntarget = "{tmp_path / "d"}"\ndrafter = "{tmp_path / "nothing"}"\n')
    (target, _), = registry.presence(list(registry.load_registry().values()))
    assert target.local and target.size == 10


def test_hub_size_counts_only_what_load_downloads(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    siblings = [
        types.SimpleNamespace(rfilename=name, size=size)
        for name, size in [("config.json", 1), ("model.safetensors", 100), ("original/model.pt", 10_000)]
    ]
    monkeypatch.setattr(
        huggingface_hub.HfApi, "model_info", lambda self, repo, **kw: types.SimpleNamespace(siblings=siblings)
    )
    assert registry.hub_size("org/name") == 101


def test_hub_size_is_unknown_when_the_hub_fails(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def down(self, repo, **kw):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", down)
    assert registry.hub_size("org/name") is None
