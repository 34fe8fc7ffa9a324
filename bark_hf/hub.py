"""Uploading what bark-hf writes (a model, a processor, a pipeline) to the Hugging Face Hub.

transformers' own `push_to_hub` uploads files one folder level deep, which misses the voice presets
(`speaker_embeddings/v2/...`), and writes its generic model card; this uploads the whole folder that
`save_pretrained` writes, with bark-hf's card.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.errors import EntryNotFoundError

from .model_card import GENERATED_CARD_MARKER

HUB_DOWNLOAD_OPTIONS = ("revision", "token", "cache_dir", "local_files_only", "force_download")
"""The `from_pretrained` options that say where and how to download a Hub repo (`snapshot_download`'s names)."""
MODEL_WEIGHTS = ("model*.safetensors", "model.safetensors.index.json")
"""What a model's push replaces on the Hub: an earlier push's single file or shards left beside new weights of
another sharding, and transformers loads a single `model.safetensors` before any shards."""


def push_folder_to_hub(
    repo_id: str,
    write: Callable[[Path, str], None],
    what: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    replaces: Sequence[str] = (),
) -> Any:
    """Create the repo (and the branch `revision`), let `write(folder, repo_id)` fill a temporary folder,
    and upload it with `commit_message` (default "Upload {what}"); returns the Hub's commit info.

    The keyword arguments are the `push_to_hub` options of the model, processor and pipeline, as in
    transformers. `write` gets the Hub's full id (a bare name gains the user's namespace), so a card
    names the real repo. A README.md already on the Hub that bark-hf did not generate is kept, as
    transformers keeps it. Files on the Hub matching a pattern of `replaces` and not written by `write` are
    deleted in the same commit.
    """
    commit_message = commit_message or f"Upload {what}"
    hub = HfApi(token=token)
    repo_id = hub.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):  # a pull request's ref is no branch to make
        hub.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        write(Path(folder), repo_id)
        return hub.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
            commit_message=commit_message, commit_description=commit_description,
            ignore_patterns=["README.md"] if _hub_card_is_the_authors(hub, repo_id, revision) else None,
            delete_patterns=list(replaces) or None,
        )


def _hub_card_is_the_authors(hub: HfApi, repo_id: str, revision: str | None) -> bool:
    try:
        path = hub.hf_hub_download(repo_id, "README.md", revision=revision)
    except EntryNotFoundError:  # none on the Hub, or it cannot be read (no connection), as transformers' push treats it
        return False
    return GENERATED_CARD_MARKER not in Path(path).read_text(encoding="utf-8")
