"""Atomic, pickle-free checkpoints of JAX pytrees (used by :class:`ppl.inference.SVI`).

A checkpoint is ONE ``.npz`` file (a zip archive, read with ``allow_pickle=False``):

* ``leaf_0 … leaf_{n-1}``: the leaves of the pytree, in
  ``jax.tree_util.tree_flatten_with_path`` order; dtypes numpy cannot store natively
  (``bfloat16``, …) are stored as their raw bytes (``uint8``) and restored from the
  metadata;
* ``__meta__``: a 0-d unicode array holding JSON metadata: the format version, the
  treedef as a string, each leaf's key path, shape and dtype, a SHA-256 of the leaf bytes,
  and whatever the caller adds (``step``, a hash of the param names, …).

Writing is atomic: the archive goes to a temporary file in the target directory, which is
flushed and ``os.fsync``-ed, then ``os.replace``-d over the final name (and the directory
is fsync-ed), so a reader sees either the old checkpoint or the new one, never half of
one. Loading checks the archive, the metadata and the hash, then validates the stored
structure against a *template* pytree (``like``) and raises ``ValueError`` — never an
error deep inside JAX — for a corrupt, truncated or foreign file.

Example::

    >>> import tempfile, jax.numpy as jnp
    >>> from ppl.inference.checkpoint import save_checkpoint, load_checkpoint
    >>> d = tempfile.mkdtemp()
    >>> tree = {"w": jnp.ones(3), "step": jnp.int32(7)}
    >>> path = save_checkpoint(d, tree, metadata={"step": 7})
    >>> restored, meta = load_checkpoint(d, like=tree)
    >>> int(restored["step"]), meta["step"]
    (7, 7)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CHECKPOINT_FILE",
    "FORMAT_VERSION",
    "checkpoint_path",
    "load_checkpoint",
    "read_metadata",
    "save_checkpoint",
]

FORMAT_VERSION = 1
CHECKPOINT_FILE = "svi_checkpoint.npz"
_MAGIC = "ppl-checkpoint"
_META = "__meta__"


def checkpoint_path(directory) -> str:
    """The checkpoint file inside ``directory`` (or ``directory`` itself if it is a file)."""
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        return directory
    return os.path.join(directory, CHECKPOINT_FILE)


def _native(dtype: np.dtype) -> bool:
    """Whether ``.npy`` can store ``dtype`` without pickle and read it back as itself."""
    try:
        return dtype.kind in "biufc" and np.dtype(dtype.str) == dtype
    except TypeError:
        return False


def _leaf_to_numpy(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        raise TypeError(
            "typed PRNG key arrays cannot be stored directly; store jax.random.key_data(key)"
        )
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf.addressable_data(0))
    return np.asarray(leaf)


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
    return h.hexdigest()


def save_checkpoint(directory, tree, *, metadata: dict | None = None) -> str:
    """Write ``tree`` (a pytree of arrays) atomically into ``directory``; return the path.

    :param directory: a directory (created if missing); the file is
        ``directory/svi_checkpoint.npz``.
    :param tree: a pytree whose leaves are arrays (no typed PRNG keys: store their
        ``jax.random.key_data``).
    :param dict metadata: JSON-serialisable extras stored with the leaves.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, CHECKPOINT_FILE)
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    arrays, leaf_meta = [], []
    for path, leaf in path_leaves:
        a = _leaf_to_numpy(leaf)
        leaf_meta.append(
            {"path": jax.tree_util.keystr(path), "shape": list(a.shape), "dtype": str(a.dtype)}
        )
        arrays.append(a)
    meta = {
        "magic": _MAGIC,
        "format_version": FORMAT_VERSION,
        "treedef": str(treedef),
        "leaves": leaf_meta,
        "sha256": _digest(arrays),
        **(metadata or {}),
    }
    payload = {
        f"leaf_{i}": (a if _native(a.dtype) else np.ascontiguousarray(a).view(np.uint8))
        for i, a in enumerate(arrays)
    }
    payload[_META] = np.array(json.dumps(meta))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (POSIX); harmless where unsupported
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return final


