"""The loopback Hub (`tests/hub_server.py`) answers `huggingface_hub` and `transformers` the way the real Hub does.

Hub calls run in-process through `HfApi(endpoint=...)` / `hf_hub_download(endpoint=...)` with explicit tokens
(`token=False` means anonymous), so no saved token or `HF_ENDPOINT` of this process is used. `push_to_hub` reads
`HF_ENDPOINT` at import time, so that test runs in a child process with its own `HF_HOME`.
"""

import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import hub_fixtures
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


# `tests/conftest.py` registers it suite-wide; bound here too so this file runs on its own.
loopback_hub = hub_fixtures.loopback_hub


def make_folder(root: Path, files: dict) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def read_tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


FILES = {"config.json": b'{"hidden_size": 8}\n', "weights/part-0.bin": bytes(range(256)) * 40, "empty.txt": b""}


def download(hub, repo_id, filename, tmp_path, **kwargs) -> bytes:
    kwargs.setdefault("token", hub.token)
    path = hf_hub_download(repo_id, filename, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", **kwargs)
    return Path(path).read_bytes()


def test_upload_folder_then_download_round_trip(loopback_hub, tmp_path):
    hub = loopback_hub
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    repo_url = api.create_repo("tiny")
    assert repo_url.repo_id == f"{hub.user}/tiny"  # no namespace given: the token's user, as on the Hub
    assert api.create_repo(repo_url.repo_id, exist_ok=True).repo_id == repo_url.repo_id
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(repo_url.repo_id)
    assert conflict.value.response.status_code == 409

    commit = api.upload_folder(folder_path=make_folder(tmp_path / "src", FILES), repo_id=repo_url.repo_id)

    info = api.model_info(repo_url.repo_id)
    assert info.sha == commit.oid and len(commit.oid) == 40
    assert sorted(s.rfilename for s in info.siblings) == sorted([".gitattributes", *FILES])
    snapshot = Path(snapshot_download(repo_url.repo_id, endpoint=hub.endpoint, token=hub.token,
                                      cache_dir=tmp_path / "cache"))
    assert snapshot.name == commit.oid
    tree = read_tree(snapshot)
    assert {k: v for k, v in tree.items() if k != ".gitattributes"} == FILES
    assert download(hub, repo_url.repo_id, "weights/part-0.bin", tmp_path / "single") == FILES["weights/part-0.bin"]


def test_commit_on_branch_leaves_main_unchanged(loopback_hub, tmp_path):
    hub = loopback_hub
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    repo_id = api.create_repo("branchy").repo_id
    first = api.upload_folder(folder_path=make_folder(tmp_path / "v1", FILES), repo_id=repo_id)
    api.create_branch(repo_id, branch="exp/v2")
    changed = {"config.json": b'{"hidden_size": 16}\n', "new.txt": b"only on the branch"}
    second = api.upload_folder(folder_path=make_folder(tmp_path / "v2", changed), repo_id=repo_id, revision="exp/v2")
    api.delete_file("empty.txt", repo_id, revision="exp/v2")
    api.delete_folder("weights", repo_id, revision="exp/v2")

    branch_head = api.model_info(repo_id, revision="exp/v2").sha
    assert first.oid != second.oid != branch_head
    assert api.model_info(repo_id).sha == first.oid
    refs = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).branches}
    assert refs == {"main": first.oid, "exp/v2": branch_head}
    assert download(hub, repo_id, "config.json", tmp_path / "main") == FILES["config.json"]
    assert download(hub, repo_id, "config.json", tmp_path / "b", revision="exp/v2") == changed["config.json"]
    assert download(hub, repo_id, "new.txt", tmp_path / "b", revision="exp/v2") == changed["new.txt"]
    assert set(api.list_repo_files(repo_id, revision="exp/v2")) == {".gitattributes", "config.json", "new.txt"}
    assert set(api.list_repo_files(repo_id)) == {".gitattributes", *FILES}
    with pytest.raises(EntryNotFoundError):
        download(hub, repo_id, "new.txt", tmp_path / "main")
    # An older commit stays downloadable by its sha, like a pinned `revision="<sha>"` in a model card.
    assert download(hub, repo_id, "empty.txt", tmp_path / "sha", revision=second.oid) == b""
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_branch(repo_id, branch="exp/v2")
    assert conflict.value.response.status_code == 409


