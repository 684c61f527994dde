"""Parquet files and `datasets` folders as `tiaoyu prep` inputs (pyarrow, the `parquet` extra).

    tiaoyu prep data/train-00000-of-00001.parquet -o sft.jsonl
    tiaoyu prep hf_saved/ -o data.jsonl          # Dataset.save_to_disk / DatasetDict.save_to_disk

What is read:

- `.parquet` files, ROWS rows at a time (`ParquetFile.iter_batches`, column chunks streamed through a
  1 MB buffer), never whole;
- `.arrow` files, Arrow IPC in the stream format (as `datasets` writes them) or the file format, a
  record batch at a time;
- folders that `datasets`' `save_to_disk` wrote: `dataset_info.json`, `state.json` and the
  `data-0000K-of-0000N.arrow` files that `state.json` lists, read in that order. A `DatasetDict`
  folder (`dataset_dict.json` and one sub-folder per split) gives its `train` split; another split is
  read by naming its folder (`hf_saved/test`), which is a save_to_disk folder itself.

Every row becomes the dict a JSONL line of the same record parses to, and goes through the same
detection and cleaning (prep_records.py): the output is the bytes the records as JSONL give. Nested
columns (a list of structs for `messages`) come out as plain lists and dicts. Arrow has no absent
field — `Dataset.from_list` stores a field a record lacks as null — so a null field is read as absent,
at every depth.

Jobs. A job carries at most ROWS rows: the record batch itself when prep runs in one process, or the
batch in the Arrow IPC format (the sliced rows only; pickling a sliced batch would copy all of its
buffers) for a worker process, which turns it into rows there. Errors name the file and the row,
counted from 0 within that file (`df.iloc[17]`, `ds[17]` for a one-file dataset).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.io import read_json

ARROW_SUFFIXES = (".parquet", ".arrow")
DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
ROWS = 1024  # rows per job at most
_LAYOUT = "a datasets save_to_disk folder holds dataset_info.json, state.json and data-*.arrow files"


def require_pyarrow(path: str):
    """The pyarrow module, or one clear error naming the extra that brings it."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401 - the submodules are not imported by `import pyarrow`
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise TiaoyuError(f"{path}: reading parquet and Arrow data needs pyarrow: "
                          "pip install 'tiaoyu[parquet]' (or pip install 'pyarrow>=14')") from None
    return pyarrow


def is_arrow_file(path: str) -> bool:
    return path.lower().endswith(ARROW_SUFFIXES)


def is_dataset_folder(folder: Path) -> bool:
    """Does the folder say it is a `datasets` save_to_disk folder (then it is read as one, or refused)?"""
    return any((folder / m).is_file() for m in DATASET_MARKERS)


def dataset_split(folder: Path) -> Path:
    """The folder whose Arrow files are read: the folder itself, or a DatasetDict's `train` split."""
    if not (folder / "dataset_dict.json").is_file():
        return folder
    info = read_json(folder / "dataset_dict.json")
    splits = info.get("splits") if isinstance(info, dict) else None
    if not (isinstance(splits, list) and all(isinstance(s, str) for s in splits)):
        raise TiaoyuError(f"{folder / 'dataset_dict.json'}: expected {{\"splits\": [names …]}}")
    if "train" not in splits:
        names = ", ".join(splits) or "none"
        example = f" (e.g. {folder / splits[0]})" if splits else ""
        raise TiaoyuError(f"{folder}: a DatasetDict without a train split (splits: {names}); "
                          f"give the folder of the split to read{example}")
    split = folder / "train"
    if not split.is_dir():
        raise TiaoyuError(f"{split}: missing (dataset_dict.json lists a train split)")
    return split


def dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a save_to_disk folder, in the order `state.json` lists them. A folder with
    dataset_info.json but no state.json or data files, or one that lists files it lacks, is an error."""
    folder = dataset_split(folder)
    state = folder / "state.json"
    if not state.is_file():
        raise TiaoyuError(f"{folder}: not a datasets folder: state.json is missing ({_LAYOUT})")
    info = read_json(state)
    listed = info.get("_data_files") if isinstance(info, dict) else None
    if not isinstance(listed, list) or not listed:
        raise TiaoyuError(f"{state}: lists no data files ({_LAYOUT})")
    files = []
    for i, entry in enumerate(listed):
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise DataError("expected {\"filename\": \"data-….arrow\"}", str(state), None, f"_data_files[{i}]")
        f = folder / name
        if not f.is_file():
            raise TiaoyuError(f"{folder}: state.json lists {name}, which is missing ({_LAYOUT})")
        files.append(f)
    return files


# ----- reading ---------------------------------------------------------------------------------


def arrow_jobs(path: str, dataset: bool, pack: bool, rows: int = ROWS) -> Iterator[tuple[tuple, float]]:
    """(job, fraction of the source read so far) for every batch of at most `rows` rows of a parquet or
    Arrow file, or of the Arrow files of a save_to_disk folder. A job is ("arrow", batch, file, first row, rows);
    with `pack` the batch is its IPC bytes (for a worker process). A file that cannot be read is a DataError."""
    pa = require_pyarrow(path)
    files = dataset_files(Path(path)) if dataset else [Path(path)]
    sizes = [f.stat().st_size for f in files]
    total, before = max(sum(sizes), 1), 0
    for f, size in zip(files, sizes):
        row = 0
        reader = _parquet_batches if f.name.lower().endswith(".parquet") else _ipc_batches
        for batch, pos in reader(pa, f, size, rows):
            yield ("arrow", _pack(pa, batch) if pack else batch, str(f), row, batch.num_rows), (before + pos) / total
            row += batch.num_rows
        before += size


def _parquet_batches(pa, f: Path, size: int, rows: int):
    """(batch, bytes of the file read so far, estimated from the rows read)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(f), buffer_size=1 << 20, pre_buffer=False)  # column chunks streamed, not read whole
        total, done = max(pf.metadata.num_rows, 1), 0
        for batch in pf.iter_batches(batch_size=rows):
            done += batch.num_rows
            yield batch, size * done // total
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"not a readable parquet file ({_reason(e)})", str(f)) from None


def _ipc_batches(pa, f: Path, size: int, rows: int):
    """(batch, bytes of the file read so far): Arrow IPC, the stream or the file format (by its magic)."""
    try:
        with pa.OSFile(str(f)) as src:
            if src.read(6) == b"ARROW1":
                reader = pa.ipc.open_file(src)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                src.seek(0)
                batches = pa.ipc.open_stream(src)
            for batch in batches:
                for off in range(0, batch.num_rows, rows):
                    yield batch.slice(off, rows), src.tell()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"not a readable Arrow file ({_reason(e)})", str(f)) from None


def _reason(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _pack(pa, batch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


class RowsError(ValueError):
    """A batch whose values cannot be turned into Python objects."""


def arrow_rows(payload: Any) -> list[dict]:
    """The rows of a job's batch (a record batch, or its IPC bytes) as plain dicts, nulls left out."""
    try:
        if isinstance(payload, bytes):
            import pyarrow as pa

            payload = pa.ipc.open_stream(payload).read_all()
        # a map column as a dict, not a list of pairs; asked only where one is (it converts value by value)
        maps = "lossy" if any(_has_map(f.type) for f in payload.schema) else None
        rows = payload.to_pylist(maps_as_pydicts=maps)
        nulls = any(_has_nulls(c) for c in payload.columns)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        raise RowsError(f"cannot read the values of these rows ({_reason(e)})") from None
    return [_without_nulls(r) for r in rows] if nulls else rows


def _has_map(t) -> bool:
    import pyarrow.types as pt

    if pt.is_map(t):
        return True
    if pt.is_struct(t):
        return any(_has_map(t.field(i).type) for i in range(t.num_fields))
    return hasattr(t, "value_type") and _has_map(t.value_type)  # lists of every kind, dictionaries


def _has_nulls(arr) -> bool:
    """Is any value of this column null, at any depth (a chunked column, a list's items, a struct's fields)?"""
    import pyarrow.types as pt

    if hasattr(arr, "chunks"):
        return any(_has_nulls(c) for c in arr.chunks)
    if arr.null_count:
        return True
    if pt.is_struct(arr.type):
        return any(_has_nulls(f) for f in arr.flatten())
    if pt.is_dictionary(arr.type):
        return _has_nulls(arr.dictionary)
    if pt.is_map(arr.type):
        return _has_nulls(arr.keys) or _has_nulls(arr.items)
    return hasattr(arr, "flatten") and _has_nulls(arr.flatten())  # lists of every kind: their items


def _without_nulls(v: Any) -> Any:
    if type(v) is dict:
        return {k: _without_nulls(x) for k, x in v.items() if x is not None}
    if type(v) is list:
        return [_without_nulls(x) for x in v]
    return v