def _open(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"checkpoint {path!r} is corrupt or truncated (not a readable .npz/zip archive)"
        )
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip, truncated central directory, …
        raise ValueError(
            f"checkpoint {path!r} is corrupt or truncated (cannot open it as .npz: {e})"
        ) from None


def _read_meta(path, archive) -> dict:
    try:
        raw = archive[_META]
        meta = json.loads(str(raw[()]))
    except KeyError:
        raise ValueError(
            f"checkpoint {path!r} is not a ppl checkpoint or is corrupt (no {_META!r} entry); "
            f"found entries {sorted(archive.files)[:8]}"
        ) from None
    except Exception as e:
        raise ValueError(f"checkpoint {path!r} is corrupt (unreadable metadata: {e})") from None
    if not isinstance(meta, dict) or meta.get("magic") != _MAGIC:
        raise ValueError(f"checkpoint {path!r} is not a ppl checkpoint (bad metadata header)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path!r} has format version {meta.get('format_version')!r}; "
            f"this ppl reads version {FORMAT_VERSION}"
        )
    return meta


def read_metadata(directory) -> dict:
    """The JSON metadata of the checkpoint in ``directory`` (validated header only)."""
    path = checkpoint_path(directory)
    with _open(path) as archive:
        return _read_meta(path, archive)


def _describe(leaves) -> str:
    return ", ".join(f"{m['path']}: {m['dtype']}{tuple(m['shape'])}" for m in leaves)


def load_checkpoint(directory, like) -> tuple[Any, dict]:
    """Read the checkpoint in ``directory`` and rebuild it with the structure of ``like``.

    :param like: a template pytree with the expected structure, shapes and dtypes (e.g. a
        freshly initialised state). Its treedef is used to rebuild the tree.
    :returns: ``(tree, metadata)``; leaves are ``jax.Array`` s.
    :raises FileNotFoundError: no checkpoint there.
    :raises ValueError: the file is corrupt/truncated, not a ppl checkpoint, or was written
        for a different structure (the message says what was expected and what was found).
    """
    path = checkpoint_path(directory)
    with _open(path) as archive:
        meta = _read_meta(path, archive)
        stored = meta.get("leaves")
        if not isinstance(stored, list):
            raise ValueError(f"checkpoint {path!r} is corrupt (no leaf table)")
        try:
            arrays = []
            for i, m in enumerate(stored):
                a = archive[f"leaf_{i}"]
                dtype = jnp.dtype(m["dtype"])
                shape = tuple(m["shape"])
                if a.dtype != dtype:  # stored as raw bytes
                    a = np.ascontiguousarray(a).view(dtype)
                arrays.append(a.reshape(shape))
        except Exception as e:
            raise ValueError(f"checkpoint {path!r} is corrupt or truncated ({e})") from None
    if _digest(arrays) != meta.get("sha256"):
        raise ValueError(f"checkpoint {path!r} is corrupt (content hash mismatch)")
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    expected = [
        {
            "path": jax.tree_util.keystr(p),
            "shape": list(np.shape(x)),
            "dtype": str(jnp.result_type(x)),
        }
        for p, x in path_leaves
    ]
    if expected != stored:
        exp = {m["path"]: m for m in expected}
        got = {m["path"]: m for m in stored}
        diff_e = [m for m in expected if got.get(m["path"]) != m]
        diff_g = [m for m in stored if exp.get(m["path"]) != m]
        raise ValueError(
            f"checkpoint {path!r} was written for a different model/optimizer: "
            f"expected {len(expected)} leaves, found {len(stored)}; expected "
            f"[{_describe(diff_e[:8])}{', …' if len(diff_e) > 8 else ''}], found "
            f"[{_describe(diff_g[:8])}{', …' if len(diff_g) > 8 else ''}]"
        )
    if meta.get("treedef") != str(treedef):
        raise ValueError(
            f"checkpoint {path!r} was written for a different model/optimizer: expected "
            f"structure {treedef}, found {meta.get('treedef')}"
        )
    tree = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in arrays])
    return tree, meta
