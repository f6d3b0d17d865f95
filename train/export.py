"""`python -m train.export ckpt=URL out=URL`: a self-contained serving artifact.

The folder holds `model.pt2` (a `torch.export` program: table rows of the categorical columns
[B, C] int64, raw dense features [B, D] float32 and, when the model has list columns, their
table rows [B, Σ max_len] int64 -> probabilities [B, K], the dense fill and standardisation
inside), `feature_spec.json` and `serve.py`, which loads both with only torch and numpy and
scores raw rows. Before anything is written the program is reloaded the way serve.py loads it
and checked against the checkpoint's own scorer.

`feature_spec.json` (format 2; serve.py still reads format 1, which had hashed columns only and
no list columns) is plain JSON:

- `categorical`: the columns in input order, each with its table's encoding: `{"name",
  "buckets"}` (hashed, `hashing`) or `{"name", "vocabulary": {"kind": "int"|"string", "ids":
  [...], "null_index", "oov_index", "first_index"}}` (`vocabulary_rule`);
- `sequences`: the list columns in input order, `{"name", "max_len", "pooling", "table"}`.
  `table` names the categorical column whose table (encoding and embeddings) the list shares,
  or is the list's own name: then the entry itself carries its own table's encoding, `buckets`
  or `vocabulary` as a categorical entry does. Each table's encoding is written once;
- `dense`, `dense_fill`, `dense_rule`: the dense features and their training statistics;
- `outputs`, `scheme`, `model`, `training`: what the probabilities are and where they came from;
- `calibration` (where the checkpoint has one): the odds correction behind `p_calibrated`.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from train import serve
from train.checkpoint import Checkpoint, load
from train.data.features import NULL_BUCKET, FeatureSpec
from train.data.io import filesystem
from train.data.vocabulary import NULL_INDEX, OOV_INDEX, RESERVED, VOCAB
from train.errors import UpweightError
from train.secrets import safe_url

HASHING = {
    "function": "pandas.util.hash_array(values) (pandas' stable 64-bit hash; serve.py has it "
    "without pandas)",
    "integers": "ints, booleans (0/1) and integral floats as int64; the two's-complement bits "
    "as uint64 x, then the splitmix64 finaliser: x ^= x >> 30; x *= 0xbf58476d1ce4e5b9; "
    "x ^= x >> 27; x *= 0x94d049bb133111eb; x ^= x >> 31 (all mod 2**64)",
    "strings": "SipHash-2-4 of the UTF-8 bytes with the 16-byte key "
    f"{serve.HASH_KEY.decode()!r} (k0, k1 = its two little-endian uint64 halves), then the "
    "same finaliser",
    "bucket": "1 + hash % (buckets - 1), unsigned; null ids (None, NaN) -> null_bucket",
    "types": "an id hashes by its type: the int 7 and the string '7' differ; send ids with the "
    "type the training files had",
}
VOCABULARY_RULE = (
    "an id equal to ids[i] -> first_index + i; any other id (seen fewer than min_count times in "
    "training, or never) -> oov_index; a null id (None, NaN) -> null_index. Ints (booleans, "
    "integral floats) compare as int64, strings as strings; kind 'int' refuses string ids and "
    "kind 'string' int ids, as training does"
)
ATOL = 1e-5
"""How far the exported program may drift from the checkpoint's scorer (float32 rounding)."""


class ExportError(UpweightError):
    """The artifact could not be written, or does not reproduce the checkpoint."""


@dataclass
class Artifact:
    files: dict[str, bytes]
    """file name -> content, as written into the artifact folder."""
    max_difference: float
    """Largest |program - checkpoint| seen on the check batch."""


def build(checkpoint: Checkpoint, check_rows: int = 257) -> Artifact:
    """Export the checkpoint's scorer and check the reloaded program against it."""
    scorer = checkpoint.scorer.cpu().eval()
    inputs = _check_batch(checkpoint.spec, check_rows)
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad():
            program = torch.export.export(
                scorer,
                tuple(x[:8] for x in inputs),
                dynamic_shapes=tuple({0: batch} for _ in inputs),
            )
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
    except Exception as err:
        raise ExportError(
            f"ckpt={checkpoint.source}: torch.export cannot capture this network "
            f"({type(err).__name__}: {serve._first_line(err)})"
        ) from err
    files = {
        serve.PROGRAM: buffer.getvalue(),
        serve.SPEC: (json.dumps(feature_spec(checkpoint), indent=2) + "\n").encode(),
        "serve.py": Path(serve.__file__).read_bytes(),
    }
    difference = _verify(files, scorer, inputs)
    if not difference <= ATOL:
        raise ExportError(
            f"ckpt={checkpoint.source}: the exported program differs from the checkpoint by "
            f"{difference:.3g} (> {ATOL}) on a check batch; not writing it"
        )
    return Artifact(files, difference)


