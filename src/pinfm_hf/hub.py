"""
Share run outputs on a model hub and read them back by repo id, with the standard `huggingface_hub` API.

The token comes from where `huggingface_hub` always looks (`HF_TOKEN`, the cached `hf auth login`); this module never
reads, logs or writes it. `HF_ENDPOINT` points everything at another hub (tests use a loopback one).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HFValidationError, HfHubHTTPError
from huggingface_hub.utils import validate_repo_id
from transformers.utils import cached_file


# Never pushed: resumable training state, half-written temp files and editor backups (they stay with the run).
IGNORED_PREFIXES = ("checkpoints", ".tmp-")


@dataclass
class HubArguments:
    """Recipe flags for pushing the saved folder (model or adapter) to a hub repo at the end of a run."""

    push_to_hub: bool = field(default=False, metadata={"help": "Push the saved model/adapter folder to --hub_model_id."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Repo to push to, e.g. 'org/pinfm-ml1m'."})
    hub_revision: Optional[str] = field(
        default=None, metadata={"help": "Branch to push to (created from main if missing); default: main."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the repo as private (if it does not exist)."})

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. 'org/pinfm-ml1m').")
        if self.hub_model_id is not None:
            if self.hub_model_id.count("/") != 1:
                raise ValueError(f"--hub_model_id must look like 'namespace/name', got {self.hub_model_id!r}.")
            try:
                validate_repo_id(self.hub_model_id)
            except HFValidationError as e:
                raise ValueError(f"--hub_model_id {self.hub_model_id!r} is not a valid repo id: {e}") from None

    def check_access(self) -> None:
        """
        With `--push_to_hub`, check at start-up, before any data is read, that there is a token and that the hub
        accepts it for writing (`whoami`), so a run does not train for hours to fail at the push.
        """
        if not self.push_to_hub:
            return
        token = get_token()
        if token is None:
            raise PermissionError(
                "--push_to_hub needs a hub token with write access: set HF_TOKEN or log in with `hf auth login`."
            )
        try:
            who = HfApi().whoami(token=token)
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            raise PermissionError(
                f"The hub rejected the token (HTTP {status}) while checking --push_to_hub: set a valid write token in "
                "HF_TOKEN or log in with `hf auth login`."
            ) from e
        role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise PermissionError("The hub token is read-only: --push_to_hub needs a token with write access.")

    def push(self, folder: Union[str, Path], run_files: Sequence[Optional[Union[str, Path]]]) -> str:
        """Push `folder` to `hub_model_id` with these flags, plus the run's files (metrics, log, plot) under training/."""
        extra = {f"training/{Path(p).name}": p for p in run_files if p}
        return push_folder(folder, self.hub_model_id, revision=self.hub_revision, private=self.hub_private, extra_files=extra)


def is_local_folder(path_or_repo_id: Union[str, Path]) -> bool:
    return Path(path_or_repo_id).is_dir()


def looks_like_repo_id(name: str) -> bool:
    """`namespace/name` and valid as a hub repo id (not a path such as `./x`, `/x` or `a/b/c`)."""
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_model_reference(path_or_repo_id: Union[str, Path], *, flag: str) -> None:
    """
    Refuse, before any data is read, a model flag (`--base`, `--model`, `--adapter`) that is neither a saved folder
    nor a hub repo id, naming the flag: otherwise the failure comes from the loader, minutes later.
    """
    name = str(path_or_repo_id)
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{flag} {name!r} is a folder without config.json: not a saved model or adapter.")
        return
    if path.exists():
        raise FileNotFoundError(f"{flag} {name!r} is a file: give the saved model's folder or a hub repo id.")
    if not looks_like_repo_id(name):
        raise FileNotFoundError(f"{flag} {name!r}: no such folder, and not a hub repo id ('namespace/name').")


def _files_to_push(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(IGNORED_PREFIXES) or part.endswith("~") for part in p.relative_to(folder).parts)
    )


def push_folder(
    folder: Union[str, Path],
    repo_id: str,
    *,
    revision: Optional[str] = None,
    private: bool = False,
    extra_files: Optional[dict[str, Union[str, Path]]] = None,
    commit_message: str = "Upload with pinfm-hf",
) -> str:
    """
    Push everything in `folder` (weights, config with `auto_map`, the model code, tokenizer files, card) plus
    `extra_files` (`{path_in_repo: local_path}`, e.g. training metrics) to `repo_id` in one commit, creating the repo
    and the branch `revision` when missing. Returns the commit URL.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Nothing to push: {folder} is not a folder.")
    operations = [CommitOperationAdd(str(p.relative_to(folder)), str(p)) for p in _files_to_push(folder)]
    for path_in_repo, local in (extra_files or {}).items():
        if not Path(local).is_file():
            raise FileNotFoundError(f"Cannot push {path_in_repo}: {local} does not exist.")
        operations.append(CommitOperationAdd(path_in_repo, str(local)))
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise PermissionError(
                f"The hub refused the push to {repo_id!r} (HTTP {status}): set a write token in HF_TOKEN or log in "
                "with `hf auth login`, and check that you may write to that namespace."
            ) from e
        raise
    return commit.commit_url


def cached_file_from(path_or_repo_id: Union[str, Path], filename: str, revision: Optional[str] = None) -> Path:
    """
    Local path of `filename` from a folder or a hub repo (downloaded at `revision` into the hub cache), with an
    error that names the repo, revision and file when it is not there.
    """
    name = str(path_or_repo_id)
    if not is_local_folder(name) and not looks_like_repo_id(name):
        raise FileNotFoundError(f"Cannot read {filename!r}: {name!r} is neither a folder nor a hub repo id ('namespace/name').")
    try:
        path = cached_file(name, filename, revision=revision, _raise_exceptions_for_missing_entries=False)
    except OSError as e:
        raise OSError(f"Cannot read {filename!r} from {path_or_repo_id!r} (revision {revision or 'main'}): {e}") from e
    if path is None:
        where = "folder" if is_local_folder(path_or_repo_id) else f"repo (revision {revision or 'main'})"
        raise FileNotFoundError(f"{path_or_repo_id!r} has no {filename!r}: is this {where} the right one?")
    return Path(path)


__all__ = ["HubArguments", "cached_file_from", "check_model_reference", "is_local_folder", "looks_like_repo_id", "push_folder"]
