"""The decoded-image cache on disk: every image decoded and resized once, its pixels kept in a file.

    CACHE_DIR/decoded/<split folder name>-<key>/    one store per split folder, img_size and filter
        pixels-<generation>.u8   uint8 slots of 3 x S x S bytes: an array [slots, 3, S, S] on disk
        index.json               which slot holds which image: {relative path: [size, mtime_ns, slot]}
        lock                     flock held by the one process that writes the store

An image is found in the cache when its relative path, byte size and modification time (ns) are the
ones recorded: a rewritten image is decoded again; one gone from the folder is dropped (and logged);
a new one is decoded and appended. So adding 10 images to 100,000 decodes 10.

Crash safety: `index.json` is the only thing a reader trusts, and it names only slots whose pixels
were written and flushed before it was replaced (temporary file, fsync, `os.replace`). A build killed
at any point leaves the previous index, or one committed during the build (every
`COMMIT_EVERY_S`), and pixels nobody refers to; the next build decodes exactly what the index lacks.
Slots an index names are never written again: changed images go to new slots, and when more than
half the file is dead slots it is copied into a new generation (a reader keeps its open file).
Builders take an exclusive `flock`, so two runs building at once decode each image once; readers
take no lock, and a store that is complete needs no write access at all.

Decoding runs in `num_workers` DataLoader worker processes (forked, with the inherited thread-exit
hooks dropped: see `data._drop_inherited_exit_hooks`), each writing its images' pixels straight into
the file at their slots. Progress: a tqdm bar on a terminal, else a log line every `LOG_EVERY_S`.

Reads (`PixelFile.read`) use `pread`, not a memory map: the pixels pass through the kernel's page
cache, which holds what fits in free RAM, but never count in the process's resident memory, which
stays bounded whatever the data size. `python -m harv_train.core.decoded_cache` lists or removes
stores (`make clean-cache`).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from harv_train.core.failpoints import failpoint
from harv_train.errors import DataError, UserError

logger = logging.getLogger(__name__)

FORMAT = 1
INDEX = "index.json"
LOCK = "lock"
COMMIT_EVERY_S = 15.0  # a build killed after this long keeps what it had decoded
LOG_EVERY_S = 10.0  # progress lines when stderr is not a terminal
LOG_BUILD_AT = 1000  # builds of fewer images log at DEBUG only: a small dataset decodes in a few seconds
CHUNK_MAX = 32  # images per task handed to a decoding process
COMPACT_MIN_BYTES = 256 * 2**20  # dead slots worth copying the file for (and more than the live ones)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST)


def default_cache_dir() -> Path:
    """$HARV_TRAIN_CACHE_DIR, else $XDG_CACHE_HOME/harv-train, else ~/.cache/harv-train."""
    if os.environ.get("HARV_TRAIN_CACHE_DIR"):
        return Path(os.environ["HARV_TRAIN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "harv-train"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """The `cache_dir` param: a folder, or None for the user's cache directory."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _not_writable(where: Path, exc: OSError) -> UserError:
    return UserError(
        f"cannot write the decoded-image cache in {where} ({exc.strerror or exc}): make the folder writable, "
        "or set cache_dir to a writable folder"
    )


def _disk_full(where: Path, needed: int) -> UserError:
    free = shutil.disk_usage(where).free if where.exists() else 0
    return UserError(
        f"not enough free disk space for the decoded-image cache in {where}: {free / 2**30:.2f} GiB free, "
        f"{needed / 2**30:.2f} GiB needed: free some space, or set cache_dir to a folder on a larger disk "
        "(or lower img_size)"
    )


class PixelFile:
    """Read-only access to a store's pixel file: whole images by slot, with `pread`.

    Holds the file open, so it stays readable even when a later build replaces it by a new
    generation. Picklable (reopened by path)."""

    def __init__(self, path: Path, img_size: int):
        self.path, self.img_size = Path(path), img_size
        self.slot_bytes = 3 * img_size * img_size
        self._fd = os.open(self.path, os.O_RDONLY)

    def __getstate__(self) -> dict:
        return {"path": self.path, "img_size": self.img_size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["img_size"])

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None

    def read(self, slots: np.ndarray) -> np.ndarray:
        """uint8 [len(slots), 3, S, S]: the images in those slots, in that order."""
        s = self.img_size
        out = np.empty((len(slots), 3, s, s), dtype=np.uint8)
        for row, slot in zip(out, slots.tolist()):
            got = os.preadv(self._fd, [row], slot * self.slot_bytes)
            if got != self.slot_bytes:
                raise UserError(
                    f"the decoded-image cache file {self.path} is shorter than its index says (slot {slot}): "
                    f"remove the store folder {self.path.parent} (or run make clean-cache) and run again"
                )
        return out

    def prefetch(self, slots: np.ndarray) -> None:
        """Ask the kernel to start reading these slots now (no-op when they are in the page cache)."""
        for slot in slots.tolist():
            os.posix_fadvise(self._fd, slot * self.slot_bytes, self.slot_bytes, os.POSIX_FADV_WILLNEED)


