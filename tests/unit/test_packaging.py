"""Packaging an app's source (what goes in, what never does, same source → same digest) and
unpacking it safely, with a set of malicious archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import tarfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.errors import InvalidPackage, PayloadTooLarge
from kiln.functions.package import MAX_FILE_BYTES, package, unpack

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

APP = """
import kiln

app = kiln.App("hello")

@app.function
def shout(text: str) -> str:
    return text.upper()
"""


pytestmark = pytest.mark.usefixtures("isolated_imports")


def write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_packages_the_hello_example(tmp_path: Path) -> None:
    built = package(EXAMPLES / "hello.py")
    assert built.files == ("hello.py",)
    assert built.entrypoint == "hello.py"
    assert built.digest == hashlib.sha256(built.archive).hexdigest()
    assert built.size == len(built.archive)
    assert [spec.name for spec in built.app.spec()] == ["shout", "Greeter"]
    assert unpack(built.archive, tmp_path / "code", digest=built.digest) == ["hello.py"]
    assert (tmp_path / "code" / "hello.py").read_bytes() == (EXAMPLES / "hello.py").read_bytes()


@pytest.mark.parametrize(
    ("example", "entries"),
    [
        ("streaming.py", {"tokens": ["tokens"], "countdown": ["countdown"]}),
        ("voice_agent.py", {"Agent": ["talk"]}),
    ],
)
def test_the_other_examples_package_with_their_entry_points(
    example: str, entries: dict[str, list[str]]
) -> None:
    built = package(EXAMPLES / example)
    assert built.files == (example,)
    assert {spec.name: list(spec.entries) for spec in built.app.spec()} == entries


def test_archive_entries_carry_no_time_owner_or_odd_mode(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", APP)
    write(tmp_path / "tool" / "__init__.py")
    write(tmp_path / "tool" / "run.sh", "echo hi\n").chmod(0o775)
    app.write_text(APP + "import tool\n")
    app.chmod(0o600)
    built = package(app)
    with gzip.GzipFile(fileobj=io.BytesIO(built.archive)) as gz:
        gz.read()
        assert gz.mtime == 0
    with tarfile.open(fileobj=io.BytesIO(built.archive), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members) == ["app.py", "tool/__init__.py", "tool/run.sh"]
    for member in members.values():
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (
            0,
            0,
            0,
            "",
            "",
        )
    assert {name: m.mode for name, m in members.items()} == {
        "app.py": 0o644,
        "tool/__init__.py": 0o644,
        "tool/run.sh": 0o755,
    }
    unpack(built.archive, tmp_path / "out")
    assert (tmp_path / "out" / "tool" / "run.sh").stat().st_mode & 0o777 == 0o755


def test_same_source_same_digest(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", APP + "import helpers\n")
    helpers = write(tmp_path / "helpers.py", "X = 1\n")
    first = package(app)
    assert package(app).digest == first.digest
    os.utime(helpers, (1_000_000, 1_000_000))
    os.utime(app, (2_000_000, 2_000_000))
    assert package(app).digest == first.digest
    helpers.write_text("X = 2\n")
    changed = package(app)
    assert changed.digest != first.digest
    assert changed.files == first.files == ("app.py", "helpers.py")


def test_local_packages_go_in_whole_and_nothing_else_does(tmp_path: Path) -> None:
    files = {
        # the user's source
        "app.py": APP
        + textwrap.dedent(
            """
            import os, sys
            here = os.path.dirname(__file__)
            sys.path.append(os.path.join(here, "env", "lib"))
            sys.path.append(os.path.join(here, "vendor", "site-packages"))
            import helpers, lib.core, thirdparty, vendored
            """
        ),
        "helpers.py": "",
        "lib/__init__.py": "",
        "lib/core.py": "",
        "lib/unused.py": "",
        "lib/prompts/system.txt": "You are helpful.",
        "lib/templates/page.html": "<p></p>",
        # never packaged
        "notes.txt": "not imported, not in a package",
        "other.py": "",
        ".env": "TOKEN=1",
        "lib/.env": "TOKEN=1",
        "lib/.env.production": "TOKEN=1",
        "lib/server.pem": "",
        "lib/tls.key": "",
        "lib/id_rsa": "",
        "lib/id_ed25519.pub": "",
        "lib/cert.p12": "",
        "lib/.netrc": "",
        "lib/credentials.json": "{}",
        "lib/.hidden": "",
        "lib/.cache/blob": "",
        "lib/__pycache__/core.cpython-311.pyc": "",
        "lib/stale.pyc": "",
        "lib/.git/config": "",
        "lib/node_modules/left-pad/index.js": "",
        "lib/venv/pyvenv.cfg": "",
        "lib/venv/lib/x.py": "",
        "env/pyvenv.cfg": "",
        "env/lib/thirdparty.py": "",
        "vendor/site-packages/vendored.py": "",
    }
    for name, text in files.items():
        write(tmp_path / name, text)
    built = package(tmp_path / "app.py")
    assert built.files == (
        "app.py",
        "helpers.py",
        "lib/__init__.py",
        "lib/core.py",
        "lib/prompts/system.txt",
        "lib/templates/page.html",
        "lib/unused.py",
    )


def test_links_out_of_the_source_tree_stay_out(tmp_path: Path) -> None:
    outside = write(tmp_path / "home" / ".ssh" / "config", "Host *")
    root = tmp_path / "project"
    app = write(root / "app.py", APP + "import lib\n")
    write(root / "lib" / "__init__.py")
    write(root / "lib" / "data.txt", "data")
    (root / "lib" / "ssh_config").symlink_to(outside)
    (root / "lib" / "data_link.txt").symlink_to(root / "lib" / "data.txt")
    (root / "lib" / "home").symlink_to(tmp_path / "home", target_is_directory=True)
    assert package(app).files == (
        "app.py",
        "lib/__init__.py",
        "lib/data.txt",
        "lib/data_link.txt",
    )


def test_a_file_over_the_limit(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", APP + "import lib\n")
    write(tmp_path / "lib" / "__init__.py")
    with (tmp_path / "lib" / "weights.bin").open("wb") as sparse:
        sparse.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(PayloadTooLarge) as caught:
        package(app)
    assert caught.value.message == (
        "lib/weights.bin is 50.0 MiB, over the limit of 50.0 MiB for one source file; keep model "
        "weights and data sets out of the app's folder and load them in a "
        "@kiln.enter(snap=True) method instead."
    )


def test_a_package_over_the_limit(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", APP + "import lib\n")
    write(tmp_path / "lib" / "__init__.py")
    (tmp_path / "lib" / "noise.bin").write_bytes(os.urandom(300_000))
    with pytest.raises(PayloadTooLarge) as caught:
        package(app, max_bytes=200_000)
    assert re.fullmatch(
        rf"the package of {re.escape(str(app))} is 0\.3 MiB, over the limit of 0\.2 MiB; its "
        r"largest files are lib/noise\.bin \(0\.3 MiB\), app\.py \(0\.0 MiB\), "
        r"lib/__init__\.py \(0\.0 MiB\)\.",
        caught.value.message,
    )


# unpack: attack files ----------------------------------------------------------------------------


def tar_of(*adds: Callable[[tarfile.TarFile], None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for add in adds:
            add(tar)
    return buffer.getvalue()


def file(name: str, data: bytes = b"x") -> Callable[[tarfile.TarFile], None]:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    return add


def special(name: str, kind: bytes, linkname: str = "") -> Callable[[tarfile.TarFile], None]:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        tar.addfile(info)

    return add


def test_unpack_writes_files_and_folders(tmp_path: Path) -> None:
    archive = tar_of(special("pkg", tarfile.DIRTYPE), file("./pkg/a.py", b"A = 1\n"), file("b.py"))
    assert unpack(archive, tmp_path / "out") == ["pkg/a.py", "b.py"]
    assert (tmp_path / "out" / "pkg" / "a.py").read_bytes() == b"A = 1\n"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [file("/etc/evil")],
            "the package entry '/etc/evil' is refused: absolute paths are not allowed.",
        ),
        (
            [file("../evil")],
            "the package entry '../evil' is refused: '..' is not allowed in paths.",
        ),
        (
            [file("pkg/../../evil")],
            "the package entry 'pkg/../../evil' is refused: '..' is not allowed in paths.",
        ),
        (
            [special("link", tarfile.SYMTYPE, "/etc/passwd")],
            "the package entry 'link' is refused: links are not allowed.",
        ),
        (
            [file("a.py"), special("hard", tarfile.LNKTYPE, "a.py")],
            "the package entry 'hard' is refused: links are not allowed.",
        ),
        (
            [special("null", tarfile.CHRTYPE)],
            "the package entry 'null' is refused: only regular files and folders are allowed.",
        ),
        (
            [special("disk", tarfile.BLKTYPE)],
            "the package entry 'disk' is refused: only regular files and folders are allowed.",
        ),
        (
            [special("pipe", tarfile.FIFOTYPE)],
            "the package entry 'pipe' is refused: only regular files and folders are allowed.",
        ),
        (
            [file("a.py"), file("./a.py")],
            "the package entry './a.py' is refused: it appears twice.",
        ),
        (
            [file("a.py\\..\\evil")],
            "the package entry 'a.py\\\\..\\\\evil' is refused: the path is empty or has "
            "backslashes or NUL characters.",
        ),
        (
            [file("lib/x.py"), file("lib")],
            "the package entry 'lib' is refused: it is a file, but other entries use it as a "
            "folder.",
        ),
    ],
)
def test_unpack_refuses_attack_entries(
    tmp_path: Path, entries: list[Callable[[tarfile.TarFile], None]], message: str
) -> None:
    dest = tmp_path / "out"
    # A harmless first entry: it must not be written either, since checks come first.
    archive = tar_of(file("first.py"), *entries)
    with pytest.raises(InvalidPackage, match=f"^{re.escape(message)}$"):
        unpack(archive, dest)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unpack_refuses_what_is_not_a_tar_gz(tmp_path: Path) -> None:
    for archive in (b"", b"not gzip at all", gzip.compress(b"gzip, but no tar inside" * 40)):
        with pytest.raises(InvalidPackage, match=r"^the package is not a valid tar\.gz archive: "):
            unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unpack_refuses_a_truncated_archive(tmp_path: Path) -> None:
    archive = tar_of(file("big.bin", os.urandom(100_000)))
    with pytest.raises(InvalidPackage, match=r"^the package is not a valid tar\.gz archive: "):
        unpack(archive[: len(archive) // 2], tmp_path / "out")


def test_unpack_checks_the_digest(tmp_path: Path) -> None:
    archive = tar_of(file("a.py"))
    actual = hashlib.sha256(archive).hexdigest()
    with pytest.raises(InvalidPackage) as caught:
        unpack(archive, tmp_path / "out", digest="0" * 64)
    assert caught.value.message == (
        f"the package's sha256 is {actual}, expected {'0' * 64}; it was damaged or replaced in "
        "transit."
    )


def test_unpack_refuses_a_bomb(tmp_path: Path) -> None:
    archive = tar_of(file("zeros.bin", bytes(2 * 1024 * 1024)))
    assert len(archive) < 10_000
    with pytest.raises(InvalidPackage) as caught:
        unpack(archive, tmp_path / "out", max_bytes=1024 * 1024)
    assert caught.value.message == (
        "the package unpacks to more than 1.0 MiB, the limit for app source."
    )
    assert not (tmp_path / "out").exists()