def feature_spec(checkpoint: Checkpoint) -> dict[str, Any]:
    """Everything a serving system needs besides the program, in plain JSON (see the module
    docstring)."""
    spec, scorer, artifact = checkpoint.spec, checkpoint.scorer, checkpoint.artifact
    mean, std = scorer.preprocess.mean.tolist(), scorer.preprocess.std.tolist()
    inputs = {
        "categorical": f"int64 [batch, {len(spec.categorical)}] table rows of the columns of "
        "`categorical`, in that order: hash buckets (`buckets`) or vocabulary indices "
        "(`vocabulary`)",
        "dense": f"float32 [batch, {len(spec.dense)}] raw values, NaN where missing, "
        "in the order of `dense`",
    }
    if spec.sequences:
        inputs["sequences"] = (
            f"int64 [batch, {scorer.list_width}] the columns of `sequences` side by side, in "
            "that order, each max_len wide: its last max_len elements in list order, each "
            "mapped to a row of its table (`table`: a categorical column's, or its own "
            "`buckets`/`vocabulary`; a null element -> the null row), then padded with the "
            "table's null row (left out of the pooling); a null or empty list is all padding"
        )
    return {
        "format": serve.FORMAT,
        "program": {
            "file": serve.PROGRAM,
            "inputs": inputs,
            "output": f"float32 [batch, {len(scorer.outputs)}] probabilities, columns named "
            "by `outputs`",
        },
        "outputs": list(scorer.outputs),
        "categorical": [{"name": c, **_encoding(spec, c)} for c in spec.categorical],
        "sequences": [
            {
                "name": c,
                "max_len": s.max_len,
                "pooling": s.pooling,
                "table": spec.table_of(c),
                **(_encoding(spec, c) if s.table is None else {}),
            }
            for c, s in spec.sequences.items()
        ],
        "null_bucket": NULL_BUCKET,
        "hashing": HASHING,
        "vocabulary_rule": VOCABULARY_RULE,
        "dense": [
            {"name": c, "mean": m, "std": s} for c, m, s in zip(spec.dense, mean, std, strict=True)
        ],
        "dense_fill": scorer.preprocess.fill,
        "dense_rule": "inside the program: missing values (NaN) become the training mean "
        "(dense_fill=mean) or 0 (zero), then (x - mean) / std",
        "scheme": artifact.get("scheme", {}),
        **(
            {
                "calibration": scorer.correction.to_state()
                | {
                    "rule": "inside the program: p_calibrated = p / (p + (1 - p) * odds_factor), "
                    "p the label's probability (its head's on a multi-head model), odds_factor "
                    "fitted on the validation split (train/calibration.py)"
                }
            }
            if scorer.correction
            else {}
        ),
        "model": artifact.get("model", {}),
        "training": {
            "behaviours": dict(spec.behaviours),
            "stats": artifact.get("stats", {}),
            "checkpoint": safe_url(checkpoint.source),
        },
        "torch": torch.__version__,
    }


def _encoding(spec: FeatureSpec, table: str) -> dict[str, Any]:
    """A table's encoding as feature_spec.json writes it: `buckets` or `vocabulary`."""
    encoding = spec.tables[table]
    if encoding != VOCAB:
        return {"buckets": int(encoding)}
    vocabulary = spec.vocabularies[table]
    return {
        "vocabulary": {
            "kind": vocabulary.kind,
            "ids": vocabulary.values.tolist(),
            "null_index": NULL_INDEX,
            "oov_index": OOV_INDEX,
            "first_index": RESERVED,
        }
    }


