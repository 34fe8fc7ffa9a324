"""`push_to_hub` of the model, the processor and the pipeline: what `save_pretrained` writes, presets in
subfolders included, with our model card, to the repo the Hub resolves (no network: a fake Hub)."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import random_voice_preset
from huggingface_hub import ModelCard
from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

import bark_hf.hub
from bark_hf import BarkPipeline
from bark_hf.model_card import GENERATED_CARD_MARKER
from bark_hf.tiny_random import tiny_random_bark


class FakeHub:
    """Records what would be uploaded; a bare repo name gets the namespace "me", as the Hub gives the user's."""

    readme_on_hub: str | None = None
    repo_files: dict[str, bytes] = {}

    def __init__(self, token=None):
        self.token, self.branches, self.uploads = token, [], {}
        FakeHub.last = self

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.repo = (repo_id, private, exist_ok)
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.branches.append((repo_id, branch, exist_ok))

    def hf_hub_download(self, repo_id, filename, revision=None):
        if self.readme_on_hub is None:
            raise RemoteEntryNotFoundError(f"{filename} not in {repo_id}", response=SimpleNamespace(headers={},
                                                                                                 request=None))
        path = Path(self.folder) / "hub-readme.md"
        path.write_text(self.readme_on_hub, encoding="utf-8")
        return str(path)

    def upload_folder(self, repo_id, folder_path, revision=None, create_pr=False, commit_message=None,
                      commit_description=None, ignore_patterns=None, delete_patterns=None):
        files = [path for path in Path(folder_path).rglob("*") if path.is_file()]
        skipped = set(ignore_patterns or ())
        self.uploads = {path.relative_to(folder_path).as_posix(): path.read_bytes() for path in files
                        if path.name not in skipped}
        # The repo after the commit: files matching delete_patterns go, unless this commit uploads them.
        kept = {name: data for name, data in FakeHub.repo_files.items()
                if not any(fnmatch.fnmatch(name, pattern) for pattern in delete_patterns or ())}
        FakeHub.repo_files = {**kept, **self.uploads}
        self.commit = dict(repo_id=repo_id, revision=revision, create_pr=create_pr, message=commit_message,
                           description=commit_description)
        return "commit-info"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    monkeypatch.setattr(bark_hf.hub, "HfApi", FakeHub)
    monkeypatch.setattr(FakeHub, "folder", tmp_path, raising=False)
    monkeypatch.setattr(FakeHub, "readme_on_hub", None)
    monkeypatch.setattr(FakeHub, "repo_files", {})
    return FakeHub


def _card(upload: dict[str, bytes]) -> ModelCard:
    return ModelCard(upload["README.md"].decode())


def test_model_push_uploads_weights_configs_code_and_our_card(hub):
    model, _ = tiny_random_bark()
    assert model.push_to_hub("someone/tiny-bark", private=True, save_code=True, tags=["my-voice"],
                             commit_description="first upload") == "commit-info"
    pushed = hub.last
    assert pushed.repo == ("someone/tiny-bark", True, True) and pushed.branches == []
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md",
            "modeling_bark_hf.py", "pipeline_bark_hf.py"} <= set(pushed.uploads)
    card = _card(pushed.uploads)
    assert card.data.library_name == "bark-hf" and card.data.pipeline_tag == "text-to-audio"
    assert "my-voice" in card.data.tags and "bark-hf" in card.data.tags
    assert "someone/tiny-bark" in card.text
    assert pushed.commit == dict(repo_id="someone/tiny-bark", revision=None, create_pr=False,
                                 message="Upload BarkHfModel", description="first upload")


def test_a_bare_repo_name_and_a_new_branch_are_resolved_before_the_card_is_written(hub):
    model, _ = tiny_random_bark()
    model.push_to_hub("tiny-bark", revision="dev")
    pushed = hub.last
    assert pushed.branches == [("me/tiny-bark", "dev", True)]
    assert pushed.commit["repo_id"] == "me/tiny-bark" and pushed.commit["revision"] == "dev"
    assert 'from_pretrained("me/tiny-bark")' in _card(pushed.uploads).text


@pytest.mark.parametrize("ours", [True, False])
def test_a_card_the_author_wrote_on_the_hub_is_kept(hub, ours):
    hub.readme_on_hub = f"# Bark\n{GENERATED_CARD_MARKER if ours else 'My own words.'}\n"
    model, _ = tiny_random_bark()
    model.push_to_hub("someone/tiny-bark")
    assert ("README.md" in hub.last.uploads) == ours and "model.safetensors" in hub.last.uploads