@dataclass
class Lookup:
    """What `CacheStore.ensure` found and did for a list of images."""

    pixels: PixelFile | None  # None when no image could be decoded
    slots: np.ndarray  # int64 [N]: each image's slot, -1 where it could not be decoded
    errors: dict[int, DataError]  # position -> why that image could not be decoded
    decoded: int  # images decoded by this call (0 when the cache had them all)
    dropped: int  # cached images gone from the folder, dropped from the index by this call


def _index_entries(index: dict | None) -> dict[str, list[int]]:
    return index["entries"] if index else {}


class CacheStore:
    """The decoded pixels of one split folder at one image size and resize filter."""

    def __init__(self, cache_dir: Path, root: Path, img_size: int, interpolation: str):
        self.cache_dir, self.root = Path(cache_dir), Path(root)
        self.img_size, self.interpolation = img_size, interpolation
        self.slot_bytes = 3 * img_size * img_size
        real = os.path.realpath(self.root)
        key = hashlib.sha256(json.dumps([FORMAT, real, img_size, interpolation]).encode()).hexdigest()[:16]
        hint = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(real).parent.name}-{Path(real).name}")[-48:]
        self.dir = self.cache_dir / "decoded" / f"{hint}-{img_size}-{key}"
        self._meta = {"format": FORMAT, "root": real, "img_size": img_size, "interpolation": interpolation}

    # -- reading ---------------------------------------------------------------------------------

    def _read_index(self) -> dict | None:
        try:
            index = json.loads((self.dir / INDEX).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning(f"ignoring the unreadable decoded-image cache index {self.dir / INDEX} ({exc}): "
                           "its images are decoded again")
            return None
        if any(index.get(k) != v for k, v in self._meta.items()):
            return None
        return index

    def _plan(self, index: dict | None, keys: list[str], signatures: list[tuple[int, int] | None]):
        """Positions found in the index (with their slots), positions to decode, and stale entries."""
        entries = _index_entries(index)
        slots = np.full(len(keys), -1, dtype=np.int64)
        todo: list[int] = []
        changed = 0
        for pos, (key, sig) in enumerate(zip(keys, signatures)):
            entry = entries.get(key)
            if entry is not None and sig is not None and (entry[0], entry[1]) == sig:
                slots[pos] = entry[2]
            else:
                todo.append(pos)
                changed += entry is not None
        present = set(keys)
        gone = [k for k in entries if k not in present]
        return slots, todo, changed, gone

    def _open_pixels(self, index: dict) -> PixelFile | None:
        if not index.get("entries"):
            return None
        pixels = PixelFile(self.dir / index["pixels"], self.img_size)
        if os.fstat(pixels._fd).st_size < index["slots"] * self.slot_bytes:
            return None  # truncated behind our back: not to be trusted
        return pixels

    def ensure(
        self,
        paths: Sequence[Path],
        num_workers: int = 0,
        progress: bool = True,
    ) -> Lookup:
        """Every image of `paths` decoded in the store (decoding those it lacks); their slots."""
        keys = [str(Path(p).relative_to(self.root)) for p in paths]
        signatures = [_signature(p) for p in paths]
        index = self._read_index()
        slots, todo, _, gone = self._plan(index, keys, signatures)
        if index is not None and not todo and not gone:
            try:
                pixels = self._open_pixels(index)
            except FileNotFoundError:  # replaced by a newer generation since we read the index
                pixels = None
            if pixels is not None:
                logger.debug(f"decoded-image cache: all {len(paths)} images of {self.root} found in {self.dir}")
                return Lookup(pixels, slots, {}, 0, 0)
        with self._locked():
            return self._update(paths, keys, signatures, num_workers, progress)

    # -- writing ---------------------------------------------------------------------------------

    def _locked(self) -> _StoreLock:
        return _StoreLock(self.dir, self.cache_dir)

    def _update(self, paths, keys, signatures, num_workers: int, progress: bool) -> Lookup:
        index = self._read_index()
        if index is not None and index["entries"]:
            pixels = self.dir / index["pixels"]
            if not pixels.is_file() or pixels.stat().st_size < index["slots"] * self.slot_bytes:
                logger.warning(f"the decoded-image cache {self.dir} lost pixels its index names (file missing or "
                               "truncated): decoding its images again")
                index = None
        if index is None:
            index = {**self._meta, "pixels": "pixels-0.u8", "slots": 0, "entries": {}}
        self._remove_strays(index)
        slots, todo, changed, gone = self._plan(index, keys, signatures)
        entries = index["entries"]
        if gone:
            for key in gone:
                del entries[key]
            logger.warning(
                f"{len(gone)} image(s) decoded earlier are no longer in {self.root} (deleted or renamed), "
                f"e.g. {gone[0]}: dropped from the decoded-image cache"
            )
        if changed:
            logger.info(f"{changed} image(s) in {self.root} changed since they were decoded: decoding them again")
        for pos in todo:
            entries.pop(keys[pos], None)  # a changed image's old slot is dead from now on
        errors: dict[int, DataError] = {}
        if todo:
            errors = self._decode(index, paths, keys, signatures, todo, slots, num_workers, progress)
        else:
            self._commit(index, None)
        index = self._compact(index, keys, slots)
        pixels = self._open_pixels(index) if index["entries"] else None
        return Lookup(pixels, slots, errors, len(todo) - len(errors), len(gone))

    def _decode(self, index, paths, keys, signatures, todo, slots, num_workers, progress) -> dict[int, DataError]:
        """Decode the images at positions `todo` into new slots after the index's last one."""
        pixels_path = self.dir / index["pixels"]
        first = index["slots"]
        slot_of = {pos: first + n for n, pos in enumerate(todo)}
        end = (first + len(todo)) * self.slot_bytes
        have = pixels_path.stat().st_size if pixels_path.exists() else 0
        needed = len(todo) * self.slot_bytes
        if shutil.disk_usage(self.dir).free < max(0, end - have) + 64 * 2**20:
            raise _disk_full(self.cache_dir, needed)
        loud = len(todo) >= LOG_BUILD_AT
        (logger.info if loud else logger.debug)(
            f"Decoding {len(todo)} images of {self.root} into the cache {self.dir} "
            f"({needed / 2**30:.2f} GiB, once: later runs read them from there)"
        )
        started = time.monotonic()
        errors: dict[int, DataError] = {}
        done: list[int] = []
        fd = os.open(pixels_path, os.O_RDWR | os.O_CREAT, 0o644)
        bar = _Progress(len(todo), f"Decoding {self.root}", progress and loud)
        try:
            _reserve(fd, first * self.slot_bytes, needed, self.cache_dir)
            jobs = [(pos, str(paths[pos]), slot_of[pos]) for pos in todo]
            last_commit = time.monotonic()
            for results in _decoded_chunks(jobs, pixels_path, self.img_size, self.interpolation, num_workers):
                failpoint("cache_write")  # these pixels are written; the index does not name them yet
                for pos, error, write_errno in results:
                    if write_errno == errno.ENOSPC:
                        raise _disk_full(self.cache_dir, needed)
                    if write_errno is not None:
                        raise _not_writable(self.cache_dir, OSError(write_errno, os.strerror(write_errno)))
                    if error is not None:
                        errors[pos] = DataError(error)
                    else:
                        done.append(pos)
                bar.update(len(results))
                if time.monotonic() - last_commit >= COMMIT_EVERY_S:
                    self._record(index, done, keys, signatures, slot_of)
                    done = []
                    self._commit(index, fd)
                    last_commit = time.monotonic()
        finally:
            bar.close()
            # What was written stays usable after an error or Ctrl-C (a SIGKILL keeps the last commit).
            self._record(index, done, keys, signatures, slot_of)
            try:
                self._commit(index, fd)
            except (OSError, UserError) as exc:
                logger.debug(f"could not record the decoded images in {self.dir / INDEX}: {exc}")
            os.close(fd)
        seconds = time.monotonic() - started
        (logger.info if loud else logger.debug)(
            f"Decoded {len(todo) - len(errors)} images in {seconds:.1f}s "
            f"({len(todo) / max(seconds, 1e-9):.0f} images/s, {max(min(num_workers, len(todo)), 1)} process(es))"
        )
        for pos in todo:
            if pos not in errors:
                slots[pos] = slot_of[pos]
        return errors

    def _record(self, index: dict, positions: list[int], keys, signatures, slot_of: dict[int, int]) -> None:
        entries = index["entries"]
        for pos in positions:
            size, mtime_ns = signatures[pos] or (-1, -1)
            entries[keys[pos]] = [size, mtime_ns, slot_of[pos]]
        if positions:
            index["slots"] = max(index["slots"], max(slot_of[p] for p in positions) + 1)

    def _commit(self, index: dict, fd: int | None) -> None:
        """index.json names only what is on disk: pixels flushed first, then the index replaced whole."""
        if fd is not None:
            os.fdatasync(fd)
        tmp = self.dir / f"{INDEX}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(index, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / INDEX)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise _disk_full(self.cache_dir, 64 * 2**20) from None
            raise

    def _compact(self, index: dict, keys: list[str], slots: np.ndarray) -> dict:
        """Copy the live slots into a new generation when dead ones are the majority."""
        live = len(index["entries"])
        dead = index["slots"] - live
        if dead <= live or dead * self.slot_bytes < COMPACT_MIN_BYTES:
            return index
        old_name = index["pixels"]
        generation = int(re.findall(r"\d+", old_name)[0]) + 1
        new_name = f"pixels-{generation}.u8"
        order = sorted(index["entries"].items(), key=lambda kv: kv[1][2])
        old = PixelFile(self.dir / old_name, self.img_size)
        tmp = self.dir / f"{new_name}.tmp-{os.getpid()}"
        moved: dict[int, int] = {}
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _reserve(fd, 0, live * self.slot_bytes, self.cache_dir)
                for start in range(0, live, 256):
                    batch = order[start : start + 256]
                    data = old.read(np.array([e[2] for _, e in batch], dtype=np.int64))
                    _pwrite_all(fd, data, start * self.slot_bytes)
                    for n, (_, entry) in enumerate(batch):
                        moved[entry[2]] = start + n
                os.fdatasync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.dir / new_name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        new_index = {**index, "pixels": new_name, "slots": live,
                     "entries": {k: [e[0], e[1], moved[e[2]]] for k, e in index["entries"].items()}}
        self._commit(new_index, None)
        (self.dir / old_name).unlink(missing_ok=True)  # readers that have it open keep reading it
        for pos, slot in enumerate(slots.tolist()):
            if slot >= 0:
                slots[pos] = moved[slot]
        logger.info(f"Compacted the decoded-image cache {self.dir}: {dead} dead slots freed "
                    f"({dead * self.slot_bytes / 2**30:.2f} GiB)")
        return new_index

    def _remove_strays(self, index: dict) -> None:
        """Temporary files of killed builds and pixel files no index names (we hold the lock)."""
        for path in self.dir.iterdir():
            name = path.name
            if ".tmp-" in name or (name.startswith("pixels-") and name != index["pixels"]):
                path.unlink(missing_ok=True)


class _StoreLock:
    """The store's folder, created, and its exclusive flock (waiting, with a log line, for a holder)."""

    def __init__(self, directory: Path, cache_dir: Path):
        self.dir, self.cache_dir = directory, cache_dir
        self.fd: int | None = None

    def __enter__(self) -> _StoreLock:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in _NOT_WRITABLE or exc.errno == errno.ENOENT:
                raise _not_writable(self.cache_dir, exc) from None
            if exc.errno == errno.ENOSPC:
                raise _disk_full(self.cache_dir, 0) from None
            raise
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info(f"Waiting for another process that is decoding images into {self.dir}")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # gone or unreadable: decoding it says why
    return st.st_size, st.st_mtime_ns


def _reserve(fd: int, offset: int, length: int, where: Path) -> None:
    """Allocate the blocks now: a disk that cannot hold the images fails here, before any decoding."""
    if length <= 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _disk_full(where, length) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# -- parallel decoding -------------------------------------------------------------------------------


class _DecodeJobs(torch.utils.data.Dataset):
    """Item k: decode the k-th chunk of (position, path, slot) and write each image's pixels at its slot.
    Returns (position, error message or None, errno of a failed write or None) per image."""

    def __init__(self, chunks: list[list[tuple[int, str, int]]], pixels_path: Path, img_size: int, interpolation: str):
        self.chunks, self.pixels_path = chunks, pixels_path
        self.img_size, self.interpolation = img_size, interpolation
        self._fd: tuple[int, int] | None = None  # (pid, fd): a forked worker opens its own

    def __len__(self) -> int:
        return len(self.chunks)

    def _file(self) -> int:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.pixels_path, os.O_WRONLY))
        return self._fd[1]

    def __getitem__(self, k: int) -> list[tuple[int, str | None, int | None]]:
        from harv_train.core.data import decode_image

        slot_bytes = 3 * self.img_size * self.img_size
        results = []
        for pos, path, slot in self.chunks[k]:
            try:
                pixels = decode_image(Path(path), self.img_size, self.interpolation)
            except DataError as exc:
                results.append((pos, str(exc), None))
                continue
            try:
                _pwrite_all(self._file(), pixels.numpy(), slot * slot_bytes)
            except OSError as exc:
                results.append((pos, None, exc.errno or errno.EIO))
                continue
            results.append((pos, None, None))
        return results

    def close(self) -> None:
        if self._fd is not None and self._fd[0] == os.getpid():
            os.close(self._fd[1])
            self._fd = None


