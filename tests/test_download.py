"""Downloads and archive unpacking, against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from ilora_cli.data.download import fetch, safe_extract
from ilora_cli.data.prepare import PrepareConfig, prepare
from ilora_cli.data.prepared import PreparedDataset
from ilora_cli.errors import UserError

N_ITEMS = 25


def ml100k_zip() -> bytes:
    """A tiny ml-100k archive laid out like the official one (files under ``ml-100k/``)."""
    ratings = []
    for user in range(1, 11):
        for k in range(6):
            ratings.append(f"{user}\t{(user * 3 + k * 5) % N_ITEMS + 1}\t4\t{880000000 + k}\n")
    items = [
        f"{i}|Movie {i} (19{50 + i})|01-Jan-19{50 + i}||http://x|" + "|".join("0" * 19) + "\n"
        for i in range(1, N_ITEMS + 1)
    ]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ml-100k/", "")
        zf.writestr("ml-100k/u.data", "".join(ratings))
        zf.writestr("ml-100k/u.item", "".join(items))
        zf.writestr("ml-100k/README", "tiny")
    return buf.getvalue()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """Serve ``tmp_path/www`` on 127.0.0.1; yields (directory, base url)."""
    www = tmp_path / "www"
    www.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def config(url: str, **kwargs) -> PrepareConfig:
    return PrepareConfig(dataset="ml", format="ml-100k", download=True, url=url, candidates=5, draws=1, **kwargs)


def test_download_unpack_and_prepare(server, ilora_home):
    www, base = server
    archive = ml100k_zip()
    (www / "ml-100k.zip").write_bytes(archive)
    digest = hashlib.sha256(archive).hexdigest()

    meta = prepare(config(f"{base}/ml-100k.zip", sha256=digest.upper()))
    ds = PreparedDataset.open("ml")
    assert ds.n_items == N_ITEMS and meta["n_users"] == 10
    assert ds.meta["source"]["archive_sha256"] == digest
    assert ds.meta["source"]["url"] == f"{base}/ml-100k.zip"
    assert (ilora_home / "cache" / "downloads" / "ml-100k" / "ml-100k.zip").is_file()

    # A second prepare reuses the cached archive: the server no longer has it.
    (www / "ml-100k.zip").unlink()
    again = prepare(config(f"{base}/ml-100k.zip", overwrite=True))
    assert again["checksum"] == meta["checksum"]


def test_wrong_checksum_is_refused_and_deleted(server, tmp_path):
    www, base = server
    (www / "ml-100k.zip").write_bytes(ml100k_zip())
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="not the expected"):
        fetch(f"{base}/ml-100k.zip", cache, expected_sha256="0" * 64, progress=False)
    assert list(cache.iterdir()) == []
    with pytest.raises(UserError, match="not a sha256"):
        fetch(f"{base}/ml-100k.zip", cache, expected_sha256="abc", progress=False)


def test_missing_file_and_unreachable_server(server, tmp_path):
    _, base = server
    with pytest.raises(UserError, match="HTTP 404"):
        fetch(f"{base}/nothing.zip", tmp_path / "cache", progress=False)
    with pytest.raises(UserError, match="only http, https and file"):
        fetch("ftp://example.org/x.zip", tmp_path / "cache", progress=False)


def test_corrupt_archive_is_refused(server, ilora_home):
    www, base = server
    (www / "corrupt.zip").write_bytes(b"PK\x03\x04" + b"\x00garbage" * 50)
    with pytest.raises(UserError, match="not a readable zip archive"):
        prepare(config(f"{base}/corrupt.zip"))
    truncated = ml100k_zip()[:-30]  # the central directory is cut off
    (www / "truncated.zip").write_bytes(truncated)
    with pytest.raises(UserError, match="not a readable zip archive"):
        prepare(config(f"{base}/truncated.zip"))
    assert not (ilora_home / "datasets" / "ml").exists()


def test_traversal_member_is_refused(server, tmp_path, ilora_home):
    www, base = server
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-100k/u.data", "1\t1\t4\t1\n")
        zf.writestr("../evil", "owned")
    (www / "evil.zip").write_bytes(buf.getvalue())
    with pytest.raises(UserError, match="unsafe member '../evil'"):
        prepare(config(f"{base}/evil.zip"))
    downloads = ilora_home / "cache" / "downloads" / "ml-100k"
    assert not (downloads / "evil").exists() and not (downloads.parent / "evil").exists()
    assert not (downloads / "unpacked").exists() or not any((downloads / "unpacked").iterdir())

    archive = tmp_path / "evil.zip"
    archive.write_bytes(buf.getvalue())
    target = tmp_path / "deep" / "target"
    with pytest.raises(UserError, match="unsafe member"):
        safe_extract(archive, target)
    assert not (target.parent / "evil").exists()
    assert not any(target.rglob("*"))  # members are checked before anything is written


def _tar(tmp_path: Path, name: str, add) -> Path:
    path = tmp_path / name
    with tarfile.open(path, "w:gz") as tf:
        add(tf)
    return path


def _file(tf: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_tar_archives(tmp_path):
    good = _tar(tmp_path, "good.tar.gz", lambda tf: _file(tf, "dir/u.data", b"1\t1\t4\t1\n"))
    safe_extract(good, tmp_path / "out")
    assert (tmp_path / "out" / "dir" / "u.data").read_bytes() == b"1\t1\t4\t1\n"

    absolute = _tar(tmp_path, "abs.tar.gz", lambda tf: _file(tf, "/tmp/evil"))
    with pytest.raises(UserError, match="unsafe member"):
        safe_extract(absolute, tmp_path / "abs")

    def add_link(tf):
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)

    with pytest.raises(UserError, match="a link or device"):
        safe_extract(_tar(tmp_path, "link.tar.gz", add_link), tmp_path / "link")
    assert not (tmp_path / "link" / "link").exists()

    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(good.read_bytes()[:20])
    with pytest.raises(UserError, match="not a readable tar archive"):
        safe_extract(broken, tmp_path / "broken")


def test_zip_symlink_is_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16  # a symbolic link
        zf.writestr(info, "/etc/passwd")
    archive = tmp_path / "link.zip"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(UserError, match="a link or device"):
        safe_extract(archive, tmp_path / "out")
