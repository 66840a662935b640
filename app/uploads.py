"""Uploads, stored safely, and the server paths a browser may name.

An upload goes to its own folder inside --uploads-dir (one per browser session).
A data file is copied in under its own name, reduced to safe characters (so
messages name the file as the user did); an image archive likewise, and it is
only kept if it passes
`l2t.images.check_archive` (no absolute paths, no `..`, no symlinks) and the
UI's own, tighter caps on member count and uncompressed size (zip bombs).
Archives are never extracted: `l2t.images.ImageSource` reads members in place
and checks each image's pixel count before decoding it. Nothing is written
outside the session folder, whatever the uploaded file is called.

Paths on the server are read only inside the allowed roots (the working folder
and each --data-root), after symlinks are resolved.
"""

from __future__ import annotations

import re
import shutil
import time
import zipfile
from pathlib import Path

from l2t.images import ImageError, check_archive

# Caps for archives uploaded through the browser. The library's own limits are
# sized for datasets on a server's disk; a web upload gets smaller ones.
MAX_UPLOAD_BYTES = 4 * 1024**3
MAX_ARCHIVE_MEMBERS = 200_000
MAX_UNCOMPRESSED_BYTES = 16 * 1024**3
MAX_MEMBER_BYTES = 256 * 1024**2
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")


class UploadError(ImageError):
    """An upload refused; `code` names why, str() says it for the page."""


def session_folder(uploads_dir: Path, session_hash: str | None) -> Path:
    """uploads_dir/<session>/<time>: a fresh folder for one upload of one browser session."""
    session = re.sub(r"[^A-Za-z0-9]", "", session_hash or "")[:40] or "anonymous"
    folder = Path(uploads_dir) / session / time.strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = folder.with_name(f"{folder.name.split('.')[0]}.{suffix}")
    folder.mkdir(parents=True)
    return folder


def store_upload(uploads_dir: Path, session_hash: str | None, data_file: str, images_zip: str | None) -> tuple[Path, Path | None]:
    """Check and store one upload (a data file and maybe an image .zip); nothing is kept if either is refused."""
    folder = session_folder(uploads_dir, session_hash)
    try:
        images = store_archive(images_zip, folder) if images_zip else None
        return store_data_file(data_file, folder), images
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def store_data_file(source: str | Path, folder: Path, max_bytes: int = MAX_UPLOAD_BYTES) -> Path:
    """Copy an uploaded JSON/JSONL/parquet/arrow data file into `folder`; returns the stored path."""
    source = Path(source)
    suffix = source.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise UploadError("upload_wrong_type", f"'{source.name}' is not a .json, .jsonl, .parquet or .arrow data file")
    _check_size(source, max_bytes)
    target = folder / stored_name(source.name, "data" + suffix)
    shutil.copyfile(source, target)
    return target


def store_archive(
    source: str | Path,
    folder: Path,
    max_bytes: int = MAX_UPLOAD_BYTES,
    max_members: int = MAX_ARCHIVE_MEMBERS,
    max_uncompressed: int = MAX_UNCOMPRESSED_BYTES,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Path:
    """Check an uploaded image .zip and copy it into `folder`; UploadError if refused."""
    source = Path(source)
    name = source.name
    _check_size(source, max_bytes)
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UploadError("archive_corrupt", f"'{name}' is not a readable .zip archive ({exc})") from None
    with archive:
        check_archive(archive, name)  # zip-slip: absolute paths, '..', symlinks
        infos = archive.infolist()
        if len(infos) > max_members:
            raise UploadError("archive_too_large", f"'{name}' has {len(infos):,} members, more than the limit of {max_members:,}")
        total = sum(info.file_size for info in infos)
        if total > max_uncompressed:
            raise UploadError(
                "archive_too_large",
                f"'{name}' would unpack to {total / 1024**3:.1f} GiB, more than the limit of {max_uncompressed / 1024**3:.0f} GiB",
            )
        largest = max(infos, key=lambda info: info.file_size, default=None)
        if largest is not None and largest.file_size > max_member_bytes:
            raise UploadError(
                "archive_too_large",
                f"'{name}': member '{largest.filename}' would unpack to {largest.file_size / 1024**2:,.0f} MiB, "
                f"more than the limit of {max_member_bytes / 1024**2:,.0f} MiB for one image",
            )
    target = folder / stored_name(name, "images.zip")
    if not target.name.lower().endswith(".zip"):
        target = target.with_name(target.name + ".zip")
    shutil.copyfile(source, target)
    return target


def stored_name(name: str, fallback: str) -> str:
    """An uploaded file's name with only safe characters (never a path, never hidden)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).name).lstrip(".")
    return safe or fallback


def allowed_server_path(text: str, roots: list[Path]) -> Path:
    """The path `text` names on the server, symlinks resolved, if it lies inside one of `roots`; UploadError otherwise."""
    path = Path(text).expanduser().resolve()
    if not any(path.is_relative_to(root.resolve()) for root in roots):
        shown = ", ".join(str(root) for root in roots)
        raise UploadError(
            "path_not_allowed",
            f"'{text}' is outside the folders this server reads data from ({shown}); start the app with --data-root FOLDER to allow another",
        )
    return path


def _check_size(source: Path, max_bytes: int) -> None:
    try:
        size = source.stat().st_size
    except OSError as exc:
        raise UploadError("upload_unreadable", f"the upload '{source.name}' can't be read ({exc.strerror})") from None
    if size > max_bytes:
        raise UploadError(
            "upload_too_large", f"'{source.name}' is {size / 1024**3:.1f} GiB, more than the limit of {max_bytes / 1024**3:.0f} GiB"
        )