def test_private_repo_needs_the_token(loopback_hub, tmp_path):
    hub = loopback_hub
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    repo_id = api.create_repo("secret", private=True).repo_id
    api.upload_folder(folder_path=make_folder(tmp_path / "src", FILES), repo_id=repo_id)

    with pytest.raises(RepositoryNotFoundError):
        download(hub, repo_id, "config.json", tmp_path / "anon", token=False)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(repo_id, endpoint=hub.endpoint, token=False, cache_dir=tmp_path / "anon")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info(repo_id)
    assert api.model_info(repo_id).private is True
    assert download(hub, repo_id, "config.json", tmp_path / "authed") == FILES["config.json"]


def test_missing_repo_revision_and_file_raise_the_hub_errors(loopback_hub, tmp_path):
    hub = loopback_hub
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    repo_id = api.create_repo("tiny").repo_id

    with pytest.raises(RevisionNotFoundError, match="no-such-branch"):
        download(hub, repo_id, ".gitattributes", tmp_path, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        download(hub, repo_id, "missing.json", tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        download(hub, f"{hub.user}/no-such-repo", "config.json", tmp_path)
    assert api.file_exists(repo_id, ".gitattributes") and not api.file_exists(repo_id, "missing.json")
    assert not api.repo_exists(f"{hub.user}/no-such-repo")


def test_writes_need_a_valid_token(loopback_hub, tmp_path):
    hub = loopback_hub
    repo_id = HfApi(endpoint=hub.endpoint, token=hub.token).create_repo("tiny").repo_id
    for token in (False, "hf_wrong_token"):
        api = HfApi(endpoint=hub.endpoint, token=token)
        with pytest.raises(HfHubHTTPError) as denied:
            api.create_repo("other")
        assert denied.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as denied:
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
        assert denied.value.response.status_code == 401
    # The client never reaches the commit route without a token (preupload refuses first): post to it directly.
    header = {"key": "header", "value": {"summary": "anonymous", "description": ""}}
    request = urllib.request.Request(f"{hub.endpoint}/api/models/{repo_id}/commit/main", method="POST",
                                     data=json.dumps(header).encode(), headers={"Content-Type": "application/x-ndjson"})
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(request, timeout=10)
    assert denied.value.code == 401
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub.endpoint, token="hf_wrong_token").whoami()
    assert HfApi(endpoint=hub.endpoint, token=hub.token).whoami()["name"] == hub.user
    assert HfApi(endpoint=hub.endpoint, token=hub.token).list_repo_files(repo_id) == [".gitattributes"]


PUSH_AND_LOAD = textwrap.dedent(
    """
    import torch
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16)
    model = BertModel(config)
    commit = model.push_to_hub("tiny-bert")
    loaded = AutoModel.from_pretrained(commit.repo_url.repo_id)
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys(), expected.keys() ^ actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)
    print("PUSHED", commit.repo_url.repo_id)
    """
)


def test_transformers_push_to_hub_then_from_pretrained(loopback_hub, tmp_path):
    hub = loopback_hub
    result = subprocess.run([sys.executable, "-c", PUSH_AND_LOAD], env=hub.child_env(tmp_path / "hf_home"),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    repo_id = f"{hub.user}/tiny-bert"
    assert f"PUSHED {repo_id}" in result.stdout
    # The push landed on this hub (not a cache): the files are in the repo's main branch.
    files = HfApi(endpoint=hub.endpoint, token=hub.token).list_repo_files(repo_id)
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)

