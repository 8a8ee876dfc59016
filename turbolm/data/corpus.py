"""Corpus discovery: turn paths (files, folders, JSONL) or the embedded default corpus into
a list of `Document`s.

The default corpus is found at run time on every machine, offline: the `.py` files of the
running Python's standard library (code) plus `pydoc_data.topics` (English technical prose,
one document per help topic). What is left out of the standard library, and why:

* `site-packages` / `dist-packages`: third-party code, differs per machine;
* every folder named `test`, `tests` or `idle_test`: the regression suites are huge (about
  a third of the library), repetitive, and hold deliberately malformed files;
* `__pycache__`, `lib-dynload`, `config-*`: no source there;
* `pydoc_data/topics.py`: its text is already included, topic by topic;
* files that are not valid UTF-8 (a few encodings test files on some versions).

`idlelib`, `turtledemo`, `encodings` and the rest are ordinary library code and stay in.

Document names are relative POSIX paths (`asyncio/tasks.py`, `pydoc_data/topics/if`) for
the default corpus, and the path as the user wrote it (plus the relative path inside a
folder, or `:LINE` for a JSONL record) for user corpora. The train/val split hashes these
names, so they must not depend on where a folder happens to live.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field

from turbolm.errors import DataError

# Folder names pruned from the standard-library walk (see module docstring).
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "lib-dynload", "test", "tests", "idle_test"}
)
_STDLIB_SKIP_FILES = frozenset({"pydoc_data/topics.py"})


@dataclass(frozen=True)
class Document:
    """One unit of text: the train/val split never cuts inside a document.

    `name` identifies the document (relative path, `file.jsonl:LINE`, or a source id);
    `text` is its full content, exactly as read (no newline or whitespace normalisation).
    """

    name: str
    text: str = field(repr=False)

    @functools.cached_property
    def sha256(self) -> str:
        """Hex SHA-256 of the UTF-8 encoded text (provenance in `meta.json`)."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- default corpus


def stdlib_dir() -> str:
    """The running Python's standard-library folder."""
    return sysconfig.get_paths()["stdlib"]


def default_corpus_documents() -> list[Document]:
    """The embedded default corpus: stdlib `.py` files + one document per pydoc topic.

    Sorted by name, so the order is the same on every run of the same Python. Raises
    `DataError` if neither part can be found (e.g. a zipped, source-less stdlib).
    """
    docs = _stdlib_source_documents(stdlib_dir()) + _pydoc_topic_documents()
    if not docs:
        raise DataError(
            f"the default corpus is empty: no .py files under {stdlib_dir()} and no "
            "pydoc_data.topics; pass your own text files or folders instead"
        )
    return sorted(docs, key=lambda d: d.name)


def _stdlib_source_documents(root: str) -> list[Document]:
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk does not descend; sort for a deterministic walk.
        dirnames[:] = sorted(
            d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith((".", "config-"))
        )
        for fname in sorted(filenames):
            if not fname.endswith(".py"):
                continue
            path = os.path.join(dirpath, fname)
            name = os.path.relpath(path, root).replace(os.sep, "/")
            if name in _STDLIB_SKIP_FILES:
                continue
            text = _read_text_or_none(path)
            if text:  # skips undecodable and empty files (many empty __init__.py)
                docs.append(Document(name, text))
    return docs


def _pydoc_topic_documents() -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    return [
        Document(f"pydoc_data/topics/{key}", text)
        for key, text in sorted(topics.items())
        if isinstance(text, str) and text
    ]


# --------------------------------------------------------------------------- user corpora


def collect_documents(
    paths: list[str], include: list[str] | None = None, jsonl_field: str = "text"
) -> list[Document]:
    """Read documents from files and folders, in the order given.

    * a file of any extension is one document (it must be non-empty UTF-8 text);
    * a `.jsonl` file gives one document per non-blank line, taking the string
      `record[jsonl_field]`, named `path:LINE` (1-based); records whose text is empty
      are skipped;
    * a folder is walked recursively in sorted order, skipping hidden files and folders;
      with `include` (glob patterns such as `*.py`, matched against the file name and
      against its path relative to the folder) only matching files are read, otherwise
      every file that decodes as UTF-8 text. Inside a folder, empty and non-text files
      are skipped silently; `.jsonl` files are read as records.

    A file reached twice (listed twice, or a file and its folder) is read once.
    Raises `DataError` for a missing path, an empty file, a folder with no usable file,
    an explicitly listed file that is not UTF-8, and bad JSONL records (with `file:line`).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no input paths given")
    docs: list[Document] = []
    seen: set[str] = set()  # real paths already read
    for p in paths:
        p = os.fspath(p)
        if not os.path.exists(p):
            raise DataError(f"input path does not exist: {p}")
        if os.path.isdir(p):
            found = _collect_folder(p, include, jsonl_field, seen)
            if not found:
                what = f"matching {include}" if include else "with UTF-8 text"
                raise DataError(f"input folder has no non-empty files {what}: {p}")
            docs.extend(found)
        else:
            real = os.path.realpath(p)
            if real in seen:
                continue
            seen.add(real)
            docs.extend(_collect_file(p, _display_name(p), jsonl_field))
    return docs


def _display_name(path: str) -> str:
    return os.path.normpath(path).replace(os.sep, "/")


def _collect_file(path: str, name: str, jsonl_field: str) -> list[Document]:
    """An explicitly named file: errors are reported, not skipped."""
    raw = _read_bytes(path)
    if not raw.strip():
        raise DataError(f"input file is empty: {path}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"input file is not UTF-8 text: {path} (bad byte at offset {e.start})"
        ) from None
    if path.endswith(".jsonl"):
        docs = _parse_jsonl(text, path, name, jsonl_field)
        if not docs:
            raise DataError(f"input file has no non-empty '{jsonl_field}' records: {path}")
        return docs
    return [Document(name, text)]


def _collect_folder(
    root: str, include: list[str] | None, jsonl_field: str, seen: set[str]
) -> list[Document]:
    docs = []
    base = _display_name(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            path = os.path.join(dirpath, fname)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if include and not any(
                fnmatch.fnmatch(fname, pat) or fnmatch.fnmatch(rel, pat) for pat in include
            ):
                continue
            real = os.path.realpath(path)
            if real in seen or not os.path.isfile(path):
                continue
            seen.add(real)
            name = f"{base}/{rel}"
            if fname.endswith(".jsonl"):
                text = _read_text_or_none(path)
                if text:  # bad records inside a .jsonl are errors even here
                    docs.extend(_parse_jsonl(text, path, name, jsonl_field))
                continue
            text = _read_text_or_none(path)
            if text and text.strip():
                docs.append(Document(name, text))
    return docs


def _parse_jsonl(text: str, path: str, name: str, jsonl_field: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or jsonl_field not in record:
            raise DataError(f"{path}:{lineno}: record has no field '{jsonl_field}'")
        value = record[jsonl_field]
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{lineno}: field '{jsonl_field}' must be a string, "
                f"got {type(value).__name__}"
            )
        if value:
            docs.append(Document(f"{name}:{lineno}", value))
    return docs


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read input file {path}: {e.strerror}") from None


def _read_text_or_none(path: str) -> str | None:
    """UTF-8 text of `path`, or None for unreadable, binary (NUL bytes) or non-UTF-8 files."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
