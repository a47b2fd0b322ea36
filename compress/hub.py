"""``--push-to-hub REPO``: upload an output folder (checkpoint, exports, model card) to the Hugging Face Hub.

:func:`check_push` runs before any compute, so an offline machine or a missing token costs one line, not a run;
:func:`push` uploads once the folder is complete.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import HubError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
REACH_TIMEOUT_S = 10


def check_push(repo: str) -> None:
    """One HubError when ``repo`` is not ``owner/name``, the Hub is switched off or unreachable, or no token is set."""
    from huggingface_hub import constants, get_token

    if not REPO_ID.match(repo):
        raise HubError(f"--push-to-hub '{repo}' is not a repository id", "use owner/name, e.g. me/SmolLM2-w4")
    if constants.HF_HUB_OFFLINE:
        raise HubError("--push-to-hub while HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE, or leave --push-to-hub out")
    if get_token() is None:
        raise HubError("--push-to-hub needs a Hugging Face token", "run `hf auth login` or set HF_TOKEN")
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=REACH_TIMEOUT_S)
    except urllib.error.HTTPError:
        pass  # the Hub answered
    except OSError as e:  # URLError, timeouts, refused connections
        raise HubError(f"cannot reach {constants.ENDPOINT} ({type(e).__name__})",
                       "upload the folder later with `hf upload REPO FOLDER`, or leave --push-to-hub out") from None


def push(folder: Path, repo: str, private: bool = False) -> str:
    """Create ``repo`` (a model repository) if needed and upload ``folder``; returns the repository's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message=f"compress: {folder.name}")
    except (HfHubHTTPError, OSError) as e:
        raise HubError(f"uploading {folder} to {repo} failed ({str(e).splitlines()[0]})",
                       f"the folder is complete: retry with `hf upload {repo} {folder}`") from None
    return str(url)
