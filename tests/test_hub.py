"""--push-to-hub: refused in one line before any compute when the Hub cannot be used; the finished folder is what
gets uploaded (the Hub itself is out of reach here: the upload is recorded by a stand-in for HfApi)."""

import pytest
from conftest import cli

RECIPE = ("name: h\nevaluate: {seq_len: 128, max_windows: 1}\n"
          "passes:\n  - {type: rtn, bits: 4, targets: ['model.layers.0.*']}\n")


@pytest.mark.parametrize("repo, env, expect", [
    ("not a repo", {}, "not a repository id"),
    ("me/model", {"offline": True}, "HF_HUB_OFFLINE"),
    ("me/model", {"token": None}, "token"),
])
def test_push_is_refused_before_any_compute(write_recipe, tmp_path, monkeypatch, repo, env, expect):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", env.get("offline", False))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: env.get("token", "hf_x"))
    out = tmp_path / "out"
    result = cli("run", write_recipe(RECIPE), "smollm2-135m", "--out", out, "--push-to-hub", repo, "--quiet")
    assert result.exit_code == 5 and expect in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_unreachable_hub_is_refused_before_any_compute(write_recipe, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    out = tmp_path / "out"
    result = cli("run", write_recipe(RECIPE), "smollm2-135m", "--out", out, "--push-to-hub", "me/m", "--quiet")
    assert result.exit_code == 5 and "cannot reach" in result.output and not out.exists(), result.output


def test_the_finished_folder_is_uploaded(write_recipe, tmp_path, monkeypatch):
    import huggingface_hub

    from compress import hub

    calls = []

    class RecordingApi:
        def create_repo(self, repo, **kw):
            calls.append(("create", repo, kw["private"]))
            return f"https://huggingface.co/{repo}"

        def upload_folder(self, folder_path, repo_id, **kw):
            from pathlib import Path

            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(hub, "check_push", lambda repo: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    out = tmp_path / "out"
    result = cli("run", write_recipe(RECIPE), "smollm2-135m", "--out", out, "--push-to-hub", "me/m", "--private",
                 "--quiet")
    assert result.exit_code == 0, result.output
    assert calls[0] == ("create", "me/m", True)
    assert calls[1][:2] == ("upload", "me/m") and {"README.md", "report.json", "config.json"} <= set(calls[1][2])
