"""Images referenced by training data: from a folder or a .zip, read safely.

Paths in data files are relative to an image root. A path that is absolute or
climbs out of the root (`../../etc/passwd`) is refused, and so is an archive
with such members, symlinks, or a suspicious total size (a zip bomb). Archives
are read in place: nothing is extracted to disk. Images are checked against a
pixel limit before they are decoded, and converted to RGB (grayscale, CMYK,
palette and RGBA images all work; 16-bit grayscale is scaled to 8 bits).
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from l2t.errors import L2TError

MAX_ARCHIVE_MEMBERS = 2_000_000
DEFAULT_MAX_PIXELS = 50_000_000
MAX_ARCHIVE_BYTES = 64 * 1024**3
# An image file is read into memory whole before its header is checked, so its
# size is capped first: a zip member can declare gigabytes under the archive limit.
# 1 GiB is over twice an uncompressed 16-bit RGBA TIFF at the default 50 Mpx limit.
MAX_IMAGE_BYTES = 1024**3


class ImageError(L2TError):
    """An image that can't be used; `code` is a reason code, str() a sentence."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def safe_relative(path: str) -> PurePosixPath:
    """The path as a clean relative POSIX path, or ImageError if it could escape the root."""
    if not isinstance(path, str) or not path.strip():
        raise ImageError("image_path_unsafe", f"image path must be a non-empty string, got {path!r}")
    p = path.replace("\\", "/")
    pure = PurePosixPath(p)
    if pure.is_absolute() or (len(p) > 1 and p[1] == ":"):
        raise ImageError("image_path_unsafe", f"image path '{path}' is absolute; paths must be relative to the image folder")
    if any(part == ".." for part in pure.parts):
        raise ImageError("image_path_unsafe", f"image path '{path}' leaves the image folder ('..')")
    return PurePosixPath(*[part for part in pure.parts if part not in ("", ".")])


def check_archive(archive: zipfile.ZipFile, name: str) -> None:
    """Refuse archives whose members could write or read outside their root, or are bombs."""
    infos = archive.infolist()
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        raise ImageError("archive_too_large", f"{name}: {len(infos)} members, more than the limit of {MAX_ARCHIVE_MEMBERS}")
    total = 0
    for info in infos:
        try:
            safe_relative(info.filename)
        except ImageError:
            raise ImageError("archive_unsafe_member", f"{name}: member '{info.filename}' has an absolute path or '..'; archive refused") from None
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ImageError("archive_unsafe_member", f"{name}: member '{info.filename}' is a symbolic link; archive refused")
        total += info.file_size
    if total > MAX_ARCHIVE_BYTES:
        raise ImageError(
            "archive_too_large",
            f"{name}: members would unpack to {total / 1024**3:.1f} GiB, more than the limit of {MAX_ARCHIVE_BYTES / 1024**3:.0f} GiB",
        )