def _as_is(item):
    return item


def _decoded_chunks(jobs, pixels_path: Path, img_size: int, interpolation: str, num_workers: int) -> Iterator[list]:
    """Results chunk by chunk, in order, decoded in `num_workers` processes (0: in this one)."""
    from harv_train.core.data import _drop_inherited_exit_hooks

    workers = min(num_workers, len(jobs)) if len(jobs) > 1 else 0
    per_chunk = max(1, min(CHUNK_MAX, math.ceil(len(jobs) / max(workers * 4, 1))))
    chunks = [jobs[i : i + per_chunk] for i in range(0, len(jobs), per_chunk)]
    dataset = _DecodeJobs(chunks, pixels_path, img_size, interpolation)
    if workers == 0:
        try:
            for k in range(len(chunks)):
                yield dataset[k]
        finally:
            dataset.close()
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
        worker_init_fn=_drop_inherited_exit_hooks, prefetch_factor=4,
    )
    yield from loader


class _Progress:
    """tqdm on a terminal; otherwise a log line every LOG_EVERY_S seconds."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = 0
        self.started = self.last_log = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and now - self.last_log >= LOG_EVERY_S and self.done < self.total:
            rate = self.done / (now - self.started)
            logger.info(f"{self.desc}: {self.done}/{self.total} images ({rate:.0f}/s, about "
                        f"{(self.total - self.done) / max(rate, 1e-9):.0f}s left)")
            self.last_log = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- listing and removing (python -m harv_train.core.decoded_cache) --------------------------------------


def stores(cache_dir: Path) -> list[dict]:
    """Each store under cache_dir: folder, source folder, img_size, images, bytes on disk."""
    found = []
    for folder in sorted((cache_dir / "decoded").glob("*")):
        try:
            index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            index = {}
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        found.append({"folder": folder, "root": index.get("root"), "img_size": index.get("img_size"),
                      "images": len(index.get("entries", {})), "bytes": size})
    return found


def clear(cache_dir: Path) -> list[Path]:
    """Remove what harv-train keeps in cache_dir (decoded images, compiled kernels); nothing else."""
    removed = []
    for name in ("decoded", "inductor"):
        if (cache_dir / name).exists():
            shutil.rmtree(cache_dir / name)
            removed.append(cache_dir / name)
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harv_train.core.decoded_cache",
        description="List or remove harv-train's decoded-image cache (and its torch.compile kernels).",
    )
    parser.add_argument("action", nargs="?", choices=("list", "clear", "prune"), default="list",
                        help="list the stores; clear: remove them all; prune: remove those whose images' folder is gone")
    parser.add_argument("--params", help="take cache_dir from this params file")
    parser.add_argument("--cache-dir", help="the cache folder (default: cache_dir of --params, else the user's cache)")
    args = parser.parse_args(argv)
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    if cache_dir is None and args.params and Path(args.params).is_file():
        from harv_train.config import load_config

        cache_dir = resolve_cache_dir(load_config(args.params).cache_dir)
    cache_dir = cache_dir or default_cache_dir()
    if args.action == "clear":
        removed = clear(cache_dir)
        print(f"removed {', '.join(map(str, removed))}" if removed else f"nothing to remove in {cache_dir}")
        return 0
    found = stores(cache_dir)
    if args.action == "prune":
        gone = [s for s in found if not (s["root"] and Path(s["root"]).is_dir())]
        for s in gone:
            shutil.rmtree(s["folder"])
            print(f"removed {s['folder']} ({s['bytes'] / 2**30:.2f} GiB; {s['root'] or 'unknown folder'} is gone)")
        return 0
    for s in found:
        print(f"{s['bytes'] / 2**30:8.2f} GiB  {s['images']:>8} images  {s['img_size']}px  {s['root']}  ({s['folder']})")
    total = sum(s["bytes"] for s in found)
    print(f"{total / 2**30:8.2f} GiB in {len(found)} store(s) under {cache_dir / 'decoded'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
