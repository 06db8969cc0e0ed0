"""Where checkpoint files come from: a local folder as it is, or a Hugging Face Hub id, downloaded once.

`find_folder` is the one function that turns a model name into a folder: hub.py, weights.py and tokenizer.py all
call it, each naming its own error type. It decides whether a name is a Hub id, and which files a download
fetches: config, safetensors weights and tokenizer, never pickles. Imports nothing of phi3mini, so every module
can use it.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
# what the Hub accepts as "owner/name": letters, digits, "-", "_" and "." (neither part starts with "." or "-")
HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*")


class SourceError(ValueError):
    """A model name that is neither an existing folder nor a Hub id that could be fetched."""


def looks_like_path(name) -> bool:
    """Meant as a local path: starts with ".", "/" or "~", ends with a separator, or is an existing path."""
    text = str(name)
    seps = ("/", os.sep)
    return text.startswith((".", "/", "~", os.sep)) or text.endswith(seps) or Path(text).expanduser().exists()


def looks_like_hub_id(name) -> bool:
    """"owner/name" that is not meant as a path: what the Hub's ids look like ("microsoft/Phi-3-mini-4k-instruct").
    Anything starting with ".", "/" or "~", ending with a separator, with another number of slashes or with
    characters the Hub does not allow, or an existing path, is meant as a local path."""
    return not looks_like_path(name) and HUB_ID.fullmatch(str(name)) is not None


def find_folder(name, error: type[Exception] = SourceError) -> Path:
    """A local folder as is; a Hub id downloaded (HUB_FILES only) into the Hub cache, whose folder is returned
    (looked up once per process). Anything else raises `error` (the caller's own error type) with one line."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    if not looks_like_hub_id(text):
        raise error(f"no such checkpoint folder: {text}")
    try:
        return _download(text)
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise error(
            f"could not get {text!r} from the Hugging Face Hub ({type(e).__name__}: {first_sentences(e).rstrip('.')}). "
            f"Without network access, pass a local folder that holds config.json and the *.safetensors files "
            f"(for instance one made elsewhere with `{download_command(text)}`), "
            f"or --model tiny for the built-in demo model.") from None


def download_command(hub_id: str) -> str:
    """The shell command that fetches what find_folder needs into DIR, with the `hf` command-line tool that
    huggingface_hub installs (`huggingface-cli` is gone since huggingface_hub 1.0)."""
    return f"hf download {hub_id} --local-dir DIR"


def first_sentences(error: BaseException, limit: int = 400) -> str:
    """The first line of an error's text, cut (at a sentence end where there is one) only past `limit` characters,
    with "..." where it was cut, so a hint in it never stops in the middle of a word."""
    text = (str(error).strip().splitlines() or [""])[0].strip()
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    return (text[:end + 1] if end > 0 else text[:limit].rsplit(" ", 1)[0]) + " ..."


@functools.lru_cache(maxsize=8)  # a failure raises, so only found folders are kept
def _download(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(repo_id=hub_id, allow_patterns=HUB_FILES))
