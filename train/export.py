"""`python -m train.export ckpt=URL out=URL`: a self-contained serving artifact.

The folder holds `model.pt2` (a `torch.export` program: hashed bucket ids [B, C] int64 and raw
dense features [B, D] float32 -> probabilities [B, K], the dense fill and standardisation
inside), `feature_spec.json` (the columns in input order, the hashing that turns raw ids into
bucket ids, the training statistics, the weight scheme) and `serve.py`, which loads both with
only torch and numpy and scores raw rows. Before anything is written the program is reloaded
the way serve.py loads it and checked against the checkpoint's own scorer.
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
from train.data.io import filesystem
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
    spec = checkpoint.spec
    categorical, dense = _check_batch(spec.cardinalities, len(spec.dense), check_rows)
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad():
            program = torch.export.export(
                scorer,
                (categorical[:8], dense[:8]),
                dynamic_shapes=({0: batch}, {0: batch}),
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
    difference = _verify(files, scorer, categorical, dense)
    if not difference <= ATOL:
        raise ExportError(
            f"ckpt={checkpoint.source}: the exported program differs from the checkpoint by "
            f"{difference:.3g} (> {ATOL}) on a check batch; not writing it"
        )
    return Artifact(files, difference)


def feature_spec(checkpoint: Checkpoint) -> dict[str, Any]:
    """Everything a serving system needs besides the program, in plain JSON."""
    spec, scorer, artifact = checkpoint.spec, checkpoint.scorer, checkpoint.artifact
    mean, std = scorer.preprocess.mean.tolist(), scorer.preprocess.std.tolist()
    return {
        "format": serve.FORMAT,
        "program": {
            "file": serve.PROGRAM,
            "inputs": {
                "categorical": f"int64 [batch, {len(spec.categorical)}] bucket ids, columns "
                "in the order of `categorical`",
                "dense": f"float32 [batch, {len(spec.dense)}] raw values, NaN where missing, "
                "in the order of `dense`",
            },
            "output": f"float32 [batch, {len(scorer.outputs)}] probabilities, columns named "
            "by `outputs`",
        },
        "outputs": list(scorer.outputs),
        "categorical": [{"name": c, "buckets": b} for c, b in spec.categorical.items()],
        "null_bucket": 0,
        "hashing": HASHING,
        "dense": [
            {"name": c, "mean": m, "std": s} for c, m, s in zip(spec.dense, mean, std, strict=True)
        ],
        "dense_fill": scorer.preprocess.fill,
        "dense_rule": "inside the program: missing values (NaN) become the training mean "
        "(dense_fill=mean) or 0 (zero), then (x - mean) / std",
        "scheme": artifact.get("scheme", {}),
        "model": artifact.get("model", {}),
        "training": {
            "behaviours": dict(spec.behaviours),
            "stats": artifact.get("stats", {}),
            "checkpoint": safe_url(checkpoint.source),
        },
        "torch": torch.__version__,
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


def _check_batch(
    cardinalities: Sequence[int], num_dense: int, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bucket ids (null bucket included) and dense values with NaNs."""
    generator = torch.Generator().manual_seed(0)
    categorical = torch.stack(
        [torch.randint(0, b, (rows,), generator=generator) for b in cardinalities], dim=1
    ).reshape(rows, len(cardinalities))
    categorical[::7] = 0
    dense = torch.randn(rows, num_dense, generator=generator) * 3
    dense[::5, :] = float("nan")
    return categorical, dense


def _verify(
    files: Mapping[str, bytes],
    scorer: torch.nn.Module,
    categorical: torch.Tensor,
    dense: torch.Tensor,
) -> float:
    """Reload the program as serve.py does and compare it to the eager scorer (odd batch sizes
    included: the batch dimension is dynamic)."""
    with tempfile.TemporaryDirectory() as folder:
        program_path = Path(folder) / serve.PROGRAM
        program_path.write_bytes(files[serve.PROGRAM])
        program = serve.load_program(program_path)
    worst = 0.0
    with torch.inference_mode():
        for rows in (1, 3, len(categorical)):
            expected = scorer(categorical[:rows], dense[:rows])
            got = program(categorical[:rows], dense[:rows])
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
