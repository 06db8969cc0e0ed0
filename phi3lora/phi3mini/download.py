"""Where checkpoint files come from: a local folder as it is, or a Hugging Face Hub id, downloaded once.

The one place that decides whether a name is a Hub id (weights.py and tokenizer.py both ask here), and the files a
download fetches: config, safetensors weights and tokenizer, never pickles. Imports nothing of phi3mini, so every
module can use it.
"""
from __future__ import annotations

from pathlib import Path

HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


class SourceError(ValueError):
    """A model name that is neither an existing folder nor a Hub id that could be fetched."""


def looks_like_hub_id(name) -> bool:
    """"owner/name" that is not an existing path: what the Hub's ids look like ("microsoft/Phi-3-mini-4k-instruct").
    Anything starting with ".", "/" or "~", or with another number of slashes, is meant as a local path."""
    text = str(name)
    return (not text.startswith((".", "/", "~")) and text.count("/") == 1
            and not Path(text).expanduser().exists())


def find_folder(name) -> Path:
    """A local folder as is; a Hub id downloaded (HUB_FILES only) into the Hub cache, whose folder is returned."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    if not looks_like_hub_id(text):
        raise SourceError(f"{text}: no such checkpoint folder")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id=text, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise SourceError(
            f"could not get {text!r} from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}).\n"
            f"Without network access, pass a local folder that holds config.json and the *.safetensors files "
            f"(for instance one made elsewhere with `huggingface-cli download {text} --local-dir DIR`), "
            f"or --model tiny for the built-in demo model.") from None
