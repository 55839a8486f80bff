"""Image folders: which files a split holds, with their labels, listed once and cached.

Layouts: `class/*.jpg`, `train/class/...` + `test/class/...` (or `val/`), or a flat folder without labels.
Symbolic links are followed, but every real folder is walked once and every real file listed once, so a
link back up the tree (`loop -> .`) cannot multiply the data set.

Listing a folder of a million files takes seconds to minutes, so the listing is cached (in `$MOCO_CACHE`,
default `~/.cache/moco`), keyed by the folder and checked against the modification times of every folder it
walked: adding, removing or renaming a file changes its folder's time and the listing is made again.
"""

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import DataError, MocoError
from ..files import write_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}
_CACHE_VERSION = 1


@dataclass
class FolderListing:
    """The image files of one split of a folder, in a fixed order, and their labels."""

    root: str  # the folder the data set was named by
    files: list[str]  # paths relative to root
    labels: list[int] | None  # one per file, or None for a flat folder
    classes: list[str] | None  # class names, index = label
    empty_classes: list[str]  # class folders without images (skipped)
    loose_images_dir: str | None  # a folder holding image files next to class folders (not read)

    def paths(self) -> list[Path]:
        return [Path(self.root, f) for f in self.files]


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


class _Walk:
    """Walks folders, following links, visiting each real folder once and listing each real file once; records
    every folder it visited with its modification time (what the cache is checked against)."""

    def __init__(self) -> None:
        self.dirs: dict[str, int] = {}
        self._seen_dirs: set[tuple[int, int]] = set()
        self._seen_files: set[tuple[int, int]] = set()

    def _enter(self, directory: Path) -> bool:
        try:
            st = directory.stat()
        except OSError:
            return False
        if (st.st_dev, st.st_ino) in self._seen_dirs:
            return False
        self._seen_dirs.add((st.st_dev, st.st_ino))
        self.dirs[str(directory)] = st.st_mtime_ns
        return True

    def images(self, directory: Path, recursive: bool) -> Iterator[Path]:
        """Image files under `directory` in sorted order, hidden files and folders skipped."""
        if not self._enter(directory):
            return
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
        for entry in entries:
            if _is_hidden(entry.name) or not entry.is_file():
                continue
            if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                st = entry.stat()
                if (st.st_dev, st.st_ino) not in self._seen_files:
                    self._seen_files.add((st.st_dev, st.st_ino))
                    yield Path(entry.path)
        if recursive:
            for entry in entries:
                if not _is_hidden(entry.name) and entry.is_dir():
                    yield from self.images(Path(entry.path), recursive)


def _class_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not _is_hidden(p.name))


def _split_dir(root: Path, split: str) -> tuple[Path, list[Path]]:
    """The folder holding `split`, and the folders of every split (class names come from all of them)."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (or is not a folder); check the path")
    split_dirs = {s: next((root / n for n in names if (root / n).is_dir()), None) for s, names in SPLIT_FOLDERS.items()}
    if not any(split_dirs.values()):  # one folder: all of it is the train split
        if split != "train":
            raise DataError(f"{root} has no {split} split: it has no train/ and test/ (or val/) sub-folders. To "
                            f"make one, move the images into {root}/train/<class>/ and {root}/test/<class>/")
        return root, [root]
    data_dir = split_dirs[split]
    if data_dir is None:
        raise DataError(f"{root} has no {SPLIT_FOLDERS[split][0]}/ folder for the {split} split; expected "
                        f"{root}/train/ and {root}/test/ (or val/)")
    return data_dir, [d for s, d in split_dirs.items() if d is not None and s != "val"]


def has_folder_split(root: Path, split: str) -> bool:
    """Whether `root` has the folder of `split` (without listing its files)."""
    try:
        _split_dir(root, split)
    except DataError:
        return False
    return True


def _list(root: Path, split: str) -> tuple[FolderListing, dict[str, int]]:
    walk = _Walk()
    data_dir, split_roots = _split_dir(root, split)
    class_dirs = _class_dirs(data_dir)
    if not class_dirs:
        files = list(walk.images(data_dir, recursive=False))
        labels = classes = loose = None
        empty: list[str] = []
    else:
        # Class indices come from every split, so that train and test labels agree.
        probe = _Walk()
        classes = sorted({d.name for split_root in split_roots for d in _class_dirs(split_root)
                          if next(probe.images(d, recursive=True), None) is not None})
        index = {name: i for i, name in enumerate(classes)}
        files, labels, empty = [], [], []
        for class_dir in class_dirs:
            class_files = list(walk.images(class_dir, recursive=True))
            if not class_files:
                empty.append(str(class_dir))
                continue
            files += class_files
            labels += [index[class_dir.name]] * len(class_files)
        loose = str(data_dir) if next(_Walk().images(data_dir, recursive=False), None) is not None else None
        for folder in {data_dir, *split_roots}:  # new class folders change these
            walk.dirs[str(folder)] = folder.stat().st_mtime_ns
    if not files:
        raise DataError(f"no images found under {data_dir}; expected files with extensions "
                        f"{', '.join(IMAGE_EXTENSIONS)} in it, or in class sub-folders <class>/")
    listing = FolderListing(str(root), [f.relative_to(root).as_posix() for f in files], labels, classes, empty, loose)
    return listing, walk.dirs


def evenly_spaced(listing: FolderListing, count: int) -> FolderListing:
    """`count` files of `listing`, evenly spaced over it (a listing is sorted by class: each keeps its share)."""
    if count >= len(listing.files):
        return listing
    keep = [round(i * (len(listing.files) - 1) / max(count - 1, 1)) for i in range(count)]
    labels = None if listing.labels is None else [listing.labels[i] for i in keep]
    return replace(listing, files=[listing.files[i] for i in keep], labels=labels)


def cache_dir() -> Path:
    return Path(os.environ.get("MOCO_CACHE") or Path.home() / ".cache" / "moco")


def list_folder(root: str | Path, split: str) -> FolderListing:
    """The listing of `split` of the image folder `root`: from the cache when no folder it walked has changed."""
    root = Path(root).expanduser().resolve()
    key = hashlib.sha1(f"{root}\0{split}".encode()).hexdigest()[:20]
    path = cache_dir() / "listings" / f"{key}.json"
    try:
        cached = json.loads(path.read_text())
        if cached["version"] == _CACHE_VERSION and all(
                os.stat(d).st_mtime_ns == mtime for d, mtime in cached["dirs"].items()):
            return FolderListing(**cached["listing"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache yet, or a stale or unreadable one: list again
    listing, dirs = _list(root, split)
    try:
        write_text(path, json.dumps({"version": _CACHE_VERSION, "dirs": dirs, "listing": asdict(listing)}))
    except (OSError, MocoError):
        pass  # a read-only or full home: work without the cache
    return listing
