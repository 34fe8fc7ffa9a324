"""`push_to_hub` uploads what `save_pretrained` writes, with our model card (no network: a fake Hub)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard

import bark_hf.modeling_bark_hf as modeling
from bark_hf.tiny_random import tiny_random_bark


class FakeHub:
    """Records what would be uploaded."""

    def __init__(self, token=None):
        self.uploads: dict[str, bytes] = {}
        self.repos: list[tuple] = []
        FakeHub.last = self

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.repos.append((repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, revision=None, create_pr=False, commit_message=None):
        self.uploads = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()}
        self.commit = (repo_id, revision, create_pr, commit_message)
        return "commit-info"


def test_push_to_hub_uploads_weights_configs_and_our_card(monkeypatch):
    monkeypatch.setattr(modeling, "HfApi", FakeHub)
    model, _ = tiny_random_bark()
    assert model.push_to_hub("someone/tiny-bark", private=True, save_code=True) == "commit-info"
    hub = FakeHub.last
    assert hub.repos == [("someone/tiny-bark", True, True)]
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md",
            "modeling_bark_hf.py", "pipeline_bark_hf.py"} <= set(hub.uploads)
    card = ModelCard(hub.uploads["README.md"].decode())
    assert card.data.library_name == "bark-hf" and card.data.pipeline_tag == "text-to-audio"
    assert "someone/tiny-bark" in card.text
    assert hub.commit[0] == "someone/tiny-bark" and hub.commit[3] == "Upload BarkHfModel"