def test_a_readme_the_hub_cannot_serve_gets_our_card(hub, monkeypatch):
    """As transformers' push treats it: with create_repo and upload_folder stubbed and no network, the push failed on
    the README check (LocalEntryNotFoundError) instead of uploading."""
    def unreachable(self, repo_id, filename, revision=None):
        raise LocalEntryNotFoundError("Cannot reach the Hub and the file is not in the local cache.")

    monkeypatch.setattr(FakeHub, "hf_hub_download", unreachable)
    model, _ = tiny_random_bark()
    assert model.push_to_hub("someone/tiny-bark") == "commit-info"
    assert "someone/tiny-bark" in _card(hub.last.uploads).text


def test_processor_push_uploads_the_presets_in_their_subfolders(hub):
    _, processor = tiny_random_bark()
    processor.add_voice_preset("v2/en_test", random_voice_preset(0))
    processor.push_to_hub("someone/tiny-bark", revision="presets")
    uploads = hub.last.uploads
    assert "speaker_embeddings_path.json" in uploads and "tokenizer.json" in uploads
    assert {f"speaker_embeddings/v2/en_test_{key}.npy" for key in ("semantic_prompt", "coarse_prompt",
                                                                     "fine_prompt")} <= set(uploads)
    assert hub.last.commit["message"] == "Upload BarkHfProcessor"
    assert hub.last.branches == [("someone/tiny-bark", "presets", True)]


def test_pipeline_push_uploads_model_processor_and_a_card_with_the_presets(hub):
    model, processor = tiny_random_bark()
    processor.add_voice_preset("v2/en_test", random_voice_preset(0))
    BarkPipeline(model=model, processor=processor, device="cpu").push_to_hub("tiny-bark", tags=["demo"])
    uploads = hub.last.uploads
    assert {"model.safetensors", "config.json", "tokenizer.json", "speaker_embeddings_path.json"} <= set(uploads)
    assert any(name.startswith("speaker_embeddings/") for name in uploads)
    card = _card(uploads)
    assert "me/tiny-bark" in card.text and "demo" in card.data.tags
    assert "v2/en_test" in card.text


def test_a_folder_saved_as_dot_is_named_in_its_card(tmp_path, monkeypatch):
    model, _ = tiny_random_bark()
    (tmp_path / "my-bark").mkdir()
    monkeypatch.chdir(tmp_path / "my-bark")
    model.save_pretrained(".")
    assert 'from_pretrained("my-bark")' in (tmp_path / "my-bark" / "README.md").read_text()


def test_shards_and_pull_request_refs_pass_through(hub):
    model, processor = tiny_random_bark()
    model.push_to_hub("someone/tiny-bark", max_shard_size="1MB", revision="refs/pr/3")
    assert "model.safetensors.index.json" in hub.last.uploads
    assert hub.last.branches == [] and hub.last.commit["revision"] == "refs/pr/3"  # a PR's ref is not created
    # The pipeline takes the model's options (it refused max_shard_size).
    BarkPipeline(model=model, processor=processor, device="cpu").push_to_hub("someone/tiny-bark", max_shard_size="1MB")
    assert "model.safetensors.index.json" in hub.last.uploads and "tokenizer.json" in hub.last.uploads


@pytest.mark.parametrize("tags,expected", [("my-voice", ["my-voice"]), (None, [])])
def test_tags_as_one_string_or_none(hub, tags, expected):
    """transformers' push_to_hub takes them; a string became one tag per character, None a TypeError."""
    model, processor = tiny_random_bark()
    for pushable in (model, BarkPipeline(model=model, processor=processor, device="cpu")):
        pushable.push_to_hub("someone/tiny-bark", tags=tags)
        assert _card(hub.last.uploads).data.tags == ["bark", "bark-hf", "text-to-speech", "audio", *expected]


def test_a_push_with_other_sharding_replaces_the_weights_on_the_hub(hub):
    """An earlier push's model.safetensors stayed beside new shards, and transformers loads it before them."""
    model, processor = tiny_random_bark()
    model.push_to_hub("someone/tiny-bark")
    model.push_to_hub("someone/tiny-bark", max_shard_size="1MB")
    weights = sorted(name for name in hub.repo_files if name.startswith("model"))
    assert "model.safetensors" not in weights and "model.safetensors.index.json" in weights and len(weights) > 2
    BarkPipeline(model=model, processor=processor, device="cpu").push_to_hub("someone/tiny-bark")
    assert sorted(name for name in hub.repo_files if name.startswith("model")) == ["model.safetensors"]
    assert "tokenizer.json" in hub.repo_files
    processor.push_to_hub("someone/tiny-bark")  # a processor's push leaves the model's weights alone
    assert "model.safetensors" in hub.repo_files