def export(
    ckpt: str,
    out: str,
    storage_options: Mapping[str, Any] | None = None,
    trusted_models: Sequence[str] = (),
    overwrite: bool = False,
) -> Artifact:
    """Write the artifact of `ckpt` into the folder `out` (any fsspec URL)."""
    options = dict(storage_options or {})
    fs, path = filesystem(out, options)
    names = [serve.PROGRAM, serve.SPEC, "serve.py"]
    try:
        if fs.isfile(path):
            raise ExportError(f"out={safe_url(out)} is a file; expected a folder for the artifact")
        existing = [n for n in names if fs.exists(f"{path.rstrip('/')}/{n}")]
        if existing and not overwrite:
            raise ExportError(
                f"out={safe_url(out)} already holds an artifact ({existing}); pass "
                "overwrite=true to replace it, or give a new folder"
            )
    except OSError as err:
        raise ExportError(
            f"out={safe_url(out)}: cannot check it ({type(err).__name__}: {err})"
        ) from err
    artifact = build(load(ckpt, options, trusted_models))
    try:
        fs.makedirs(path, exist_ok=True)
        # The spec last: a folder with a spec is a complete artifact.
        for name in sorted(artifact.files, key=lambda n: n == serve.SPEC):
            _write(fs, f"{path.rstrip('/')}/{name}", artifact.files[name])
    except OSError as err:
        raise ExportError(
            f"out={safe_url(out)}: cannot write there ({type(err).__name__}: {err})"
        ) from err
    return artifact


def _write(fs: Any, path: str, data: bytes) -> None:
    local = "file" in fs.protocol or "local" in fs.protocol
    target = f"{path}.tmp" if local else path
    with fs.open(target, "wb") as handle:
        handle.write(data)
    if local:
        fs.mv(target, path)


def _check_batch(spec: FeatureSpec, rows: int) -> tuple[torch.Tensor, ...]:
    """Valid inputs of every kind: random rows of every table (the null row included), dense
    values with NaNs and, with list columns, lists of every length (empty, partly padded, full)
    with null elements among them."""
    generator = torch.Generator().manual_seed(0)
    sizes = spec.cardinalities
    categorical = torch.stack(
        [
            torch.randint(0, sizes[j], (rows,), generator=generator)
            for j in range(len(spec.categorical))
        ],
        dim=1,
    ).reshape(rows, len(spec.categorical))
    categorical[::7] = 0
    dense = torch.randn(rows, len(spec.dense), generator=generator) * 3
    dense[::5, :] = float("nan")
    if not spec.sequences:
        return categorical, dense
    parts = []
    for s in spec.sequence_inputs:
        elements = torch.randint(0, sizes[s.table], (rows, s.max_len), generator=generator)
        lengths = torch.randint(0, s.max_len + 1, (rows,), generator=generator)
        lengths[::3] = 0
        lengths[1::3] = s.max_len
        padding = torch.arange(s.max_len) >= lengths.unsqueeze(1)
        parts.append(elements.masked_fill(padding, 0))
    return categorical, dense, torch.cat(parts, dim=1)


def _verify(
    files: Mapping[str, bytes], scorer: torch.nn.Module, inputs: Sequence[torch.Tensor]
) -> float:
    """Reload the program as serve.py does and compare it to the eager scorer on the same
    inputs (odd batch sizes included: the batch dimension is dynamic)."""
    with tempfile.TemporaryDirectory() as folder:
        program_path = Path(folder) / serve.PROGRAM
        program_path.write_bytes(files[serve.PROGRAM])
        program = serve.load_program(program_path)
    worst = 0.0
    with torch.inference_mode():
        for rows in (1, 3, len(inputs[0])):
            head = [x[:rows] for x in inputs]
            expected = scorer(*head)
            got = program(*head)
            worst = max(worst, float((got - expected).abs().max()))
    return worst


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    options = OmegaConf.to_container(cfg.storage_options, resolve=True)
    assert isinstance(options, dict)
    try:
        artifact = export(
            cfg.ckpt, cfg.out, options, list(cfg.trusted_models), overwrite=cfg.overwrite
        )
    except (UpweightError, serve.ArtifactError) as err:
        sys.exit(f"error: {err}")
    sizes = ", ".join(f"{n} {len(b) / 1e6:.1f} MB" for n, b in artifact.files.items())
    print(
        f"exported {safe_url(cfg.ckpt)} -> {safe_url(cfg.out)} ({sizes}); the program matches "
        f"the checkpoint to {artifact.max_difference:.1g}\n"
        "score raw rows: python ARTIFACT/serve.py ARTIFACT < rows.jsonl"
    )


if __name__ == "__main__":
    main()
