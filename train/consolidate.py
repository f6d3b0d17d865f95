"""`python -m train.consolidate RUN OUT`: a sharded run (`sharding=torchrec`) as an ordinary one.

OUT receives RUN's files (config, statistics, metrics, predictions, logs) and each checkpoint
with its tables read whole from their shards and laid out as the unsharded network holds them
(one table, columns in the data's order). `predict`, `export`, `init_from` and the report then
take OUT like any run. The tables' optimizer state and the training state stay behind: OUT's
checkpoints hold weights only (a sharded run resumes from its own folder).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

import torch
from fsspec.core import url_to_fs

from train.checkpoint import CheckpointError, feature_spec, read
from train.checkpoint_io import TRAINING_KEYS, atomic_save
from train.errors import UpweightError
from train.layout import ARTIFACT_KEY, CHECKPOINTS_DIR, SHARDS_KEY, SHARDS_SUFFIX, join
from train.sharding import reader, shards_of
from train.storage import write_bytes


def full_tables(location: str) -> dict[str, torch.Tensor]:
    """Every table of a shards folder, whole, read in one process (no process group):
    key `<module>.collection.embedding_bags.<table>.weight` -> [rows, dim]."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(
        state, storage_reader=reader(location), planner=_EmptyStateDictLoadPlanner(), no_dist=True
    )
    out = {}
    for name, part in state.items():
        for key, value in part["tables"].items():
            out[f"{name}.collection.{key}"] = value
    return out


def consolidated(checkpoint: dict[str, Any], url: str) -> dict[str, Any]:
    """The checkpoint at `url` with its sharded tables whole, under the unsharded network's
    keys."""
    where = f"checkpoint {url}"
    artifact = dict(checkpoint[ARTIFACT_KEY])
    entry = artifact.pop(SHARDS_KEY)
    spec = feature_spec(artifact, where)
    tables = full_tables(shards_of(url, entry))
    state = dict(checkpoint["state_dict"])
    for module in entry["modules"]:
        try:
            parts = [tables[f"{module}.collection.embedding_bags.{t}.weight"] for t in spec.tables]
        except KeyError as err:
            raise CheckpointError(f"{where}: its shards hold no table {err}") from err
        state[f"{module}.table.weight"] = torch.cat(parts)
    out = {k: v for k, v in checkpoint.items() if k not in TRAINING_KEYS}
    return out | {"state_dict": state, ARTIFACT_KEY: artifact}


def consolidate(run: str, out: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Writes OUT from RUN (see the module's docstring); returns the checkpoints consolidated."""
    fs, root = url_to_fs(run, **dict(storage_options or {}))
    if not fs.isdir(root):
        raise CheckpointError(f"{run}: no such run folder")
    done = []
    for path in sorted(fs.find(root)):
        relative = path[len(root.rstrip("/")) + 1 :]
        if any(part.endswith(SHARDS_SUFFIX) for part in relative.split("/")[:-1]):
            continue  # the shards are read with their checkpoint
        source = run.rstrip("/") + "/" + relative if "://" in run else path
        target = join(out, relative)
        if relative.startswith(f"{CHECKPOINTS_DIR}/") and relative.endswith(".ckpt"):
            checkpoint = read(source, storage_options)
            if SHARDS_KEY in (checkpoint.get(ARTIFACT_KEY) or {}):
                atomic_save(consolidated(checkpoint, source), target)
                done.append(relative)
                continue
        with fs.open(path, "rb") as handle:
            write_bytes(target, handle.read())
    if not done:
        raise CheckpointError(f"{run}: no sharded checkpoint in {CHECKPOINTS_DIR}/ (nothing to do)")
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.consolidate", description=__doc__)
    parser.add_argument("run", help="a sharded run's folder (path or fsspec URL)")
    parser.add_argument("out", help="the ordinary run folder to write (path or fsspec URL)")
    args = parser.parse_args(argv)
    try:
        done = consolidate(args.run, args.out)
    except UpweightError as err:
        sys.exit(f"error: {err}")
    print(f"consolidated {', '.join(done)} into {args.out}")


if __name__ == "__main__":
    main()