class ImageSource:
    """Images under a folder, or inside a .zip archive, by relative path."""

    def __init__(self, root: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        self.max_pixels = max_pixels
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, zipfile.ZipInfo] = {}
        self.top_folder = ""
        """The one folder every member of a .zip sits in (the image folder zipped itself, not its contents)."""
        self.read_from_top_folder = 0
        """How many images were found only inside `top_folder`: their paths in the data omit it."""
        self._pid = os.getpid()
        if self.root.is_file():
            try:
                self._zip = zipfile.ZipFile(self.root)
            except (zipfile.BadZipFile, OSError) as exc:
                raise ImageError("archive_corrupt", f"{self.root}: not a readable .zip archive ({exc})") from None
            check_archive(self._zip, str(self.root))
            self._members = {str(safe_relative(i.filename)): i for i in self._zip.infolist() if not i.is_dir()}
            tops = {name.split("/", 1)[0] for name in self._members}
            nested = len(tops) == 1 and all("/" in name for name in self._members)
            self.top_folder = tops.pop() if nested else ""
        elif not self.root.is_dir():
            raise ImageError("image_root_missing", f"image folder or archive '{self.root}' does not exist")

    def __repr__(self) -> str:
        return f"ImageSource({str(self.root)!r})"

    def _read(self, rel: PurePosixPath, original: str) -> bytes:
        if self._zip is not None:
            if self._pid != os.getpid():  # a dataloader worker: its own handle, not a shared file position
                self._zip, self._pid = zipfile.ZipFile(self.root), os.getpid()
            info = self._members.get(str(rel))
            if info is None and self.top_folder:
                info = self._members.get(f"{self.top_folder}/{rel}")
                self.read_from_top_folder += info is not None
            if info is None:
                raise ImageError("image_missing", f"image '{original}' is not in archive {self.root.name}")
            if info.file_size == 0:
                raise ImageError("image_unreadable", f"image '{original}' is an empty file")
            _check_file_size(info.file_size, original)
            try:
                return self._zip.read(info)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise ImageError("image_unreadable", f"image '{original}' could not be read from the archive ({exc})") from None
        path = self.root / rel
        try:
            resolved = path.resolve()
            resolved.relative_to(self.root.resolve())
        except ValueError:
            raise ImageError("image_path_unsafe", f"image path '{original}' resolves outside the image folder") from None
        if not path.is_file():
            raise ImageError("image_missing", f"image file '{original}' not found under {self.root}")
        try:
            _check_file_size(path.stat().st_size, original)
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError("image_unreadable", f"image '{original}' could not be read ({exc.strerror or exc})") from None
        if not data:
            raise ImageError("image_unreadable", f"image '{original}' is an empty file")
        return data

    def decode(self, path: str, verify: bool) -> Image.Image:
        """The image opened lazily, checked against the pixel limit (and, with `verify`, for structure)."""
        return decode_image(self._read(safe_relative(path), path), path, self.max_pixels, verify)

    def size(self, path: str) -> tuple[int, int]:
        """(width, height), after checking that the file is a readable image within the limit."""
        return self.decode(path, verify=True).size

    def open(self, path: str) -> Image.Image:
        """The image decoded and converted to RGB."""
        return to_rgb(self.decode(path, verify=False), path)


def decode_image(data: bytes, name: str, max_pixels: int, verify: bool) -> Image.Image:
    """An image's bytes opened lazily, after the pixel limit (and, with `verify`, its structure) is checked."""
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(
                "image_too_large",
                f"image '{name}' is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}",
            )
        if verify:
            img.verify()  # checks structure and truncation without a full decode
            img = Image.open(io.BytesIO(data))
        return img
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's own limit (about 179 Mpx) refuses the header before ours is reached.
        raise ImageError("image_too_large", f"image '{name}' is too large: {exc}") from None
    except UnidentifiedImageError:
        # Pillow's own message names the BytesIO object (a memory address), not the file.
        message = f"image '{name}' is not a readable image (UnidentifiedImageError: not an image format Pillow knows)"
        raise ImageError("image_unreadable", message) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("image_unreadable", f"image '{name}' is not a readable image ({type(exc).__name__}: {exc})") from None


def to_rgb(img: Image.Image, name: str) -> Image.Image:
    """The image decoded and converted to RGB (16-bit grey scaled, transparency on white)."""
    try:
        if img.mode == "I" or img.mode.startswith("I;16"):
            # convert() clips 16-bit values at 255, which turns the image white: scale instead.
            levels = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257
            img = Image.fromarray(np.rint(levels).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "P", "PA"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ImageError("image_unreadable", f"image '{name}' could not be decoded ({exc})") from None


def _check_file_size(size: int, path: str) -> None:
    if size > MAX_IMAGE_BYTES:
        raise ImageError("image_too_large", f"image '{path}' is a {size / 1024**2:,.0f} MiB file, over the limit of {MAX_IMAGE_BYTES / 1024**2:,.0f} MiB")
